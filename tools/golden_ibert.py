"""Golden cases for I-BERT (HF `IBert*`), registered into tools/make_golden.py.

Float mode (quant_mode=False): every head, outputs in float32 and float64.
Quant mode (quant_mode=True): HF's activation ranges exist only after running the model in
train mode, so each quant case builds the model, runs CALIBRATION_BATCHES batches in
train mode with dropout 0 (recorded as `calibrate.*`, so refjax's `calibrate` can be
checked against the saved buffers), switches to eval, saves (`save_pretrained` writes the
calibrated x_min/x_max/shift buffers) and records eval outputs in float32 only: HF's
integer path is float32 by design (FixedPointMul casts its result to float32 and
IntLayerNorm's sqrt(D) is a float32 buffer), so a float64 quant model is not a
meaningful reference (see `fp64_note`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

BASE_CONFIG = dict(vocab_size=48, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=24, type_vocab_size=2,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
PAD = 1  # HF default pad_token_id; real ids are drawn from [LOW_ID, vocab)
LOW_ID = 3
CALIBRATION_BATCHES = 3
BATCH, SEQ = 4, 12


@dataclasses.dataclass(frozen=True)
class Variant:
    architecture: str
    description: str
    config: dict = dataclasses.field(default_factory=dict)
    labels: str | None = None
    inputs: str = "ids"  # "ids", "extras" (token types + explicit positions), "embeds", "choices"
    propagate: bool = False  # HF patched to hand each layer its true input scale (propagate_hf_scales)


def _variants() -> dict[str, Variant]:
    v = {
        "model": Variant("IBertModel", "bare model with pooler, float mode"),
        "model-extras": Variant("IBertModel", "token_type_ids and explicit position_ids, float mode", inputs="extras"),
        "model-embeds": Variant("IBertModel", "inputs_embeds (positions pad+1..pad+T), float mode", inputs="embeds"),
        "mlm": Variant("IBertForMaskedLM", "masked LM with labels, tied decoder, float mode", labels="lm"),
        "seqcls": Variant("IBertForSequenceClassification", "single-label classification, float mode",
                          {"num_labels": 3}, labels="seqcls-single"),
        "seqcls-regression": Variant("IBertForSequenceClassification", "regression, float mode",
                                     {"num_labels": 1}, labels="seqcls-regression"),
        "mc": Variant("IBertForMultipleChoice", "multiple choice [2, 3, 10], float mode", labels="mc",
                      inputs="choices"),
        "tokcls": Variant("IBertForTokenClassification", "token classification, float mode", {"num_labels": 3},
                          labels="tokcls"),
        "qa": Variant("IBertForQuestionAnswering", "span QA, float mode", labels="qa"),
    }
    quant = {f"quant-{k}": dataclasses.replace(x, config={**x.config, "quant_mode": True},
                                               description=x.description.replace("float mode", "quant mode (calibrated)"))
             for k, x in v.items() if k not in ("model-embeds", "seqcls-regression")}
    for fd in ("gelu", "softmax", "layernorm", "nonlinear"):
        quant[f"quant-dequant-{fd}"] = Variant(
            "IBertForSequenceClassification", f"quant mode with force_dequant={fd!r} (calibrated)",
            {"num_labels": 3, "quant_mode": True, "force_dequant": fd}, labels="seqcls-single")
    for k in ("seqcls", "mlm"):
        x = v[k]
        quant[f"quant-propagated-{k}"] = dataclasses.replace(
            x, config={**x.config, "quant_mode": True, "num_hidden_layers": 3}, propagate=True,
            description=x.description.replace("float mode", "quant mode, 3 layers, HF patched to propagate scales "
                                              "(refjax propagate_scales=True and integer=True)"))
    return {**v, **quant}


VARIANTS = _variants()


def propagate_hf_scales(model):
    """Patch an HF I-BERT model in place so that each layer is handed its input's true scale
    (the previous layer's output scale). HF's `IBertEncoder.forward` hands every layer the
    embedding's scale, because `IBertLayer.forward` drops its output scale. The patched
    model is what refjax's `propagate_scales=True` and `integer=True` compute."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    encoder = model.base_model.encoder

    def forward(hidden_states, hidden_states_scaling_factor, attention_mask=None, head_mask=None,
                output_attentions=False, output_hidden_states=False, return_dict=True):
        scale, hidden, attentions = hidden_states_scaling_factor, (), ()
        for layer in encoder.layer:
            hidden += (hidden_states,)
            outputs, scales = layer.attention(hidden_states, scale, attention_mask, None,
                                              output_attentions=output_attentions)
            hidden_states, scale = layer.feed_forward_chunk(outputs[0], scales[0])
            attentions += tuple(outputs[1:])
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, hidden_states=hidden + (hidden_states,) if output_hidden_states else None,
            attentions=attentions if output_attentions else None)

    encoder.forward = forward
    return model


def reinit(model, seed: int) -> None:
    """Weights ~ N(0, 0.2), LayerNorm weights ~ 1 + N(0, 0.2); tied weights stay tied."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            is_ln_weight = name.endswith("LayerNorm.weight") or name.endswith("layer_norm.weight")
            p.copy_((1.0 if is_ln_weight else 0.0) + 0.2 * noise)
    model.tie_weights()


def mask_and_ids(rng, shape, vocab):
    """Default padding pattern: all real, right-padded, left-padded, masked run in the middle;
    pad_token_id where the mask is 0 (RoBERTa positions skip pads)."""
    mask = np.ones(shape, dtype=np.int64)
    mask[1, -4:] = 0
    mask[2, :3] = 0
    mask[3, 4:7] = 0
    return np.where(mask == 1, rng.integers(LOW_ID, vocab, size=shape), PAD).astype(np.int64), mask


def inputs_for(lib, v: Variant, rng, cfg) -> dict[str, np.ndarray]:
    vocab = cfg.vocab_size
    x: dict[str, np.ndarray] = {}
    if v.inputs == "choices":
        lengths = np.array([[10, 7, 4], [9, 10, 6]])
        mask = (np.arange(10)[None, None, :] < lengths[..., None]).astype(np.int64)
        x["input_ids"] = np.where(mask == 1, rng.integers(LOW_ID, vocab, size=mask.shape), PAD).astype(np.int64)
        x["attention_mask"] = mask
        if v.labels == "mc":
            x["labels"] = rng.integers(0, 3, size=(2,)).astype(np.int64)
        return x
    ids, mask = mask_and_ids(rng, (BATCH, SEQ), vocab)
    if v.inputs == "embeds":
        x["inputs_embeds"] = 0.5 * rng.standard_normal((BATCH, SEQ, cfg.hidden_size))
    else:
        x["input_ids"] = ids
    x["attention_mask"] = mask
    if v.inputs == "extras":
        x["token_type_ids"] = rng.integers(0, cfg.type_vocab_size, size=mask.shape).astype(np.int64)
        x["position_ids"] = rng.integers(0, cfg.max_position_embeddings, size=mask.shape).astype(np.int64)
    if v.labels == "lm":
        x["labels"] = lib.token_labels(rng, rng.integers(0, vocab, size=mask.shape), mask, n_ignored=3)
    elif v.labels is not None and v.labels != "mc":
        lib.add_task_labels(x, v.labels, rng, mask, cfg)
    return x


def calibration_batches(rng, v: Variant, cfg) -> list[dict[str, np.ndarray]]:
    shape = (2, 3, 10) if v.inputs == "choices" else (BATCH, SEQ)
    batches = []
    for _ in range(CALIBRATION_BATCHES):
        mask = np.ones(shape, dtype=np.int64)
        mask.reshape(-1, shape[-1])[0, -3:] = 0  # right padding
        mask.reshape(-1, shape[-1])[1, :2] = 0  # left padding
        ids = np.where(mask == 1, rng.integers(LOW_ID, cfg.vocab_size, size=shape), PAD).astype(np.int64)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def build(lib, name: str, v: Variant, case_dir: Path):
    import torch
    import transformers

    seed = lib.case_seed(name)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = transformers.IBertConfig(**{**BASE_CONFIG, **v.config})
    model = getattr(transformers, v.architecture)(cfg)
    reinit(model, seed)
    record: dict[str, np.ndarray] = {}
    notes = []
    quant = cfg.quant_mode
    if v.propagate:
        propagate_hf_scales(model)
        notes.append("HF's IBertEncoder patched to hand each layer its input's true scale (propagate_hf_scales)")
    if quant:
        batches = calibration_batches(rng, v, cfg)
        model.train()  # HF updates activation ranges only in train mode; dropout is 0
        with torch.no_grad():
            for k, batch in enumerate(batches):
                model(**{key: torch.from_numpy(a) for key, a in batch.items()})
                record.update({f"calibrate.{key}.{k}": a for key, a in batch.items()})
        notes.append(f"calibrated with {len(batches)} train-mode batches (calibrate.*.k), dropout 0")
    model.eval()
    model.save_pretrained(case_dir, safe_serialization=True)
    lib.check_reload(model, case_dir)

    inputs = inputs_for(lib, v, rng, cfg)
    record.update(inputs)
    dtypes = ("float32",) if quant else lib.DTYPES
    for dtype_name in dtypes:
        outputs = lib.finite_forward(name, model, inputs, dtype_name)
        record.update({f"{dtype_name}/{k}": a for k, a in outputs.items()})
    if quant:
        notes.append(fp64_note(lib, model, inputs))
    metadata = {"case": name, "family": "ibert", "architecture": v.architecture,
                "transformers": transformers.__version__, "torch": torch.__version__,
                "description": v.description}
    if notes:
        metadata["notes"] = "; ".join(notes)
    if v.propagate:  # how refjax runs this case (ref/verify.py): each forward variant, and calibrate
        metadata["forward_variants"] = json.dumps([{"propagate_scales": True}, {"integer": True}])
        metadata["calibrate_kwargs"] = json.dumps({"propagate_scales": True})
    lib.atomic_write_bytes(case_dir / "golden.safetensors", lib.safetensors_bytes(record, metadata))
    return lib.CaseInfo("ibert", v.architecture, v.description)


def fp64_note(lib, model, inputs) -> str:
    """What HF's quant mode does in float64 (recorded as a note, not as a golden)."""
    import torch

    model.to(torch.float64)
    try:
        lib.run_forward(model, inputs, torch.float64)
        result = "runs, but FixedPointMul returns float32 and IntLayerNorm's sqrt(D) stays float32"
    except (RuntimeError, TypeError, ValueError) as e:
        result = f"raises {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        model.to(torch.float32)
    return f"no float64 goldens in quant mode: HF's quant model in float64 {result}"


def register(lib) -> None:
    for case, variant in VARIANTS.items():
        name = f"ibert/{case}"
        lib.CASES[name] = functools.partial(build, lib, name, variant)

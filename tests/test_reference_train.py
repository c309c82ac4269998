"""Reference tier: HF's training mode, with the same dropout masks on both sides.

refjax runs `forward(..., train=True, key=k, taps=True)`, which records the keep-mask of
every dropout site it used; those masks replace HF's `nn.Dropout` modules (one module per
site and layer, `MaskDropout`), HF runs in `train()` mode, and the outputs, the loss and
the gradient of the loss w.r.t. every parameter must agree: HF autograd against `jax.grad`
of refjax replaying the masks (`dropout_masks=`). float64; tolerance 1e-12 relative to
each tensor's scale (the two sides sum in different orders), as the live tier's TOL;
Arcee 1e-5, because HF computes its norms, RoPE and softmax in float32 even then.

Runs only with the `reference` extra (torch + transformers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reference tier needs the `reference` extra (torch + transformers)")
transformers = pytest.importorskip(
    "transformers", reason="reference tier needs the `reference` extra (torch + transformers)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hf_helpers import TOL, assert_close, quiet_torch, reinit_, scaled_error  # noqa: E402
from mega_helpers import inject_hf_masks as inject_mega_masks  # noqa: E402
from refjax import arcee, gpt2, ibert, mega, roformer  # noqa: E402
from refjax.params import io  # noqa: E402
from refjax.params.checkpoint import FAMILIES as PARAM_FAMILIES, load_checkpoint  # noqa: E402
from refjax.probe import LAYER, masks_from_taps  # noqa: E402

pytestmark = pytest.mark.reference


class MaskDropout(torch.nn.Module):
    """An nn.Dropout whose mask is given: x * keep / (1 - p), as torch's dropout scales."""

    def __init__(self, keep: np.ndarray, p: float):
        super().__init__()
        self.keep = torch.from_numpy(np.array(keep, dtype=bool))
        self.p = p

    def forward(self, x):
        return x * self.keep.to(x.dtype) * (1.0 / (1.0 - self.p))


@contextlib.contextmanager
def functional_masks(keeps: list, p: float):
    """HF's functional dropout (Llama-style attention: `nn.functional.dropout(w, p, training)`)
    with given masks, one per call in call order (layer 0, 1, ...)."""
    original = torch.nn.functional.dropout
    calls = iter(keeps)

    def dropout(x, p_=0.5, training=True, inplace=False, **kw):
        p_ = kw.get("p", p_)
        if not training or p_ == 0.0:
            return x
        assert p_ == p, (p_, p)
        keep = torch.from_numpy(np.array(next(calls), dtype=bool))
        return x * keep.to(x.dtype) * (1.0 / (1.0 - p))

    torch.nn.functional.dropout = dropout
    try:
        yield
    finally:
        torch.nn.functional.dropout = original


def inject_masks(model, masks: dict, rates: dict, base_prefix: str) -> int:
    """Replace every dropout module a refjax site names with a MaskDropout of that site's
    mask (per-layer sites: mask[i] for layer i). Returns how many modules were replaced."""
    replaced = 0
    for site, keep in masks.items():
        keep = np.asarray(keep)
        layers = range(keep.shape[0]) if LAYER in site else [None]
        for i in layers:
            name = site.replace(LAYER, str(i)) if i is not None else site
            for path in (base_prefix + name, name):
                try:
                    model.get_submodule(path)
                except AttributeError:
                    continue
                parent, _, child = path.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                assert isinstance(getattr(owner, child), torch.nn.Dropout), path
                setattr(owner, child, MaskDropout(keep[i] if i is not None else keep, rates[site]))
                replaced += 1
                break
            else:
                raise AssertionError(f"no HF module for site {name}")
    return replaced


GPT2_CONFIG = dict(vocab_size=61, n_positions=32, n_embd=16, n_layer=2, n_head=2, embd_pdrop=0.3, attn_pdrop=0.25,
                   resid_pdrop=0.2, summary_first_dropout=0.35, summary_last_dropout=0.15, classifier_dropout=0.4,
                   num_labels=3, pad_token_id=0)

ARCEE_CONFIG = dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.3, classifier_dropout=0.25,
                    num_labels=3, pad_token_id=0, hidden_act="relu2")

ROFORMER_CONFIG = dict(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                       max_position_embeddings=32, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.25,
                       num_labels=3, pad_token_id=0)

MEGA_CONFIG = dict(vocab_size=61, hidden_size=16, num_hidden_layers=2, intermediate_size=24, ema_projection_size=4,
                   shared_representation_size=8, nffn_hidden_size=20, max_positions=32, dropout_prob=0.3,
                   hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.25, nffn_activation_dropout_prob=0.35,
                   num_labels=3, pad_token_id=0, use_cache=False)
MEGA_DECODER = dict(MEGA_CONFIG, is_decoder=True, bidirectional=False)

IBERT_CONFIG = dict(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                    max_position_embeddings=32, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.25,
                    num_labels=3, pad_token_id=1)

# Each case: (family module, HF class, config kwargs, base prefix, functional dropout site or None
# [, the family's own mask injector, for dropout HF does not run through nn.Dropout modules])
CASES = {
    "gpt2-lm": (gpt2, "GPT2LMHeadModel", GPT2_CONFIG, "transformer.", None),
    "gpt2-tokcls": (gpt2, "GPT2ForTokenClassification", GPT2_CONFIG, "transformer.", None),
    "gpt2-double-heads": (gpt2, "GPT2DoubleHeadsModel", dict(GPT2_CONFIG, summary_activation="tanh"), "transformer.",
                          None),
    "arcee-lm": (arcee, "ArceeForCausalLM", ARCEE_CONFIG, "model.", "layers.{i}.self_attn.attention_dropout"),
    "arcee-tokcls": (arcee, "ArceeForTokenClassification", ARCEE_CONFIG, "model.",
                     "layers.{i}.self_attn.attention_dropout"),
    # embedding_size != hidden_size: the embedding dropout acts before embeddings_project
    "roformer-mlm": (roformer, "RoFormerForMaskedLM", dict(ROFORMER_CONFIG, embedding_size=12), "roformer.", None),
    # RoFormerClassificationHead calls its one dropout module twice: its two masks go through
    # HF's functional dropout in call order ("classifier.dropout.{i}", i = call)
    "roformer-seqcls": (roformer, "RoFormerForSequenceClassification", ROFORMER_CONFIG, "roformer.",
                        "classifier.dropout.{i}"),
    "roformer-tokcls": (roformer, "RoFormerForTokenClassification", ROFORMER_CONFIG, "roformer.", None),
    "roformer-mc": (roformer, "RoFormerForMultipleChoice",
                    dict(ROFORMER_CONFIG, summary_use_proj=True, summary_proj_to_labels=False,
                         summary_activation="tanh", summary_first_dropout=0.35, summary_last_dropout=0.15),
                    "roformer.", None),
    # MEGA's layers call MegaDropout modules (mega_layer.dropout twice: ".0", ".1"); with
    # use_feature_dropout they drop whole channels (HF's dropout2d, masks [B, 1, D]) and whole
    # chunks of values ([B, C, 1, 1]); the attention dropout stays entrywise
    "mega-lm": (mega, "MegaForCausalLM", MEGA_DECODER, "mega.", None, inject_mega_masks),
    "mega-lm-feature": (mega, "MegaForCausalLM", dict(MEGA_DECODER, use_feature_dropout=True), "mega.", None,
                        inject_mega_masks),
    # MegaClassificationHead calls its one dropout module twice ("classifier.dropout.0", ".1")
    "mega-seqcls-feature": (mega, "MegaForSequenceClassification",
                            dict(MEGA_CONFIG, use_feature_dropout=True, classifier_dropout=0.4), "mega.", None,
                            inject_mega_masks),
    "mega-tokcls": (mega, "MegaForTokenClassification", dict(MEGA_CONFIG, classifier_dropout=0.4), "mega.", None,
                    inject_mega_masks),
    # training-mode BatchNorm (batch statistics, pads included), post-norm; the pooled output's dropout
    "mega-mc-batchnorm": (mega, "MegaForMultipleChoice",
                          dict(MEGA_CONFIG, normalization_type="batchnorm", normalize_before_mega=False,
                               normalize_before_ffn=False), "mega.", None, inject_mega_masks),
    # I-BERT float mode (RoBERTa); quant mode: test_ibert_quant_mode_training_matches_hf_with_frozen_ranges.
    # IBertClassificationHead calls its one dropout module twice, like RoFormer's
    "ibert-mlm": (ibert, "IBertForMaskedLM", IBERT_CONFIG, "ibert.", None),
    "ibert-seqcls": (ibert, "IBertForSequenceClassification", IBERT_CONFIG, "ibert.", "classifier.dropout.{i}"),
    "ibert-mc": (ibert, "IBertForMultipleChoice", IBERT_CONFIG, "ibert.", None),  # the pooler, then `dropout`
}


def make_inputs(arch: str, config: dict, rng) -> dict[str, np.ndarray]:
    B, T = 2, 7
    if arch == "GPT2DoubleHeadsModel":
        C = 3
        ids = rng.integers(1, config["vocab_size"], (B, C, T))
        return dict(input_ids=ids, mc_token_ids=rng.integers(0, T, (B, C)), labels=ids,
                    mc_labels=rng.integers(0, C, (B,)))
    if arch.endswith("MultipleChoice"):
        C = 3
        return dict(input_ids=rng.integers(1, config["vocab_size"], (B, C, T)), labels=rng.integers(0, C, (B,)))
    ids = rng.integers(1, config["vocab_size"], (B, T))
    mask = np.ones((B, T), np.int64)
    if arch.startswith("Arcee") or arch == "MegaForCausalLM":  # right padding: HF's fp64 Arcee turns a fully
        mask[1, -2:] = 0  # padded query row into NaN (fp32 softmax of an fp64 mask, docs/design.md); so do
        # MEGA's decoders, in HF and refjax alike (a leading pad query has only masked keys)
    else:  # left padding: pad queries see no real key, and HF's gradient reaches their scores
        mask[1, :2] = 0
    labels = ids if arch.endswith(("LMHeadModel", "CausalLM")) else rng.integers(0, config["num_labels"], (B, T))
    if arch.endswith("MaskedLM"):
        labels = ids
    elif arch.endswith("SequenceClassification"):
        labels = rng.integers(0, config["num_labels"], (B,))
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_mode_matches_hf_with_the_same_masks(case):
    module, arch, config_kwargs, base_prefix, functional_site, *injector = CASES[case]
    # HF's float64 Arcee still runs RMSNorm, RoPE and softmax in float32 (docs/design.md):
    # compared at float32 tolerance; GPT-2 is float64 throughout.
    # MEGA: HF runs the EMA's FFT convolution and the rotary sinusoids in float32 (tests/test_reference_mega.py).
    tol = TOL["float32"] if arch.startswith(("Arcee", "Mega")) else TOL["float64"]
    rng = np.random.default_rng(0)
    with quiet_torch():
        torch.manual_seed(0)
        hf_config = getattr(transformers, arch).config_class(**config_kwargs)
        model = getattr(transformers, arch)._from_config(hf_config, attn_implementation="eager").double()
        reinit_(model, 0)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            ckpt = load_checkpoint(d, dtype=jnp.float64)
        inputs = make_inputs(arch, config_kwargs, rng)
        arrays = {k: jnp.asarray(v, jnp.int32) for k, v in inputs.items()}
        ours = module.forward(ckpt.params, ckpt.config, **arrays, train=True, key=jax.random.key(0), taps=True)
        masks = masks_from_taps(ours.taps, module.DROPOUT)
        rates = {site: rate(ckpt.config) for site, rate in module.DROPOUT.items()}
        functional = masks.pop(functional_site) if functional_site else np.zeros((0,))
        assert (injector[0] if injector else inject_masks)(model, masks, rates, base_prefix) >= len(masks)
        model.train()
        # HF's causal-LM loss runs `logits.float()` (an fp64 model's loss in fp32, see
        # docs/design.md); the same shifted cross-entropy is computed here in fp64 instead.
        causal = arch.endswith(("LMHeadModel", "CausalLM"))
        hf_inputs = {k: torch.from_numpy(np.array(v)) for k, v in inputs.items() if not (causal and k == "labels")}
        with functional_masks(list(functional), rates.get(functional_site, 0.0)):
            out = model(**hf_inputs, return_dict=True)
        if causal:
            logits, labels = out.logits, torch.from_numpy(np.array(inputs["labels"]))
            out.loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         labels[:, 1:].reshape(-1))
        losses = [n for n in ("loss", "mc_loss") if getattr(out, n, None) is not None]
        assert losses
        sum(getattr(out, n) for n in losses).backward()

    for field in ("logits", "mc_logits", "loss", "mc_loss"):
        theirs = getattr(out, field, None)
        if theirs is not None:
            assert_close(field, np.asarray(getattr(ours, field)), theirs.detach().numpy(), tol)

    if functional_site:
        masks[functional_site] = functional

    def loss(params):
        o = module.forward(params, ckpt.config, **arrays, train=True, dropout_masks=masks)
        return sum(getattr(o, n) for n in losses)

    grads = jax.grad(loss)(ckpt.params)
    ours_named = io.tensors_from_tree(grads, PARAM_FAMILIES[ckpt.family].module.name_rules(ckpt.config))
    theirs_named = {n: p.grad.detach().numpy() for n, p in model.named_parameters() if p.grad is not None}
    # HF's frozen tensors (requires_grad=False: RoFormer's sinusoidal table) have no gradient to match
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # and HF's buffers (MEGA's BatchNorm running statistics: unused in training mode; I-BERT's
    # QuantAct ranges, unused in float mode) none either
    frozen |= {n for n, _ in model.named_buffers()}
    ours_named = {n: g for n, g in ours_named.items() if n not in frozen and base_prefix + n not in frozen}
    errors = {}
    for name, g in ours_named.items():
        hf_name = name if name in theirs_named else base_prefix + name
        if hf_name not in theirs_named:
            continue
        errors[name] = scaled_error(np.asarray(g), theirs_named[hf_name])
    assert len(errors) == len(ours_named), sorted(set(ours_named) - set(errors))
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"gradients differ (scaled error > {tol}): {bad}"


def test_ibert_quant_mode_training_matches_hf_with_frozen_ranges():
    """I-BERT in quant mode (float32, calibrated ranges): refjax's `forward(train=True)`
    keeps the activation ranges of `state` frozen, which is HF's model in `train()` with
    its QuantAct and IntLayerNorm modules back in `eval()` (HF's train() would also move
    the ranges: that update is `ibert.calibrate`). Same masks on both sides: outputs and
    loss agree at float32 tolerance, the quantized encoder's output bit for bit. Gradients only for the float head: HF's
    encoder gradients are straight-through estimates of its rounding (SymmetricQuantFunction,
    round_ste, FixedPointMul backward), refjax's `jax.grad` is the exact derivative of the
    fake-quant forward, so they are different quantities by design."""
    from ibert_helpers import build_and_save

    arch = "IBertForTokenClassification"
    config = {k: v for k, v in IBERT_CONFIG.items() if not k.endswith("dropout_prob")}
    rng = np.random.default_rng(0)
    calibration = [{k: v for k, v in make_inputs(arch, IBERT_CONFIG, rng).items() if k != "labels"} for _ in range(2)]
    model, directory = build_and_save(arch, dict(config, quant_mode=True), 0, calibration)
    ckpt = load_checkpoint(directory)
    rates = {k: IBERT_CONFIG[k] for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
    cfg = dataclasses.replace(ckpt.config, **rates)
    inputs = make_inputs(arch, IBERT_CONFIG, rng)
    arrays = {k: jnp.asarray(v, jnp.int32) for k, v in inputs.items()}
    ours = ibert.forward(ckpt.params, cfg, **arrays, train=True, key=jax.random.key(0), taps=True)
    masks = masks_from_taps(ours.taps, ibert.DROPOUT)
    assert set(masks) == {"embeddings.dropout", "encoder.layer.{i}.attention.self.dropout",
                          "encoder.layer.{i}.attention.output.dropout", "encoder.layer.{i}.output.dropout", "dropout"}
    site_rates = {site: rate(cfg) for site, rate in ibert.DROPOUT.items()}
    assert inject_masks(model, masks, site_rates, "ibert.") == 8
    from transformers.models.ibert.quant_modules import IntLayerNorm, QuantAct

    model.train()
    for module in model.modules():  # freeze the ranges: refjax's train=True
        if isinstance(module, (QuantAct, IntLayerNorm)):
            module.eval()
    before = {n: b.clone() for n, b in model.named_buffers()}
    out = model(**{k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}, output_hidden_states=True,
                return_dict=True)
    out.loss.backward()
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers() if n.endswith(("x_min", "x_max", "shift")))
    for field in ("logits", "loss"):
        assert_close(field, np.asarray(getattr(ours, field)), getattr(out, field).detach().numpy(), TOL["float32"])
    # the quantized encoder agrees bit for bit (the float head only to float32 rounding)
    np.testing.assert_array_equal(np.asarray(ours.last_hidden_state), out.hidden_states[-1].detach().numpy())

    def loss(params):
        return ibert.forward(params, cfg, **arrays, train=True, dropout_masks=masks).loss

    grads = jax.grad(loss)(ckpt.params)
    for name in ("kernel", "bias"):
        theirs = getattr(model.classifier, "weight" if name == "kernel" else name).grad.numpy()
        g = np.asarray(getattr(grads.classifier, name))
        assert scaled_error(g.T if name == "kernel" else g, theirs) <= TOL["float32"], name

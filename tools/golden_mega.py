"""Golden cases for MEGA (HF `transformers.models.deprecated.mega`, 4.57.6: the last release
that ships it). Registered into tools/make_golden.py through `register(lib)`.

Each case: a tiny seeded MegaConfig, every parameter and BatchNorm statistic re-drawn at
random (HF's init leaves many at constants: qk_bias 0, norms 1, biases 0), saved with
`save_pretrained`, plus HF's float32 and float64 outputs for one input batch. Causal-LM
cases with a softmax decoder also record greedy decoding through HF's own incremental path
(`past_key_values`: attention keys/values + EMA state; HF 4.57.6's MegaForCausalLM has no
`generate`, so the loop is written here with GenerationMixin's greedy rules).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

FAMILY = "mega"
BASE_CONFIG = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=2, intermediate_size=24, ema_projection_size=4,
    shared_representation_size=8, nffn_hidden_size=20, max_positions=32, pad_token_id=1, bos_token_id=0,
    eos_token_id=2,
)
LOW_ID = 3  # real input ids avoid bos/pad/eos
BATCH, SEQ = 2, 8
DECODER = dict(is_decoder=True, bidirectional=False)
# RoBERTa-style vocabulary over make_golden's tiny trained byte-level BPE: <s> <pad> </s> <unk>
# first, the BPE tokens shifted by 4 (its <|endoftext|> dropped), <mask> last.
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
TOKENIZER_VOCAB = 324


@dataclasses.dataclass(frozen=True)
class Variant:
    architecture: str
    description: str
    config: dict = dataclasses.field(default_factory=dict)
    labels: str | None = None  # "lm", "token", "single", "regression", "multi", "span", "choice"
    padding: str = "left"  # "left", "right" (decoders: HF's causal softmax gives NaN on left-pad rows), "none"
    inputs_embeds: bool = False
    token_types: bool = False
    generate: bool = False
    seq: int = SEQ
    tokenizer: bool = False


M, LM, MLM = "MegaModel", "MegaForCausalLM", "MegaForMaskedLM"
VARIANTS: dict[str, Variant] = {
    "model": Variant(M, "MegaModel, defaults: bidirectional EMA, scalenorm, softmax, rotary bias, silu"),
    "model-token-types": Variant(M, "add_token_type_embeddings with token_type_ids",
                                 dict(add_token_type_embeddings=True, type_vocab_size=3), token_types=True),
    "model-embeds": Variant(M, "inputs_embeds instead of input_ids", inputs_embeds=True),
    "norm-layernorm": Variant(M, "normalization_type=layernorm", dict(normalization_type="layernorm")),
    "norm-rmsnorm": Variant(M, "normalization_type=rmsnorm (HF's MegaRMSNorm only scales)",
                            dict(normalization_type="rmsnorm")),
    "norm-batchnorm": Variant(M, "normalization_type=batchnorm (eval: running statistics)",
                              dict(normalization_type="batchnorm")),
    "norm-syncbatchnorm": Variant(M, "normalization_type=syncbatchnorm (eval: running statistics)",
                                  dict(normalization_type="syncbatchnorm")),
    "norm-no-affine": Variant(M, "norm_affine=false with batchnorm (HF cannot build layernorm without affine)",
                              dict(normalization_type="batchnorm", norm_affine=False)),
    "rmsnorm-no-affine": Variant(M, "norm_affine=false with rmsnorm", dict(normalization_type="rmsnorm",
                                                                           norm_affine=False)),
    "scalenorm-no-affine": Variant(M, "norm_affine=false with scalenorm", dict(norm_affine=False)),
    "postnorm": Variant(M, "normalize_before_mega=false, normalize_before_ffn=false",
                        dict(normalize_before_mega=False, normalize_before_ffn=False)),
    "no-nffn": Variant(M, "use_normalized_ffn=false", dict(use_normalized_ffn=False)),
    "attn-laplace": Variant(M, "attention_activation=laplace", dict(attention_activation="laplace")),
    "attn-relu2": Variant(M, "attention_activation=relu2", dict(attention_activation="relu2")),
    "bias-simple": Variant(M, "relative_positional_bias=simple", dict(relative_positional_bias="simple")),
    "chunking": Variant(M, "use_chunking, chunk_size=4, 8 tokens (2 chunks), simple bias",
                        dict(use_chunking=True, chunk_size=4, relative_positional_bias="simple")),
    "chunking-rotary-laplace": Variant(M, "use_chunking, chunk_size=4, laplace attention, rotary bias",
                                       dict(use_chunking=True, chunk_size=4, attention_activation="laplace")),
    "chunking-short": Variant(M, "use_chunking with chunk_size=16 > 8 tokens (one short chunk)",
                              dict(use_chunking=True, chunk_size=16)),
    "truncation": Variant(M, "truncation=3 (bidirectional EMA kernel cut to 3 taps)", dict(truncation=3)),
    "unidirectional": Variant(M, "bidirectional=false encoder, truncation=5", dict(bidirectional=False, truncation=5)),
    "act-gelu": Variant(M, "activation=gelu", dict(activation="gelu")),
    "feature-dropout": Variant(M, "use_feature_dropout=true (identity in eval)", dict(use_feature_dropout=True)),
    "masked-lm": Variant(MLM, "MegaForMaskedLM, tied head, labels", labels="lm"),
    "masked-lm-no-dense": Variant(MLM, "MegaForMaskedLM, add_lm_hidden_dense_layer=false, untied",
                                  dict(add_lm_hidden_dense_layer=False, tie_word_embeddings=False), labels="lm"),
    "causal-lm": Variant(LM, "MegaForCausalLM decoder, rotary softmax, greedy decoding with HF's cache",
                         DECODER, labels="lm", padding="right", generate=True),
    "causal-lm-simple": Variant(LM, "decoder with the simple bias, untied head, greedy decoding",
                                {**DECODER, "relative_positional_bias": "simple", "tie_word_embeddings": False},
                                labels="lm", padding="right", generate=True),
    "causal-lm-postnorm": Variant(LM, "decoder, post-norm, layernorm, greedy decoding",
                                  {**DECODER, "normalize_before_mega": False, "normalize_before_ffn": False,
                                   "normalization_type": "layernorm"}, labels="lm", padding="right",
                                  generate=True),
    "causal-lm-relu2": Variant(LM, "decoder with relu2 attention (full forward only: HF's cached element "
                                   "attention differs from its full forward)",
                               {**DECODER, "attention_activation": "relu2"}, labels="lm", padding="right"),
    "causal-lm-chunking": Variant(LM, "chunked decoder: chunk_size=4, 8 tokens, laplace",
                                  {**DECODER, "use_chunking": True, "chunk_size": 4,
                                   "attention_activation": "laplace"}, labels="lm", padding="right"),
    "masked-lm-tokenizer": Variant(MLM, "MegaForMaskedLM with RoBERTa byte-level BPE files (vocab.json + merges.txt)",
                                   dict(vocab_size=TOKENIZER_VOCAB), labels="lm", tokenizer=True),
    "seqcls-single": Variant("MegaForSequenceClassification", "single-label classification",
                             dict(num_labels=3), labels="single"),
    "seqcls-regression": Variant("MegaForSequenceClassification", "regression (num_labels=1)",
                                 dict(num_labels=1), labels="regression"),
    "seqcls-multilabel": Variant("MegaForSequenceClassification", "multi-label classification",
                                 dict(num_labels=3, problem_type="multi_label_classification"), labels="multi"),
    "tokcls": Variant("MegaForTokenClassification", "token classification", dict(num_labels=5), labels="token"),
    "qa": Variant("MegaForQuestionAnswering", "span start/end", labels="span"),
    "multiple-choice": Variant("MegaForMultipleChoice", "3 choices, pooler + classifier", labels="choice"),
}


def save_roberta_tokenizer(lib, case_dir: Path) -> None:
    """vocab.json + merges.txt (+ the configs RobertaTokenizer.save_pretrained writes), no tokenizer.json."""
    import tempfile

    from transformers import RobertaTokenizer

    tok = lib.train_bpe_tokenizer()
    vocab = {t: i for i, t in enumerate(ROBERTA_SPECIALS)}
    for token, index in sorted(tok.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1]):
        vocab[token] = index + len(ROBERTA_SPECIALS)
    vocab["<mask>"] = len(vocab)
    if len(vocab) != TOKENIZER_VOCAB:
        raise RuntimeError(f"RoBERTa vocabulary has {len(vocab)} ids, expected {TOKENIZER_VOCAB}")
    merges = json.loads(tok.to_str())["model"]["merges"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in merges]
        (Path(tmp) / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        RobertaTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt")).save_pretrained(case_dir)
    (case_dir / "tokenizer.json").unlink(missing_ok=True)


def tokenizer_texts(lib) -> list[str]:
    texts = [t.replace(lib.ENDOFTEXT, "<mask>") for t in lib.TOKENIZER_TEXTS]
    return texts + ["two specials: </s> and <pad>, a <mask>, <unk>", "no space before<mask>here"]


def roberta_tokenizer_goldens(lib, case_dir: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Ids of HF's RobertaTokenizerFast (converted from the slow files), cross-checked with
    the slow RobertaTokenizer."""
    from transformers import AutoTokenizer, RobertaTokenizerFast

    fast = AutoTokenizer.from_pretrained(case_dir)
    slow = AutoTokenizer.from_pretrained(case_dir, use_fast=False)
    if not isinstance(fast, RobertaTokenizerFast):
        raise RuntimeError(f"AutoTokenizer gave {type(fast).__name__}, expected RobertaTokenizerFast")
    out, texts = {}, tokenizer_texts(lib)
    for i, text in enumerate(texts):
        ids = fast(text)["input_ids"]
        if slow(text)["input_ids"] != ids:
            raise RuntimeError(f"slow and fast RoBERTa tokenizers disagree on {text!r}")
        out[f"text.ids.{i}"] = np.asarray(ids, dtype=np.int64).reshape(-1)
    return out, texts


def reinit_mega(model, seed: int) -> None:
    """Re-draw every parameter and BatchNorm statistic so that each one shows in the outputs.

    Linear weights/biases N(0, 0.2); embeddings N(0, 0.5); EMA delta/alpha N(0, 1) (sigmoid
    spreads them), beta = HF's +-1 pattern + N(0, 0.2), gamma/omega N(0, 0.5); relative bias
    N(0, 0.5), rotary alpha/b_param N(0, 1); qk_weight 1 + N(0, 0.5), qk_bias N(0, 0.5) (so that the
    laplace / relu2 attention weights spread over their range);
    norm weights/scalars 1 + N(0, 0.2), biases N(0, 0.2); BatchNorm running_mean N(0, 0.2),
    running_var 0.5 + |N(0, 0.5)|. Tied weights stay tied.
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def noise(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    with torch.no_grad():
        for name, p in model.named_parameters():
            owner_name, leaf = name.rsplit(".", 1)
            owner = model.get_submodule(owner_name)
            kind = type(owner).__name__
            if isinstance(owner, torch.nn.Embedding):
                p.copy_(0.5 * noise(p.shape))
            elif isinstance(owner, torch.nn.Linear):
                p.copy_(0.2 * noise(p.shape))
            elif kind == "MegaMultiDimensionDampedEma":
                if leaf in ("damping_factor", "decay_factor"):
                    p.copy_(noise(p.shape))
                elif leaf == "ema_expansion_matrix":
                    sign = torch.ones(p.shape[1], 1)
                    sign[1::2] = -1.0
                    p.copy_(sign + 0.2 * noise(p.shape))
                else:  # kernel_projection_matrix (gamma), residual_weight (omega)
                    p.copy_(0.5 * noise(p.shape))
            elif kind == "MegaSimpleRelativePositionalBias":
                p.copy_(0.5 * noise(p.shape))
            elif kind == "MegaRotaryRelativePositionalBias":
                p.copy_(noise(p.shape))
            elif kind == "MegaMovingAverageGatedAttention":
                p.copy_((1.0 if leaf == "qk_weight" else 0.0) + 0.5 * noise(p.shape))
            elif kind in ("MegaScaleNorm", "MegaRMSNorm", "LayerNorm", "BatchNorm1d", "SyncBatchNorm"):
                p.copy_((1.0 if leaf in ("weight", "scalar") else 0.0) + 0.2 * noise(p.shape))
            else:
                raise TypeError(f"reinit_mega: no rule for {name} in {kind}")
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * noise(b.shape))
            elif name.endswith("running_var"):
                b.copy_(0.5 + (0.5 * noise(b.shape)).abs())
    model.tie_weights()


def make_inputs(v: Variant, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
    B, T = BATCH, v.seq
    shape = (B, 3, T) if v.labels == "choice" else (B, T)
    mask = np.ones(shape, np.int64)
    if v.padding == "left":
        mask[1, ..., :2] = 0
    elif v.padding == "right":
        mask[1, ..., -2:] = 0
    ids = rng.integers(LOW_ID, cfg.vocab_size, size=shape).astype(np.int64)
    ids = np.where(mask == 1, ids, cfg.pad_token_id)
    x: dict[str, np.ndarray] = {"attention_mask": mask}
    if v.inputs_embeds:
        x["inputs_embeds"] = (0.5 * rng.standard_normal((*shape, cfg.hidden_size))).astype(np.float32)
    else:
        x["input_ids"] = ids
    if v.token_types:
        x["token_type_ids"] = rng.integers(0, cfg.type_vocab_size, size=shape).astype(np.int64)
    if v.labels == "lm":
        labels = rng.integers(0, cfg.vocab_size, size=shape).astype(np.int64)
        labels[0, 1] = -100
        x["labels"] = labels
    elif v.labels == "token":
        labels = rng.integers(0, cfg.num_labels, size=shape).astype(np.int64)
        labels[mask == 0] = -100
        x["labels"] = labels
    elif v.labels == "single":
        x["labels"] = rng.integers(0, cfg.num_labels, size=(B,)).astype(np.int64)
    elif v.labels == "regression":
        x["labels"] = rng.standard_normal((B,)).astype(np.float32)
    elif v.labels == "multi":
        x["labels"] = rng.integers(0, 2, size=(B, cfg.num_labels)).astype(np.float32)
    elif v.labels == "span":
        x["start_positions"] = np.array([1, 3], np.int64)
        x["end_positions"] = np.array([4, T + 5], np.int64)  # beyond T: HF clamps and ignores it
    elif v.labels == "choice":
        x["labels"] = np.array([2, 0], np.int64)
    return x


def hf_greedy(model, prompt: np.ndarray, max_new_tokens: int, pad: int, eos: int) -> dict[str, np.ndarray]:
    """Greedy decoding through HF MEGA's incremental path (prefill with use_cache, then one
    token + past_key_values per step, the full attention mask as prepare_inputs_for_generation
    passes it), stopping rows at eos and padding them with `pad` as GenerationMixin does.
    Also the full forward (no cache) over the result, for the cache == full check."""
    import torch

    ids = torch.from_numpy(prompt)
    B = ids.shape[0]
    finished = torch.zeros(B, dtype=torch.bool)
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
        seq, cached_logits = ids, []
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            cached_logits.append(logits)
            token = torch.where(finished, torch.full((B,), pad), logits.argmax(-1))
            finished = finished | (token == eos)
            seq = torch.cat([seq, token[:, None]], 1)
            if bool(finished.all()):
                break
            out = model(token[:, None], attention_mask=torch.ones_like(seq), past_key_values=out.past_key_values,
                        use_cache=True)
        full = model(seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
    T0 = prompt.shape[1]
    steps = torch.stack(cached_logits, 1)
    gap = (steps - full[:, T0 - 1: T0 - 1 + steps.shape[1]].float()).abs().max().item()
    if gap > 1e-4:
        raise RuntimeError(f"HF's cached decoding differs from its full forward by {gap}")
    return {
        "generate.input_ids": prompt,
        "generate.attention_mask": np.ones_like(prompt),
        "generate.sequences": seq.numpy().copy(),
        "generate.logits": full.numpy().copy(),  # full forward over the returned sequences
    }


def build(lib, name: str, v: Variant, case_dir: Path):
    import torch
    import transformers
    from transformers.models.deprecated.mega import modeling_mega
    from transformers.models.deprecated.mega.configuration_mega import MegaConfig

    seed = lib.case_seed(name)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = MegaConfig(**{**BASE_CONFIG, **v.config})
    if v.architecture == LM and not cfg.is_decoder:
        raise ValueError("causal-LM cases must be decoders")
    model = getattr(modeling_mega, v.architecture)(cfg).eval()
    reinit_mega(model, seed)
    model.save_pretrained(case_dir, safe_serialization=True)  # before any forward: seq-cls mutates problem_type
    lib.check_reload(model, case_dir)

    meta_extra: dict[str, str] = {}
    inputs = make_inputs(v, rng, cfg)
    record: dict[str, np.ndarray] = dict(inputs)
    if v.tokenizer:
        save_roberta_tokenizer(lib, case_dir)
        ids, texts = roberta_tokenizer_goldens(lib, case_dir)
        record.update(ids)
        meta_extra["texts"] = json.dumps(texts, ensure_ascii=False)
    notes = ["HF computes the EMA's FFT convolution (`.float()`) and the rotary sinusoids in float32 even in "
             "a float64 model, so float64 outputs are float32-accurate"]
    for dtype_name in lib.DTYPES:
        outputs = lib.finite_forward(name, model, inputs, dtype_name)
        record.update({f"{dtype_name}/{k}": a for k, a in outputs.items()})
        if dtype_name == "float32" and v.generate:
            prompt = rng.integers(LOW_ID, cfg.vocab_size, size=(2, 5)).astype(np.int64)
            record.update(hf_greedy(model, prompt, 6, pad=cfg.pad_token_id, eos=cfg.eos_token_id))
    metadata = {
        "case": name, "family": FAMILY, "architecture": v.architecture,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "description": v.description, "notes": "; ".join(notes), **meta_extra,
    }
    lib.atomic_write_bytes(case_dir / "golden.safetensors", lib.safetensors_bytes(record, metadata))
    return lib.CaseInfo(FAMILY, v.architecture, v.description)


def register(lib) -> None:
    for case, variant in VARIANTS.items():
        name = f"{FAMILY}/{case}"
        lib.CASES[name] = functools.partial(build, lib, name, variant)

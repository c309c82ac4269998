"""RoFormer golden cases for tools/make_golden.py (`register(lib)`, lib = the make_golden module).

Every head of HF `modeling_roformer.py` on tiny seeded models: RoFormerModel (encoder and
decoder mode, inputs_embeds, embedding_size != hidden_size with rotary_value), MaskedLM (tied,
untied, with the jieba tokenizer on a small Chinese vocab shipped with the case), CausalLM
(is_decoder, greedy generation with HF's cache), sequence classification (three problem types),
multiple choice (default "last" summary and a projected "first" summary), token
classification and question answering.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

FAMILY = "roformer"
BASE_CONFIG = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    max_position_embeddings=48, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
)
LOW_ID = 3  # real ids from [3, vocab): never pad (0) or the LM cases' eos (2)
EOS = 2
CLM = "RoFormerForCausalLM"

# Tokenizer case: a small vocab.txt cut from a Chinese BERT vocab's layout (special tokens,
# punctuation, the characters of TOKENIZER_TEXTS, some multi-character words so that jieba's
# in-vocabulary path is taken, English word pieces).
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["今天", "天气", "非常", "北京", "中文", "模型", "hello", "world", "the", "ro", "##former", "english",
         "##s", "token", "1", "2", "3", "12", "##3", "##4", "4", "5", ".", "%", "a", "b", "c", "##c", "##b"]
TOKENIZER_TEXTS = [
    "今天天气非常好。",
    "我爱北京天安门！",
    "Hello World, RoFormer是一个模型。",
    "混合English和中文，数字123和4.5%。",
    "标点：（括号）《书名》“引号”、顿号；分号？",
    "  空格  和\t制表符 ",
    "未知的字：龘和Zebra",
    "[CLS] 特殊 [MASK] token [SEP]",
    "ABC abc's",
    "",
]


def tokenizer_vocab() -> list[str]:
    chars = sorted({c for t in TOKENIZER_TEXTS for c in t.lower() if not c.isspace() and c not in "龘z[]"})
    vocab = SPECIALS + WORDS + [c for c in chars if c not in WORDS]
    return list(dict.fromkeys(vocab))


@dataclasses.dataclass(frozen=True)
class Variant:
    architecture: str
    description: str
    config: dict = dataclasses.field(default_factory=dict)
    inputs: str = "ids"  # ids | embeds | choices
    labels: str | None = None  # mlm | lm | seqcls-* | tokcls | qa | choices
    tokenizer: bool = False
    generate: bool = False


VARIANTS: dict[str, Variant] = {
    "model": Variant("RoFormerModel", "RoFormerModel (encoder): input_ids, token_type_ids, padded attention_mask"),
    "model-embeds": Variant("RoFormerModel", "RoFormerModel called with inputs_embeds [B, T, embedding_size]",
                            inputs="embeds"),
    "model-project-rotary-value": Variant(
        "RoFormerModel", "RoFormerModel with embedding_size 12 != hidden_size 16 (embeddings_project) and "
        "rotary_value=True (values rotated too)", dict(embedding_size=12, rotary_value=True)),
    "model-decoder": Variant("RoFormerModel", "RoFormerModel with is_decoder=True: causal mask + padding mask, "
                             "one additive finfo.min", dict(is_decoder=True)),
    "mlm": Variant("RoFormerForMaskedLM", "RoFormerForMaskedLM, tied decoder, MLM loss (labels with -100)",
                   labels="mlm"),
    "mlm-untied": Variant("RoFormerForMaskedLM", "RoFormerForMaskedLM, tie_word_embeddings=False, embedding_size 12 "
                          "(decoder [V, E] stored)", dict(tie_word_embeddings=False, embedding_size=12),
                          labels="mlm"),
    "mlm-act-gelu_new": Variant("RoFormerForMaskedLM", "RoFormerForMaskedLM with hidden_act=gelu_new",
                                dict(hidden_act="gelu_new"), labels="mlm"),
    "mlm-tokenizer": Variant(
        "RoFormerForMaskedLM", "RoFormerForMaskedLM on a small Chinese WordPiece vocab.txt; text.ids from "
        "RoFormerTokenizerFast (rjieba pre-tokenizer) on Chinese, mixed and punctuation texts",
        labels="mlm", tokenizer=True),
    "causal-lm": Variant(CLM, "RoFormerForCausalLM, is_decoder=True, LM loss, greedy generation (HF cache)",
                         dict(is_decoder=True, eos_token_id=EOS), labels="lm", generate=True),
    "causal-lm-rotary-value": Variant(
        CLM, "RoFormerForCausalLM, is_decoder=True, rotary_value=True, embedding_size 12, untied decoder, greedy "
        "generation", dict(is_decoder=True, eos_token_id=EOS, rotary_value=True, embedding_size=12,
                           tie_word_embeddings=False), labels="lm", generate=True),
    "seqcls-single": Variant("RoFormerForSequenceClassification", "RoFormerForSequenceClassification, 3 labels, "
                             "single_label inferred from int labels; head on the first token",
                             dict(num_labels=3), labels="seqcls-single"),
    "seqcls-regression": Variant("RoFormerForSequenceClassification", "RoFormerForSequenceClassification, "
                                 "1 label, regression (MSE)", dict(num_labels=1), labels="seqcls-regression"),
    "seqcls-multilabel": Variant("RoFormerForSequenceClassification", "RoFormerForSequenceClassification, "
                                 "4 labels, multi_label_classification (BCE)",
                                 dict(num_labels=4, problem_type="multi_label_classification"),
                                 labels="seqcls-multilabel"),
    "mc": Variant("RoFormerForMultipleChoice", "RoFormerForMultipleChoice [2, 3, 10], RoFormerSequenceSummary "
                  "default ('last' token, no projection), labels", inputs="choices", labels="choices"),
    "mc-summary-first-proj": Variant(
        "RoFormerForMultipleChoice", "RoFormerForMultipleChoice with config extras summary_type='first', "
        "summary_use_proj=True (to hidden_size), summary_activation='tanh'",
        dict(summary_type="first", summary_use_proj=True, summary_proj_to_labels=False, summary_activation="tanh"),
        inputs="choices", labels="choices"),
    "tokcls": Variant("RoFormerForTokenClassification", "RoFormerForTokenClassification, 5 labels, -100 labels",
                      dict(num_labels=5), labels="tokcls"),
    "qa": Variant("RoFormerForQuestionAnswering", "RoFormerForQuestionAnswering, start/end positions, one beyond "
                  "seq_len (clamped and ignored by HF)", labels="qa"),
}


def reinit(lib, model, seed: int) -> None:
    """Linear weights/biases and the MLM bias ~ N(0, 0.2); LayerNorm weight ~ 1 + N(0, 0.2),
    bias ~ N(0, 0.2); word/token-type embeddings ~ N(0, 0.5). The sinusoidal table (an
    nn.Embedding subclass with a fixed parameter) keeps HF's values. Ties are restored."""
    from transformers.models.roformer.modeling_roformer import RoFormerSinusoidalPositionalEmbedding

    lib.randomize_params(model, seed, keep=lambda owner: isinstance(owner, RoFormerSinusoidalPositionalEmbedding))


def inputs_for(lib, v: Variant, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
    x: dict[str, np.ndarray] = {}
    if v.inputs == "choices":
        lengths = np.array([[10, 7, 4], [9, 10, 6]])
        mask = (np.arange(10)[None, None, :] < lengths[..., None]).astype(np.int64)
        mask[1, 2] = mask[1, 2, ::-1].copy()  # one left-padded choice
        x["input_ids"] = lib.masked_ids(rng, mask, cfg.vocab_size, LOW_ID)
        x["attention_mask"] = mask
        x["token_type_ids"] = (np.arange(10)[None, None, :] >= 5).astype(np.int64) * mask
        if v.labels == "choices":
            x["labels"] = rng.integers(0, 3, size=(2,)).astype(np.int64)
        return x
    mask = lib.default_attention_mask()
    if v.inputs == "embeds":
        x["inputs_embeds"] = rng.standard_normal((lib.BATCH, lib.SEQ, cfg.embedding_size))
    else:
        x["input_ids"] = lib.masked_ids(rng, mask, cfg.vocab_size, LOW_ID)
    x["attention_mask"] = mask
    x["token_type_ids"] = rng.integers(0, cfg.type_vocab_size, size=mask.shape).astype(np.int64)
    lib.add_task_labels(x, "lm" if v.labels == "mlm" else v.labels, rng, mask, cfg)
    return x


def run_generate(lib, model, rng, cfg, max_new_tokens: int = 10) -> dict[str, np.ndarray]:
    """HF greedy generate (its KV cache), then one full forward over the result (no position
    ids: RoFormer has none) whose logits the cached step logits must equal."""
    import torch

    prompt_ids, prompt_mask = lib.gpt2_generate_prompts(rng, cfg.vocab_size, low=LOW_ID)
    ids, mask = torch.from_numpy(prompt_ids), torch.from_numpy(prompt_mask)
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)
        full_mask = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        logits = model(seq, attention_mask=full_mask, use_cache=False).logits
    return {"generate.input_ids": prompt_ids, "generate.attention_mask": prompt_mask,
            "generate.sequences": lib.to_numpy(seq), "generate.logits": lib.to_numpy(logits)}


def save_tokenizer(case_dir: Path) -> None:
    """vocab.txt + tokenizer_config.json + special_tokens_map.json (no tokenizer.json: HF's
    RoFormerTokenizerFast cannot serialise its jieba pre-tokenizer; refjax builds it in code)."""
    import tempfile

    from transformers import RoFormerTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path = Path(tmp) / "vocab.txt"
        vocab_path.write_text("\n".join(tokenizer_vocab()) + "\n", encoding="utf-8")
        RoFormerTokenizerFast(str(vocab_path)).save_pretrained(case_dir, legacy_format=True)
    (case_dir / "tokenizer.json").unlink(missing_ok=True)


def tokenizer_goldens(case_dir: Path) -> dict[str, np.ndarray]:
    """ids of TOKENIZER_TEXTS from RoFormerTokenizerFast loaded from the case (fresh, since
    HF's save_pretrained leaves the saving instance with a BertPreTokenizer)."""
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(case_dir)
    if type(fast).__name__ != "RoFormerTokenizerFast":
        raise RuntimeError(f"AutoTokenizer gave {type(fast).__name__}")
    out = {}
    for i, text in enumerate(TOKENIZER_TEXTS):
        ids = fast(text)["input_ids"]
        if ids[0] != fast.cls_token_id or ids[-1] != fast.sep_token_id:
            raise RuntimeError(f"{text!r}: {ids} lacks [CLS] ... [SEP]")
        out[f"text.ids.{i}"] = np.asarray(ids, dtype=np.int64).reshape(-1)
    if not any(fast.unk_token_id in a for a in out.values()):
        raise RuntimeError("no text exercises [UNK]")
    return out


def build(lib, name: str, v: Variant, case_dir: Path):
    import torch
    import transformers

    seed = lib.case_seed(name)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    overrides = dict(v.config)
    if v.tokenizer:
        overrides["vocab_size"] = len(tokenizer_vocab())
    cfg = transformers.RoFormerConfig(**{**BASE_CONFIG, **overrides})
    model = getattr(transformers, v.architecture)._from_config(cfg, attn_implementation="eager").eval()
    reinit(lib, model, seed)
    model.save_pretrained(case_dir, safe_serialization=True)  # before any forward: seq-cls mutates problem_type
    lib.check_reload(model, case_dir)
    record: dict[str, np.ndarray] = {}
    meta_extra: dict[str, str] = {}
    if v.tokenizer:
        save_tokenizer(case_dir)
        record.update(tokenizer_goldens(case_dir))
        meta_extra["texts"] = json.dumps(TOKENIZER_TEXTS, ensure_ascii=False)
    inputs = inputs_for(lib, v, rng, cfg)
    record.update(inputs)
    for dtype_name in lib.DTYPES:
        outputs = lib.finite_forward(name, model, inputs, dtype_name)
        record.update({f"{dtype_name}/{k}": a for k, a in outputs.items()})
        if dtype_name == "float32" and v.generate:
            record.update(run_generate(lib, model, rng, cfg))
    notes = ("positions are 0..T-1 for every row (HF RoFormer has no position_ids; left padding shifts a row); the "
             "sinusoidal table encoder.embed_positions.weight is stored in the checkpoint, float32-rounded values "
             "even in the float64 run")
    if int(transformers.__version__.split(".")[0]) >= 5 and not cfg.tie_word_embeddings:  # --v5 (V5_CASES)
        notes += ("; transformers 5.x ties cls.predictions.decoder.bias to cls.predictions.bias only with "
                  "tie_word_embeddings: untied, the decoder has its own bias (drawn by reinit after the others), "
                  "saved beside cls.predictions.bias, and only it reaches the logits")
    metadata = {"case": name, "family": FAMILY, "architecture": v.architecture,
                "transformers": transformers.__version__, "torch": torch.__version__,
                "description": v.description, "notes": notes, **meta_extra}
    lib.atomic_write_bytes(case_dir / "golden.safetensors", lib.safetensors_bytes(record, metadata))
    return lib.CaseInfo(FAMILY, v.architecture, v.description)


def register(lib) -> None:
    import functools

    for case, variant in VARIANTS.items():
        name = f"{FAMILY}/{case}"
        lib.CASES[name] = functools.partial(build, lib, name, variant)

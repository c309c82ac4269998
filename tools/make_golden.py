#!/usr/bin/env python
"""Generate refjax golden tensors from the Hugging Face reference implementation.

Usage:
    python tools/make_golden.py [--out golden] [--only PATTERN ...]
    /tmp/v5venv/bin/python tools/make_golden.py --v5 [--out golden] [--only PATTERN ...]

Every case builds a small, seeded, randomly initialised Hugging Face model, saves it
in real HF format (config.json + model.safetensors, tokenizer files where the case
has them) under ``<out>/<family>/<case>/`` and records inputs and every output HF
returns, in float32 and float64, in ``golden.safetensors`` next to it. Finally
``<out>/MANIFEST.json`` lists the generator's versions, the cases and the sha256 of
every file. Each ``golden.safetensors`` records the generator's git commit in its
metadata (``generator_commit``, see ``generator_commit()``).

The output is deterministic: running the script twice gives byte-identical files (at one
commit; the reference tier regenerates a sample of cases and compares them with the stored
ones: tests/test_reference_golden.py).
It needs the pinned reference stack (torch 2.13.0, transformers 4.57.6).

``--v5`` builds instead the few cases of ``V5_CASES`` (``<family>/v5-<case>``) with a
transformers 5.x install (a separate venv with torch 2.13.0, see docs/design.md): each is
its 4.57.6 twin's variant, seed and inputs, built, saved and run by v5, so its config.json
is v5's own. A v5 run never touches the 4.57.6 cases and keeps MANIFEST.json's global
``generator`` (the 4.57.6 stack); each v5 case entry records its own versions instead.

Adding a family: write a table of variants and a builder ``build(name, variant,
case_dir) -> CaseInfo`` that writes the case files into ``case_dir``, then register
each variant in ``CASES``. GPT-2 and Arcee live in this file (``register_gpt2``,
``register_arcee``); later families each have their own module ``tools/golden_<family>.py``
with a ``register(lib)`` function (``lib`` is this module: its utilities and ``CASES``),
listed in ``FAMILY_MODULES``, so no single file grows past reading.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import functools
import hashlib
import inspect
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REQUIRED_TRANSFORMERS = "4.57.6"
REQUIRED_TORCH = "2.13.0"
SCRIPT = "tools/make_golden.py"
DTYPES = ("float32", "float64")


def check_versions(v5: bool = False) -> None:
    """Exit with a clear message unless the pinned reference stack is installed
    (``v5``: torch 2.13.0 with any transformers 5.x, for the V5_CASES)."""
    try:
        import torch
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        sys.exit(f"make_golden: needs torch=={REQUIRED_TORCH} and transformers=={REQUIRED_TRANSFORMERS} "
                 f"(pip install '.[reference]'): {e}")
    problems = []
    if v5:
        if transformers.__version__.split(".")[0] != "5":
            problems.append(f"transformers 5.x for --v5 (found {transformers.__version__})")
    elif transformers.__version__ != REQUIRED_TRANSFORMERS:
        problems.append(f"transformers=={REQUIRED_TRANSFORMERS} (found {transformers.__version__})")
    if not torch.__version__.startswith(REQUIRED_TORCH):
        problems.append(f"torch=={REQUIRED_TORCH} (found {torch.__version__})")
    if problems:
        sys.exit("make_golden: golden tensors must come from the pinned reference stack; need "
                 + " and ".join(problems) + ". Install the 'reference' extra.")


# torch and transformers are imported inside functions; main() checks their versions first.
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import safetensors.numpy  # noqa: E402


# --------------------------------------------------------------------------------------
# Small utilities: seeds, atomic writes, canonical safetensors
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CaseInfo:
    """What MANIFEST.json records about a case."""
    family: str
    architecture: str
    description: str


def case_seed(name: str) -> int:
    """A stable per-case seed (Python's hash() is salted per process; crc32 is not). A v5 case
    (V5_CASES) takes its 4.57.6 twin's seed: same weights, same inputs, comparable outputs."""
    return zlib.crc32(V5_CASES.get(name, name).encode()) & 0x7FFFFFFF


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory + os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=None)
def generator_commit() -> str:
    """The git commit of the generator (this script and tools/golden_*.py), with
    "+dirty" when tools/ differs from it, or "unknown" outside a git checkout."""
    import subprocess

    tools = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tools, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Serialise with safetensors.numpy, then make the header canonical. The metadata gains
    ``generator_commit`` (every golden file names the generator that wrote it).

    safetensors keeps ``__metadata__`` in a Rust HashMap, so with several metadata keys
    their order (and hence the file bytes) changes from run to run. We re-emit the
    header with the metadata keys sorted; tensor entries and data are untouched.
    """
    metadata = {**metadata, "generator_commit": generator_commit()}
    raw = safetensors.numpy.save({k: np.array(v, order="C", copy=True) for k, v in tensors.items()},
                                 metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    out = struct.pack("<Q", len(text)) + text + data
    # Round trip: same tensors (NaN where HF gave NaN), same metadata.
    back = safetensors.numpy.load(out)
    assert back.keys() == tensors.keys() and all(
        back[k].dtype == tensors[k].dtype and np.array_equal(back[k], tensors[k], equal_nan=True) for k in tensors)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Tokenizer (shared by the GPT-2 LM cases)
# --------------------------------------------------------------------------------------

TOKENIZER_VOCAB_SIZE = 320
ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 319

TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello again, world. Goodbye, world?",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "In the beginning the Universe was created. This has made a lot of people very angry.",
    "A tokenizer splits text into tokens; the model then maps each token to a vector.",
    "Numbers like 12, 345 and 6789 appear in the text too: 3.14159 and 2.71828.",
    "  leading spaces,\ttabs\tand\nnew\nlines matter for byte-level BPE.",
    "Naïve café, déjà vu, Straße, Ørsted, façade, jalapeño, résumé.",
    "東京タワー と 富士山。 Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "Emoji: 😀 😃 🎉 👍🏽 ❤️ 👨‍👩‍👧 🚀 and symbols € £ ¥ © ™ → ≠ ∞.",
] * 4

# Texts whose HF token ids are recorded (English, spaces, punctuation, unicode, emoji).
TOKENIZER_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "multiple   spaces\tand\ttabs\nnew line\n\n",
    "Punctuation: (a), [b]; {c}? \"quoted\" 'single' -- dash... !?",
    "Naïve café déjà vu, Straße, 東京タワー, Привет",
    "emoji 😀🎉👍🏽 and ZWJ 👨‍👩‍👧 plus €100",
    "text with a special token <|endoftext|> in the middle",
    "unseen words: xylophone quizzical zephyr",
    "",
]


@functools.lru_cache(maxsize=None)
def train_bpe_tokenizer():
    """Train the tiny byte-level BPE (320 ids: 256 bytes + 63 merges + <|endoftext|>=319)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - 1,  # the special token is appended afterwards
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    tok.add_special_tokens([ENDOFTEXT])
    if tok.get_vocab_size() != TOKENIZER_VOCAB_SIZE or tok.token_to_id(ENDOFTEXT) != ENDOFTEXT_ID:
        raise RuntimeError(
            f"tokenizer training gave vocab size {tok.get_vocab_size()} and {ENDOFTEXT} id "
            f"{tok.token_to_id(ENDOFTEXT)}; need {TOKENIZER_VOCAB_SIZE} and {ENDOFTEXT_ID}")
    return tok


def save_gpt2_tokenizer(case_dir: Path, fmt: str) -> None:
    """Save the BPE tokenizer as tokenizer.json ("json") or vocab.json + merges.txt ("vocab-merges")."""
    from transformers import GPT2Tokenizer, GPT2TokenizerFast

    tok = train_bpe_tokenizer()
    special = dict(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
    if fmt == "json":
        fast = GPT2TokenizerFast(tokenizer_object=tok, **special)
        fast.save_pretrained(case_dir, legacy_format=False)  # tokenizer.json only, no vocab/merges
    elif fmt == "vocab-merges":
        # Like the original GPT-2 files: vocab.json holds every id, special token included.
        with tempfile.TemporaryDirectory() as tmp:
            vocab = dict(sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]))
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            merges = json.loads(tok.to_str())["model"]["merges"]
            lines = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in merges]
            (Path(tmp) / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            slow = GPT2Tokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), **special)
            slow.save_pretrained(case_dir)
        (case_dir / "tokenizer.json").unlink(missing_ok=True)
    else:
        raise ValueError(f"unknown tokenizer format {fmt!r}")


def tokenizer_goldens(case_dir: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Encode TOKENIZER_TEXTS with AutoTokenizer from case_dir; cross-check slow/fast/raw."""
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(case_dir)
    others = [(train_bpe_tokenizer(), "tokenizers")]
    if (case_dir / "vocab.json").exists():  # the slow tokenizer cannot read tokenizer.json
        others.append((AutoTokenizer.from_pretrained(case_dir, use_fast=False), "slow tokenizer"))
    out = {}
    for i, text in enumerate(TOKENIZER_TEXTS):
        ids = fast(text)["input_ids"]
        for tok, who in others:
            other = tok.encode(text).ids if who == "tokenizers" else tok(text)["input_ids"]
            if other != ids:
                raise RuntimeError(f"{case_dir}: {who} disagrees with the fast tokenizer on {text!r}")
        if fast.decode(ids) != text:
            raise RuntimeError(f"{case_dir}: decode(encode({text!r})) = {fast.decode(ids)!r}")
        out[f"text.ids.{i}"] = np.asarray(ids, dtype=np.int64).reshape(-1)
    return out, list(TOKENIZER_TEXTS)


# --------------------------------------------------------------------------------------
# GPT-2
# --------------------------------------------------------------------------------------

# Small sizes keep golden/ small (about 100 KiB a case); the two tokenizer cases need the
# tokenizer's 320 ids; the layer-index cases use 3 layers so the 1/(layer+1) scale varies more.
GPT2_BASE_CONFIG = dict(
    vocab_size=64, n_positions=48, n_embd=16, n_layer=2, n_head=2,
    layer_norm_epsilon=1e-5, bos_token_id=63, eos_token_id=63, initializer_range=0.2,
)
TOKENIZER_CONFIG = dict(vocab_size=TOKENIZER_VOCAB_SIZE, bos_token_id=ENDOFTEXT_ID, eos_token_id=ENDOFTEXT_ID)
LM = "GPT2LMHeadModel"


@dataclasses.dataclass(frozen=True)
class GPT2Variant:
    """One GPT-2 case: HF class, config overrides, which inputs and labels it gets."""
    architecture: str
    description: str
    config: dict = dataclasses.field(default_factory=dict)
    inputs: str = "ids"            # ids | extras | embeds | choices
    labels: str | None = None      # lm | choices | seqcls-single | seqcls-regression | ...
    tokenizer: str | None = None   # None | json | vocab-merges

    @property
    def generate(self) -> bool:
        return self.architecture == LM


def _lm(description: str, **config) -> GPT2Variant:
    return GPT2Variant(LM, description, dict(pad_token_id=0, **config), labels="lm")


GPT2_ACTIVATIONS = ["gelu", "relu", "silu", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "tanh", "sigmoid"]

GPT2_VARIANTS: dict[str, GPT2Variant] = {
    "model": GPT2Variant("GPT2Model", "GPT2Model base: input_ids + padded attention_mask, activation gelu_new"),
    "model-extras": GPT2Variant(
        "GPT2Model", "GPT2Model with token_type_ids (embedded with wte) and explicit mask-derived position_ids",
        inputs="extras"),
    "model-embeds": GPT2Variant(
        "GPT2Model", "GPT2Model called with inputs_embeds + attention_mask instead of input_ids",
        inputs="embeds"),
    "lm": GPT2Variant(
        LM, "GPT2LMHeadModel with LM loss (labels with -100), tokenizer.json, greedy generation",
        dict(pad_token_id=0, **TOKENIZER_CONFIG), labels="lm", tokenizer="json"),
    "lm-vocab-merges": GPT2Variant(
        LM, "GPT2LMHeadModel like lm (other seed); tokenizer as vocab.json + merges.txt",
        dict(pad_token_id=0, **TOKENIZER_CONFIG), labels="lm", tokenizer="vocab-merges"),
    "lm-inverse-layer-idx": _lm("GPT2LMHeadModel with scale_attn_by_inverse_layer_idx=True",
                                scale_attn_by_inverse_layer_idx=True, n_layer=3),
    "lm-upcast": _lm("GPT2LMHeadModel with reorder_and_upcast_attn=True (HF fails in float64)",
                     reorder_and_upcast_attn=True),
    "lm-inverse-upcast": _lm("GPT2LMHeadModel with scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn",
                             scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True, n_layer=3),
    "lm-noscale": _lm("GPT2LMHeadModel with scale_attn_weights=False (no 1/sqrt(head_dim))",
                      scale_attn_weights=False),
    "lm-untied": _lm("GPT2LMHeadModel with tie_word_embeddings=False (lm_head.weight stored)",
                     tie_word_embeddings=False),
    "lm-n-inner": _lm("GPT2LMHeadModel with n_inner=24 (MLP width not 4*n_embd)", n_inner=24),
    **{f"lm-act-{act}": _lm(f"GPT2LMHeadModel with activation_function={act}", activation_function=act)
       for act in GPT2_ACTIVATIONS},
    "double-heads": GPT2Variant(
        "GPT2DoubleHeadsModel",
        "GPT2DoubleHeadsModel: LM + multiple-choice head (cls_index, projection to 1 label, tanh), both losses",
        dict(summary_type="cls_index", summary_use_proj=True, summary_proj_to_labels=True, num_labels=1,
             summary_activation="tanh"),
        inputs="choices", labels="choices"),
    "double-heads-noproj": GPT2Variant(
        "GPT2DoubleHeadsModel",
        "GPT2DoubleHeadsModel, cls_index summary without projection or activation (mc_logits are hidden-sized)",
        dict(summary_type="cls_index", summary_use_proj=False, summary_activation=None),
        inputs="choices", labels="choices"),
    "seqcls-single": GPT2Variant(
        "GPT2ForSequenceClassification",
        "GPT2ForSequenceClassification, 3 labels, problem_type inferred single_label from int labels, "
        "pooling at the last non-pad token",
        dict(num_labels=3, pad_token_id=0), labels="seqcls-single"),
    "seqcls-regression": GPT2Variant(
        "GPT2ForSequenceClassification",
        "GPT2ForSequenceClassification, 1 label, problem_type inferred regression (MSE)",
        dict(num_labels=1, pad_token_id=0), labels="seqcls-regression"),
    "seqcls-multilabel": GPT2Variant(
        "GPT2ForSequenceClassification",
        "GPT2ForSequenceClassification, 4 labels, multi_label_classification (BCE with logits)",
        dict(num_labels=4, pad_token_id=0, problem_type="multi_label_classification"),
        labels="seqcls-multilabel"),
    "tokcls": GPT2Variant(
        "GPT2ForTokenClassification", "GPT2ForTokenClassification, 5 labels, labels with -100",
        dict(num_labels=5), labels="tokcls"),
    "qa": GPT2Variant(
        "GPT2ForQuestionAnswering",
        "GPT2ForQuestionAnswering with start/end positions, one beyond seq_len (clamped and ignored by HF)",
        labels="qa"),
}

# Default inputs: batch 4 x seq 12. Rows: all real, right-padded, left-padded, masked run in the middle.
BATCH, SEQ = 4, 12


def default_attention_mask() -> np.ndarray:
    mask = np.ones((BATCH, SEQ), dtype=np.int64)
    mask[1, -4:] = 0
    mask[2, :3] = 0
    mask[3, 4:7] = 0
    return mask


def masked_ids(rng: np.random.Generator, mask: np.ndarray, vocab: int, low: int = 1) -> np.ndarray:
    """Real ids from [low, vocab); pad (0) where mask is 0."""
    return np.where(mask == 1, rng.integers(low, vocab, size=mask.shape), 0).astype(np.int64)


def hf_position_ids(mask: np.ndarray) -> np.ndarray:
    """position_ids as HF generate builds them: cumsum(mask)-1, masked positions set to 1."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def token_labels(rng: np.random.Generator, values: np.ndarray, mask: np.ndarray, n_ignored: int) -> np.ndarray:
    """values with -100 at every padded position and at n_ignored random real positions."""
    labels = np.where(mask == 1, values, -100).astype(np.int64)
    real = np.argwhere(mask.reshape(-1) == 1).reshape(-1)
    labels.reshape(-1)[rng.choice(real, size=n_ignored, replace=False)] = -100
    return labels


def gpt2_inputs(v: GPT2Variant, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
    """Forward inputs (HF keyword names) for a variant, as numpy arrays."""
    vocab = cfg.vocab_size
    x: dict[str, np.ndarray] = {}
    if v.inputs == "choices":
        # [batch=2, choices=3, seq=10]; mostly right padding, one left-padded choice.
        lengths = np.array([[10, 7, 4], [9, 10, 6]])
        mask = (np.arange(10)[None, None, :] < lengths[..., None]).astype(np.int64)
        mask[1, 2] = mask[1, 2, ::-1].copy()  # left-padded choice
        x["input_ids"] = masked_ids(rng, mask, vocab)
        x["attention_mask"] = mask
        # index of the last real token of each choice
        x["mc_token_ids"] = (9 - np.argmax(mask[..., ::-1], axis=-1)).astype(np.int64)
    else:
        mask = default_attention_mask()
        if v.inputs == "embeds":
            x["inputs_embeds"] = rng.standard_normal((BATCH, SEQ, cfg.n_embd))  # float64
        else:
            x["input_ids"] = masked_ids(rng, mask, vocab)
        x["attention_mask"] = mask
        if v.inputs == "extras":
            x["token_type_ids"] = rng.integers(0, vocab, size=mask.shape).astype(np.int64)
            x["position_ids"] = hf_position_ids(mask)

    add_task_labels(x, v.labels, rng, mask, cfg)
    return x


def add_task_labels(x: dict[str, np.ndarray], kind: str | None, rng: np.random.Generator,
                    mask: np.ndarray, cfg) -> None:
    """Add the labels of a task head (HF keyword names) to the inputs ``x`` in place."""
    if kind in ("lm", "choices"):
        x["labels"] = token_labels(rng, x["input_ids"], mask, n_ignored=3)
    if kind == "choices":
        x["mc_labels"] = rng.integers(0, 3, size=(2,)).astype(np.int64)
    elif kind == "seqcls-single":
        x["labels"] = rng.integers(0, cfg.num_labels, size=(BATCH,)).astype(np.int64)
    elif kind == "seqcls-regression":
        x["labels"] = rng.standard_normal((BATCH,))  # float64
    elif kind == "seqcls-multilabel":
        x["labels"] = rng.integers(0, 2, size=(BATCH, cfg.num_labels)).astype(np.float64)
    elif kind == "tokcls":
        x["labels"] = token_labels(rng, rng.integers(0, cfg.num_labels, size=mask.shape), mask, n_ignored=3)
    elif kind == "qa":
        x["start_positions"] = np.array([2, 0, SEQ + 5, 7], dtype=np.int64)   # SEQ+5 is clamped + ignored
        x["end_positions"] = np.array([5, SEQ - 1, 9, SEQ + 2], dtype=np.int64)


def gpt2_generate_prompts(rng: np.random.Generator, vocab: int, low: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt batch [3, 7]: full, padded by 2, padded by 4 (pad id 0); real ids from [low, vocab)."""
    mask = np.ones((3, 7), dtype=np.int64)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return masked_ids(rng, mask, vocab, low), mask


def randomize_params(model, seed: int, keep: Callable[[Any], bool] = lambda owner: False) -> None:
    """Embeddings ~ N(0, 0.5); LayerNorm weights ~ 1 + N(0, 0.2); every other parameter
    ~ N(0, 0.2), drawn in `named_parameters` order from one seeded generator (tied
    parameters appear once; the ties are restored after). Parameters whose module
    `keep(owner)` accepts keep their values and draw no noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            if keep(owner):
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if isinstance(owner, torch.nn.Embedding):
                p.copy_(0.5 * noise)
            elif isinstance(owner, torch.nn.LayerNorm) and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    model.tie_weights()


def finite_forward(name: str, model, inputs: dict[str, np.ndarray], dtype_name: str) -> dict[str, np.ndarray]:
    """`run_forward` in `dtype_name`, refusing non-finite HF outputs (a golden must be finite)."""
    import torch

    dtype = getattr(torch, dtype_name)
    model.to(dtype)
    outputs = run_forward(model, inputs, dtype)
    bad = [k for k, a in outputs.items() if a.dtype.kind == "f" and not np.all(np.isfinite(a))]
    if bad:
        raise RuntimeError(f"{name}: HF {dtype_name} outputs are not finite: {bad}")
    return outputs


def reinit_gpt2(model, seed: int) -> None:
    """Re-initialise every parameter so that attention is peaked and every flag shows.

    Linear/Conv1D weights and biases ~ N(0, 0.2); LayerNorm weight ~ 1 + N(0, 0.2),
    bias ~ N(0, 0.2); wte/wpe ~ N(0, 0.5). Tied weights stay tied (lm_head <- wte).
    """
    randomize_params(model, seed)
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is not None and lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    if lm_head is not None and tied != model.config.tie_word_embeddings:
        raise RuntimeError(f"lm_head tied={tied} but config.tie_word_embeddings={model.config.tie_word_embeddings}")


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def run_forward(model, inputs: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    """One no-grad forward with all outputs; floating inputs cast to ``dtype``."""
    import torch

    kwargs = {}
    for k, v in inputs.items():
        t = torch.from_numpy(v)
        kwargs[k] = t.to(dtype) if t.is_floating_point() else t
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # no past_key_values in the outputs
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True, output_attentions=True, return_dict=True)
    arrays = {}
    for field, value in out.items():
        if isinstance(value, torch.Tensor):
            arrays[field] = to_numpy(value)
        elif isinstance(value, tuple):
            for i, t in enumerate(value):
                arrays[f"{field}.{i}"] = to_numpy(t)
        else:
            raise TypeError(f"unexpected output field {field}: {type(value).__name__}")
    return arrays


def run_generate(model, prompt_ids: np.ndarray, prompt_mask: np.ndarray, pad: int, eos: int,
                 max_new_tokens: int = 10) -> dict[str, np.ndarray]:
    """Greedy generate (HF KV cache), plus full-forward logits of the result for cache checks."""
    import torch

    ids, mask = torch.from_numpy(prompt_ids), torch.from_numpy(prompt_mask)
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=pad, eos_token_id=eos)
        full_mask = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        pos = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
        logits = model(seq, attention_mask=full_mask, position_ids=pos, use_cache=False).logits
    return {
        "generate.input_ids": prompt_ids,
        "generate.attention_mask": prompt_mask,
        "generate.sequences": to_numpy(seq),
        # full forward over the returned sequences (mask = prompt mask + ones)
        "generate.logits": to_numpy(logits),
    }


GPT2_V5_NOTE = (
    "transformers 5.x: eager attention adds one finfo.min mask for pad and future keys (4.x: a causal where, then "
    "the padding mask), so a query with no real key (a left-pad position) attends uniformly to all T keys, not "
    "to its past; outputs at those positions differ from the 4.57.6 twin's, and so does a loss that reads them "
    "(the last left-pad position predicts the first real token); refjax reads transformers_version >= 5 in "
    "config.json as this mask (params/gpt2.py: future_fill)")


def build_gpt2(name: str, v: GPT2Variant, case_dir: Path) -> CaseInfo:
    """Build, save and record one GPT-2 case into case_dir."""
    import torch
    import transformers

    seed = case_seed(name)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = transformers.GPT2Config(**{**GPT2_BASE_CONFIG, **v.config})
    act = cfg.activation_function
    if act not in transformers.activations.ACT2FN:
        raise KeyError(f"activation {act!r} is not in transformers.activations.ACT2FN")
    model = getattr(transformers, v.architecture)._from_config(cfg, attn_implementation="eager")
    model.eval()
    reinit_gpt2(model, seed)
    model.save_pretrained(case_dir, safe_serialization=True)  # before any forward: seq-cls mutates problem_type
    if v.tokenizer:
        save_gpt2_tokenizer(case_dir, v.tokenizer)

    inputs = gpt2_inputs(v, rng, cfg)
    notes = []
    # GPT2DoubleHeads without projection: mc_logits are [batch, choices, hidden], so the
    # CrossEntropy over mc_labels [batch] has mismatched batch sizes and HF raises.
    if v.labels == "choices" and not cfg.summary_use_proj:
        try:
            run_forward(model, inputs, torch.float32)
        except ValueError as e:
            del inputs["mc_labels"]
            notes.append(f"mc_labels dropped: HF raises {type(e).__name__}: {e}")

    if int(transformers.__version__.split(".")[0]) >= 5:  # --v5 (V5_CASES): what differs from the 4.57.6 twin
        notes.append(GPT2_V5_NOTE)
    record: dict[str, np.ndarray] = dict(inputs)
    meta_extra: dict[str, str] = {}
    if v.tokenizer:
        ids, texts = tokenizer_goldens(case_dir)
        record.update(ids)
        meta_extra["texts"] = json.dumps(texts, ensure_ascii=False)

    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        model.to(dtype)
        try:
            outputs = run_forward(model, inputs, dtype)
        except RuntimeError as e:
            if dtype_name == "float64" and cfg.reorder_and_upcast_attn:
                notes.append(f"no float64 outputs: HF raises RuntimeError with reorder_and_upcast_attn: {e}")
                continue
            raise
        record.update({f"{dtype_name}/{k}": a for k, a in outputs.items()})
        if dtype_name == "float32" and v.generate:
            prompt_ids, prompt_mask = gpt2_generate_prompts(rng, cfg.vocab_size)
            record.update(run_generate(model, prompt_ids, prompt_mask, pad=0, eos=cfg.eos_token_id))

    metadata = {
        "case": name, "family": "gpt2", "architecture": v.architecture,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "description": v.description, **meta_extra,
    }
    if notes:
        metadata["notes"] = "; ".join(notes)
    atomic_write_bytes(case_dir / "golden.safetensors", safetensors_bytes(record, metadata))
    return CaseInfo("gpt2", v.architecture, v.description)


# --------------------------------------------------------------------------------------
# Arcee (AFM-4.5B architecture)
# --------------------------------------------------------------------------------------

# Tiny AFM-like config: GQA (4 query heads, 2 kv heads), head_dim 8 != hidden/heads on
# purpose, relu2 MLP without gate, untied head. bos/eos/pad are 1/2/0; real input ids are
# drawn from [ARCEE_LOW_ID, vocab) so they never collide with a special id.
ARCEE_BASE_CONFIG = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, hidden_act="relu2", max_position_embeddings=64, rms_norm_eps=1e-5,
    rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
ARCEE_LOW_ID = 3
ARCEE_LM = "ArceeForCausalLM"
# The long inputs of the rope cases: batch 2 x seq 100, row 1 left-padded by 7.
ARCEE_LONG_BATCH, ARCEE_LONG_SEQ, ARCEE_LONG_PAD = 2, 100, 7
# Rope cases whose max_position_embeddings is not the point of the case get 128 >= ARCEE_LONG_SEQ.
ARCEE_LONG_MAX_POSITIONS = 128
# Rope cases use vocab 32 (logits [2, 100, vocab] in two dtypes dominate their size) and record
# no attentions, no generation and only the first and last hidden state in float64.
ARCEE_LONG_VOCAB = 32

ARCEE_FP64_ROPE_NOTE = (
    "float64 outputs keep HF's float32 RoPE: the rotary forward computes cos/sin from inv_freq.float() "
    "and position_ids.float() in float32 and only then casts them to the model dtype")

ARCEE_FP64_PRECISION_NOTE = (
    "float64 outputs are only float32-accurate in places: ArceeRMSNorm normalises in float32 and eager attention "
    "runs softmax(dtype=float32) before casting back")
ARCEE_FP64_NAN_NOTE = (
    "float64 NaN, kept on purpose in this one case: the eager mask adds finfo(float64).min, which "
    "softmax(dtype=float32) turns into -inf, so a fully masked query row (a left-pad position: causal, every key "
    "it sees is padding) is NaN from layer 0 on; its NaN values then poison every query of that batch row in the "
    "next layer (0 x NaN), and the loss. Measured with torch 2.13.0 / transformers 4.57.6: the layer-0 NaN "
    "queries are exactly the fully masked ones; float32, or float64 with those rows right-padded, is finite. The "
    "NaN entries are declared in metadata (declared_nonfinite) and skipped by refjax verify")
ARCEE_FP64_INPUTS_NOTE = (
    "float64 forward inputs (float64.*) are the shared ones with each left-padded row rotated to right padding: "
    "HF's float64 Arcee returns NaN for a fully masked query row (see arcee/causal-lm), right padding has none")
ARCEE_PAD_NOTE = (
    "forward position_ids default to arange(T) for every row (generate derives cumsum(mask)-1 instead); a fully "
    "masked query row (a left-pad position) attends uniformly to all T keys, future ones included, because every "
    "score + finfo.min rounds to finfo.min")

# Llama-3 style tokenizer: byte-level BPE behind Llama-3's split regex, bos prepended by a
# TemplateProcessing post-processor. Special ids match ARCEE_BASE_CONFIG's pad/bos/eos.
ARCEE_PAD, ARCEE_BOS, ARCEE_EOS = "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
ARCEE_TOKENIZER_TEXTS = [t.replace(ENDOFTEXT, ARCEE_EOS) for t in TOKENIZER_TEXTS] + [
    "digits split in threes: 1234567 and 3.14159, year 2025",
    "I'm sure they'll say it's fine; we've said THEY'RE DON'T",
]


@dataclasses.dataclass(frozen=True)
class ArceeVariant:
    """One Arcee case: HF class, config overrides, inputs, labels, checkpoint format."""
    architecture: str
    description: str
    config: dict = dataclasses.field(default_factory=dict)
    inputs: str = "ids"              # ids (batch 4 x 12) | long (batch 2 x 100, rope cases)
    labels: str | None = None        # lm | seqcls-single | seqcls-regression | seqcls-multilabel | tokcls | qa
    tokenizer: bool = False          # Llama-3 style tokenizer.json + text.ids goldens
    checkpoint: str = "single"       # single | sharded (max_shard_size=20KB) | bf16
    max_new_tokens: int = 10         # greedy generation for ArceeForCausalLM (0: none)
    # float64 forward inputs: "right-padded" (left-padded rows rotated: HF float64 finite) or
    # "shared" (the float32 inputs: HF float64 gives NaN, declared in metadata; one case shows it)
    float64_inputs: str = "right-padded"

    @property
    def generate(self) -> bool:
        return self.architecture == ARCEE_LM and self.max_new_tokens > 0

    @property
    def rope_type(self) -> str:
        scaling = self.config.get("rope_scaling") or {}
        return scaling.get("rope_type", scaling.get("type", "default"))


def _arcee_lm(description: str, **config) -> ArceeVariant:
    return ArceeVariant(ARCEE_LM, description, config, labels="lm")


def _arcee_rope(description: str, rope_scaling: dict, max_position_embeddings: int = ARCEE_LONG_MAX_POSITIONS,
                **config) -> ArceeVariant:
    return ArceeVariant(
        ARCEE_LM, f"{description}; vocab {ARCEE_LONG_VOCAB}, long input (batch 2 x seq {ARCEE_LONG_SEQ}, row 1 "
        f"left-padded by {ARCEE_LONG_PAD}), rope.cos/rope.sin recorded; no attentions, no generation",
        dict(rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings,
             vocab_size=ARCEE_LONG_VOCAB, **config),
        inputs="long", labels="lm", max_new_tokens=0)


ARCEE_VARIANTS: dict[str, ArceeVariant] = {
    "model": ArceeVariant("ArceeModel", "ArceeModel base: GQA 4/2 heads, head_dim 8, relu2 MLP, default RoPE"),
    "causal-lm": dataclasses.replace(
        _arcee_lm("ArceeForCausalLM with LM loss (labels with -100), untied lm_head, greedy generation; float64 on "
                  "the left-padded inputs too, where HF's float64 returns NaN (declared_nonfinite)"),
        float64_inputs="shared"),
    "causal-lm-tied": _arcee_lm("ArceeForCausalLM with tie_word_embeddings=True (no lm_head.weight stored)",
                                tie_word_embeddings=True),
    "causal-lm-tokenizer": ArceeVariant(
        ARCEE_LM, "ArceeForCausalLM, vocab 320 with a Llama-3 style byte-level BPE tokenizer.json "
        f"(split regex, {ARCEE_BOS} prepended by TemplateProcessing), text.ids from AutoTokenizer",
        dict(vocab_size=TOKENIZER_VOCAB_SIZE), labels="lm", tokenizer=True),
    "mha": _arcee_lm("ArceeForCausalLM with num_key_value_heads=4 (MHA)", num_key_value_heads=4),
    "mqa": _arcee_lm("ArceeForCausalLM with num_key_value_heads=1 (MQA)", num_key_value_heads=1),
    "bias": _arcee_lm("ArceeForCausalLM with attention_bias=True (q/k/v/o) and mlp_bias=True (up/down)",
                      attention_bias=True, mlp_bias=True),
    "act-silu": _arcee_lm("ArceeForCausalLM with hidden_act=silu", hidden_act="silu"),
    "seqcls-single": ArceeVariant(
        "ArceeForSequenceClassification",
        "ArceeForSequenceClassification (GenericForSequenceClassification), 3 labels, problem_type inferred "
        "single_label from int labels, pooling at the rightmost token != pad_token_id, score without bias",
        dict(num_labels=3), labels="seqcls-single"),
    "seqcls-regression": ArceeVariant(
        "ArceeForSequenceClassification",
        "ArceeForSequenceClassification, 1 label, problem_type inferred regression (MSE)",
        dict(num_labels=1), labels="seqcls-regression"),
    "seqcls-multilabel": ArceeVariant(
        "ArceeForSequenceClassification",
        "ArceeForSequenceClassification, 4 labels, multi_label_classification (BCE with logits)",
        dict(num_labels=4, problem_type="multi_label_classification"), labels="seqcls-multilabel"),
    "tokcls": ArceeVariant(
        "ArceeForTokenClassification",
        "ArceeForTokenClassification (GenericForTokenClassification), 5 labels, labels with -100, score with bias",
        dict(num_labels=5), labels="tokcls"),
    "qa": ArceeVariant(
        "ArceeForQuestionAnswering",
        "ArceeForQuestionAnswering (GenericForQuestionAnswering; base model stored under 'transformer.', not "
        "'model.'), start/end positions, one beyond seq_len (clamped and ignored by HF)",
        labels="qa"),
    "rope-linear": _arcee_rope("ArceeForCausalLM, rope_scaling linear factor 2",
                               {"rope_type": "linear", "factor": 2.0}),
    "rope-dynamic": _arcee_rope(
        f"ArceeForCausalLM, rope_scaling dynamic (NTK) factor 2, max_position_embeddings 64 < seq "
        f"{ARCEE_LONG_SEQ} so HF recomputes inv_freq for seq_len {ARCEE_LONG_SEQ} in the forward (rope.inv_freq_used)",
        {"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64),
    "rope-yarn": _arcee_rope(
        "ArceeForCausalLM, rope_scaling yarn like AFM-4.5B's config ('type' and 'rope_type', mscale 1.0 without "
        "mscale_all_dim, which HF ignores): factor 4, original_max_position_embeddings 16, beta_fast 32, beta_slow 1; "
        "attention_factor defaults to 0.1*ln(4)+1",
        {"rope_type": "yarn", "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0}),
    "rope-yarn-attention-factor": _arcee_rope(
        "ArceeForCausalLM, rope_scaling yarn with explicit attention_factor 1.3 (wins over mscale/mscale_all_dim), "
        "factor 4, original_max_position_embeddings 64 (a fractional ramp: correction range [0, 2])",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.3,
         "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}),
    "rope-yarn-mscale": _arcee_rope(
        "ArceeForCausalLM, rope_scaling yarn without attention_factor: attention_factor = "
        "get_mscale(4, mscale=1)/get_mscale(4, mscale_all_dim=0.5); truncate=False (unrounded correction range), "
        "factor 4, original_max_position_embeddings 64, max_position_embeddings 256 (= 64 x 4)",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
         "mscale_all_dim": 0.5, "truncate": False}, max_position_embeddings=256),
    "rope-longrope": _arcee_rope(
        "ArceeForCausalLM, rope_scaling longrope (Phi-3 style: original_max_position_embeddings 16 at the config's "
        "top level, where HF reads it; factor = max_position_embeddings/16 = 8 sets attention_factor "
        f"sqrt(1 + ln 8/ln 16)); the {ARCEE_LONG_SEQ}-token forward uses long_factor (rope.inv_freq_used)",
        {"rope_type": "longrope", "short_factor": [1.0, 1.25, 1.5, 2.0], "long_factor": [1.5, 3.0, 5.0, 11.0]},
        original_max_position_embeddings=16),
    "rope-llama3": _arcee_rope(
        "ArceeForCausalLM, rope_scaling llama3 factor 8, low_freq_factor 1, high_freq_factor 4, "
        "original_max_position_embeddings 64 (so the 4 frequencies hit all three regimes: kept, smoothed, divided)",
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64}),
    "sharded": ArceeVariant(
        ARCEE_LM, "ArceeForCausalLM saved with save_pretrained(max_shard_size='20KB'): "
        "model.safetensors.index.json + 2 shards", labels="lm", checkpoint="sharded"),
    "bf16": ArceeVariant(
        ARCEE_LM, "ArceeForCausalLM checkpoint stored in bfloat16; outputs from that checkpoint loaded with "
        "from_pretrained(dtype=float32) (exact upcast), then cast to float64", labels="lm", checkpoint="bf16"),
}


def arcee_long_attention_mask() -> np.ndarray:
    mask = np.ones((ARCEE_LONG_BATCH, ARCEE_LONG_SEQ), dtype=np.int64)
    mask[1, :ARCEE_LONG_PAD] = 0
    return mask


def right_padded(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs with each left-padded row rotated so that its padding is on the right:
    every [B, T] input (ids, mask, token labels) of that row moves along; others are kept."""
    mask = inputs["attention_mask"]
    lead = np.argmax(mask == 1, axis=-1)  # leading pad positions per row
    out = {}
    for k, a in inputs.items():
        if a.shape[:2] == mask.shape:
            a = np.stack([np.roll(a[b], -int(lead[b]), axis=0) for b in range(mask.shape[0])])
        out[k] = a
    return out


def fully_masked_rows(mask: np.ndarray) -> list[int]:
    """Batch rows with a query that sees only padding under the causal mask (a leading pad)."""
    return [b for b in range(mask.shape[0]) if mask[b, 0] == 0]


def arcee_inputs(v: ArceeVariant, rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
    """Forward inputs (HF keyword names) for a variant, as numpy arrays."""
    mask = arcee_long_attention_mask() if v.inputs == "long" else default_attention_mask()
    x = {"input_ids": masked_ids(rng, mask, cfg.vocab_size, low=ARCEE_LOW_ID), "attention_mask": mask}
    add_task_labels(x, v.labels, rng, mask, cfg)
    return x


@functools.lru_cache(maxsize=None)
def train_llama3_style_tokenizer():
    """Train a Llama-3 style byte-level BPE: 320 ids = <|pad|>, bos, eos (ids 0, 1, 2) + 256 bytes + 61 merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[ARCEE_PAD, ARCEE_BOS, ARCEE_EOS],  # ids 0, 1, 2
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    bos_id = tok.token_to_id(ARCEE_BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{ARCEE_BOS}:0 $A:0", pair=f"{ARCEE_BOS}:0 $A:0 {ARCEE_BOS}:1 $B:1",
                                      special_tokens=[(ARCEE_BOS, bos_id)]),
    ])
    # Llama-3's BPE model has ignore_merges (a pre-token found whole in the vocab skips merging).
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    ids = [tok.token_to_id(t) for t in (ARCEE_PAD, ARCEE_BOS, ARCEE_EOS)]
    want = [ARCEE_BASE_CONFIG[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")]
    if tok.get_vocab_size() != TOKENIZER_VOCAB_SIZE or ids != want:
        raise RuntimeError(f"tokenizer training gave vocab size {tok.get_vocab_size()} and pad/bos/eos ids {ids}; "
                           f"need {TOKENIZER_VOCAB_SIZE} and {want}")
    return tok


def save_arcee_tokenizer(case_dir: Path) -> None:
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) as Llama-3 ships it: no vocab/merges."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=train_llama3_style_tokenizer(), bos_token=ARCEE_BOS,
                                   eos_token=ARCEE_EOS, pad_token=ARCEE_PAD, clean_up_tokenization_spaces=False)
    fast.save_pretrained(case_dir, legacy_format=False)


def arcee_tokenizer_goldens(case_dir: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Encode ARCEE_TOKENIZER_TEXTS with AutoTokenizer from case_dir (bos prepended); cross-check tokenizers."""
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(case_dir)
    raw = train_llama3_style_tokenizer()
    out = {}
    for i, text in enumerate(ARCEE_TOKENIZER_TEXTS):
        ids = fast(text)["input_ids"]
        if raw.encode(text).ids != ids:
            raise RuntimeError(f"{case_dir}: tokenizers disagrees with AutoTokenizer on {text!r}")
        if ids[:1] != [ARCEE_BASE_CONFIG["bos_token_id"]] or fast.decode(ids) != ARCEE_BOS + text:
            raise RuntimeError(f"{case_dir}: encode({text!r}) = {ids} decodes to {fast.decode(ids)!r}")
        out[f"text.ids.{i}"] = np.asarray(ids, dtype=np.int64).reshape(-1)
    return out, list(ARCEE_TOKENIZER_TEXTS)


def reinit_arcee(model, seed: int) -> None:
    """Re-initialise every parameter so that attention is peaked and every flag shows.

    Linear weights and biases ~ N(0, 0.2); RMSNorm weight ~ 1 + N(0, 0.2); embeddings
    ~ N(0, 0.5) (the pad row too). Tied weights stay tied (lm_head <- embed_tokens).
    Buffers (rotary inv_freq) are left as HF computed them.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if isinstance(owner, torch.nn.Embedding):
                p.copy_(0.5 * noise)
            elif type(owner).__name__.endswith("RMSNorm"):
                p.copy_(1.0 + 0.2 * noise)
            elif isinstance(owner, torch.nn.Linear):
                p.copy_(0.2 * noise)
            else:
                raise TypeError(f"reinit_arcee: no rule for {name} in {type(owner).__name__}")
    model.tie_weights()
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is not None and lm_head.weight.data_ptr() == model.base_model.embed_tokens.weight.data_ptr()
    if lm_head is not None and tied != model.config.tie_word_embeddings:
        raise RuntimeError(f"lm_head tied={tied} but config.tie_word_embeddings={model.config.tie_word_embeddings}")


def check_reload(model, case_dir: Path, dtype=None):
    """from_pretrained(case_dir) must give exactly the model's parameters; returns the loaded model."""
    import torch

    kwargs = {} if dtype is None else {"dtype": dtype}
    loaded = type(model).from_pretrained(case_dir, attn_implementation="eager", **kwargs).eval()
    want, got = model.state_dict(), loaded.state_dict()
    if want.keys() != got.keys():
        raise RuntimeError(f"{case_dir}: reloaded keys differ: {sorted(set(want) ^ set(got))}")
    for k in want:
        if not torch.equal(want[k].to(got[k].dtype), got[k]):
            raise RuntimeError(f"{case_dir}: reloaded {k} differs from the saved model")
    return loaded


def build_arcee(name: str, v: ArceeVariant, case_dir: Path) -> CaseInfo:
    """Build, save and record one Arcee case into case_dir."""
    import torch
    import transformers

    seed = case_seed(name)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    # deepcopy: the config mutates rope_scaling (adds rope_type next to a legacy 'type')
    cfg = transformers.ArceeConfig(**{**ARCEE_BASE_CONFIG, **copy.deepcopy(v.config)})
    if cfg.hidden_act not in transformers.activations.ACT2FN:
        raise KeyError(f"activation {cfg.hidden_act!r} is not in transformers.activations.ACT2FN")
    model_class = getattr(transformers, v.architecture)
    model = model_class._from_config(cfg, attn_implementation="eager")
    model.eval()
    rotary = model.base_model.rotary_emb
    if rotary.rope_type != v.rope_type:
        raise RuntimeError(f"HF chose rope_type {rotary.rope_type!r}, expected {v.rope_type!r}")
    record: dict[str, np.ndarray] = {
        "rope.inv_freq": to_numpy(rotary.inv_freq),  # as constructed, float32
        "rope.attention_scaling": np.asarray(rotary.attention_scaling, dtype=np.float64),
    }
    reinit_arcee(model, seed)
    notes = [ARCEE_PAD_NOTE, ARCEE_FP64_ROPE_NOTE, ARCEE_FP64_PRECISION_NOTE]

    # Save before any forward: seq-cls mutates problem_type.
    if v.checkpoint == "bf16":
        model.to(torch.bfloat16).save_pretrained(case_dir, safe_serialization=True)
        model = check_reload(model, case_dir, dtype=torch.float32)  # exact bf16 -> fp32 upcast, fresh inv_freq
        rotary = model.base_model.rotary_emb
        if not torch.equal(rotary.inv_freq, torch.from_numpy(record["rope.inv_freq"])):
            raise RuntimeError("the reloaded model's inv_freq differs from the constructed one")
        notes.append("outputs come from the bfloat16 checkpoint loaded with from_pretrained(dtype=torch.float32)")
    elif v.checkpoint == "sharded":
        model.save_pretrained(case_dir, safe_serialization=True, max_shard_size="20KB")
        index = json.loads((case_dir / "model.safetensors.index.json").read_text())
        if len(set(index["weight_map"].values())) < 2:
            raise RuntimeError(f"expected >= 2 shards, got {sorted(set(index['weight_map'].values()))}")
        check_reload(model, case_dir)
    else:
        model.save_pretrained(case_dir, safe_serialization=True)
        check_reload(model, case_dir)
    if v.tokenizer:
        save_arcee_tokenizer(case_dir)

    inputs = arcee_inputs(v, rng, cfg)
    meta_extra: dict[str, str] = {}
    if v.tokenizer:
        ids, texts = arcee_tokenizer_goldens(case_dir)
        record.update(ids)
        meta_extra["texts"] = json.dumps(texts, ensure_ascii=False)
    record.update(inputs)

    inputs_by_dtype = {"float32": inputs, "float64": inputs}
    if v.float64_inputs == "right-padded":
        inputs_by_dtype["float64"] = right_padded(inputs)
        changed = {k: a for k, a in inputs_by_dtype["float64"].items() if not np.array_equal(a, inputs[k])}
        if not changed:
            raise RuntimeError(f"{name}: no left-padded row to move")
        record.update({f"float64.{k}": a for k, a in changed.items()})
        notes.append(ARCEE_FP64_INPUTS_NOTE + f" (here: {', '.join(sorted(changed))})")
    elif v.float64_inputs != "shared":
        raise ValueError(f"{name}: float64_inputs {v.float64_inputs!r}")
    declared: dict[str, int] = {}

    recompute = v.rope_type in ("dynamic", "longrope")  # HF swaps inv_freq inside the forward
    long = v.inputs == "long"
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        model.to(dtype)
        captured = []
        hook = rotary.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            outputs = run_forward(model, inputs_by_dtype[dtype_name], dtype)
        finally:
            hook.remove()
        (cos, sin), = captured
        used = to_numpy(rotary.inv_freq.float())
        if long:
            # keep logits, losses and hidden_states first/last; attentions ([B, H, 100, 100]) are too big
            keep = ("hidden_states.0", f"hidden_states.{cfg.num_hidden_layers}")
            outputs = {k: a for k, a in outputs.items() if not k.startswith("attentions.")
                       and (not k.startswith("hidden_states.") or k in keep)}
        record.update({f"{dtype_name}/{k}": a for k, a in outputs.items()})
        nan_rows = sorted({int(r) for a in outputs.values() if a.ndim and np.isnan(a).any()
                           for r in np.argwhere(np.isnan(a).reshape(a.shape[0], -1).any(-1)).reshape(-1)})
        nonfinite = {f"{dtype_name}/{k}": int((~np.isfinite(a)).sum()) for k, a in outputs.items()
                     if a.dtype.kind == "f" and not np.all(np.isfinite(a))}
        if nonfinite:
            expected_rows = fully_masked_rows(inputs_by_dtype[dtype_name]["attention_mask"])
            if dtype_name != "float64" or v.float64_inputs != "shared" or nan_rows != expected_rows:
                raise RuntimeError(f"{name}: HF {dtype_name} outputs are not finite: {sorted(nonfinite)} "
                                   f"(batch rows {nan_rows}; rows with a fully masked query: {expected_rows})")
            declared.update(nonfinite)
            notes.append(ARCEE_FP64_NAN_NOTE + f" (here: batch rows {nan_rows}; keys {', '.join(sorted(nonfinite))})")
        elif dtype_name == "float64" and v.float64_inputs == "shared":
            raise RuntimeError(f"{name}: meant to show HF's float64 NaN, but its outputs are finite")
        if dtype_name == "float32":
            if long:
                shape = (ARCEE_LONG_BATCH, ARCEE_LONG_SEQ, cfg.head_dim)  # HF gives [1, T, D] for default positions
                record["rope.cos"] = np.broadcast_to(to_numpy(cos), shape).copy()
                record["rope.sin"] = np.broadcast_to(to_numpy(sin), shape).copy()
            if recompute:
                record["rope.inv_freq_used"] = used
                if np.array_equal(used, record["rope.inv_freq"]):
                    raise RuntimeError(f"{v.rope_type}: the long forward did not change inv_freq")
            if v.generate:
                prompt_ids, prompt_mask = gpt2_generate_prompts(rng, cfg.vocab_size, low=ARCEE_LOW_ID)
                record.update(run_generate(model, prompt_ids, prompt_mask, pad=cfg.pad_token_id,
                                           eos=cfg.eos_token_id, max_new_tokens=v.max_new_tokens))
        elif not np.array_equal(used, record.get("rope.inv_freq_used", record["rope.inv_freq"])):
            raise RuntimeError(f"{name}: the float64 forward used another inv_freq than the float32 one")
    if long:
        notes.append(f"to stay small: no attentions, hidden_states only .0 and .{cfg.num_hidden_layers} (last); "
                     "rope.cos/rope.sin broadcast to [B, T, head_dim] from HF's [1, T, head_dim]")

    metadata = {
        "case": name, "family": "arcee", "architecture": v.architecture,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "description": v.description, "notes": "; ".join(notes), **meta_extra,
    }
    if declared:
        metadata["declared_nonfinite"] = json.dumps(declared, sort_keys=True)
    atomic_write_bytes(case_dir / "golden.safetensors", safetensors_bytes(record, metadata))
    return CaseInfo("arcee", v.architecture, v.description)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

Builder = Callable[[Path], CaseInfo]
CASES: dict[str, Builder] = {}


def register_gpt2() -> None:
    from transformers.activations import ACT2FN

    for case, variant in GPT2_VARIANTS.items():
        act = variant.config.get("activation_function")
        if act is not None and act not in ACT2FN:
            print(f"skip gpt2/{case}: activation {act!r} not in transformers.activations.ACT2FN")
            continue
        name = f"gpt2/{case}"
        CASES[name] = functools.partial(build_gpt2, name, variant)


def register_arcee() -> None:
    for case, variant in ARCEE_VARIANTS.items():
        name = f"arcee/{case}"
        CASES[name] = functools.partial(build_arcee, name, variant)


# Families whose builders live in their own module next to this script (tools/golden_<family>.py).
FAMILY_MODULES: tuple[str, ...] = ("golden_roformer", "golden_mega", "golden_ibert")


def register_family_modules() -> None:
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for module_name in FAMILY_MODULES:
        importlib.import_module(module_name).register(sys.modules[__name__])


# Cases made by transformers 5.x itself (--v5), each -> its 4.57.6 twin: the twin's variant and
# builder, run under the v5 name with the twin's seed (case_seed), so the weights and inputs are
# the twin's and tests/test_golden_v5.py compares the two. MEGA was removed in v5. With 5.25.0 the
# outputs equal the twin's bit for bit except where v5 computes otherwise (GPT2_V5_NOTE; RoFormer's
# untied decoder bias, tools/golden_roformer.py).
V5_CASES: dict[str, str] = {
    "gpt2/v5-lm": "gpt2/lm",                          # v5's one-mask eager attention; v5's tokenizer.json
    "arcee/v5-causal-lm": "arcee/causal-lm",          # rope_parameters (default); v5's float64 NaN, declared
    "arcee/v5-rope-yarn": "arcee/rope-yarn",          # rope_parameters yarn
    "arcee/v5-rope-longrope": "arcee/rope-longrope",  # rope_parameters longrope (original context moved in)
    "roformer/v5-mlm": "roformer/mlm",
    "roformer/v5-mlm-untied": "roformer/mlm-untied",  # v5 saves and uses cls.predictions.decoder.bias
    "ibert/v5-seqcls": "ibert/seqcls",                # float mode
    "ibert/v5-quant-seqcls": "ibert/quant-seqcls",    # quant mode, calibrated in train mode
}


def register_v5() -> None:
    """Replace CASES by V5_CASES: each v5 case runs its twin's builder (a functools.partial
    whose one argument equal to the twin's name becomes the v5 name)."""
    twins = dict(CASES)
    CASES.clear()
    for name, twin in V5_CASES.items():
        f = twins[twin]
        if sum(a == twin for a in f.args) != 1:
            raise RuntimeError(f"{twin}: cannot find the case name among its builder's arguments")
        CASES[name] = functools.partial(f.func, *[name if a == twin else a for a in f.args], **f.keywords)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------

def select(patterns: list[str] | None) -> list[str]:
    """Case names matching any pattern (fnmatch, exact name, or family prefix like 'gpt2')."""
    if not patterns:
        return list(CASES)
    chosen = []
    for pat in patterns:
        hits = [c for c in CASES
                if fnmatch.fnmatchcase(c, pat) or c == pat or c.startswith(pat.rstrip("/") + "/")]
        if not hits:
            sys.exit(f"make_golden: --only {pat!r} matches no case; cases are: {', '.join(CASES)}")
        chosen += [c for c in hits if c not in chosen]
    return [c for c in CASES if c in chosen]  # registry order


def golden_grads():
    """tools/golden_grads.py: the gradient goldens of a few cases per family."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return importlib.import_module("golden_grads")


def build_case(name: str, out: Path) -> CaseInfo:
    """Build a case in a staging dir, then move its files into out/name (each via os.replace)."""
    final = out / name
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".staging-{final.name}-"))
    try:
        info = CASES[name](staging)
        if name in golden_grads().CASES:  # HF's gradients, from the checkpoint just written
            golden_grads().write(sys.modules[__name__], name, staging)
        final.mkdir(exist_ok=True)
        new = {p.relative_to(staging) for p in staging.rglob("*") if p.is_file()}
        for old in [p for p in final.rglob("*") if p.is_file()]:
            if old.relative_to(final) not in new:
                old.unlink()
        # golden.safetensors last, so a complete golden file implies complete model files
        for rel in sorted(new, key=lambda r: (r.name == "golden.safetensors", str(r))):
            (final / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, final / rel)
        return info
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_manifest(out: Path, built: dict[str, CaseInfo | dict], v5: bool = False) -> None:
    """Update MANIFEST.json: generator versions, case entries, sha256 of every file on disk.
    Cases already listed (whose directories exist) are kept, so a --v5 run and a 4.57.6 run
    each keep the other's cases; ``v5`` keeps the global generator entry (the 4.57.6 stack)."""
    import fcntl

    # Concurrent `--only` runs each read-modify-write the manifest: hold a lock on the
    # output directory itself (no lock file to list or forget) so none loses another's cases.
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_manifest_locked(out, out / "MANIFEST.json", built, v5)
    finally:
        os.close(fd)


def _write_manifest_locked(out: Path, path: Path, built: dict[str, CaseInfo | dict], v5: bool) -> None:
    import tokenizers
    import torch
    import transformers

    old = json.loads(path.read_text()) if path.exists() else {}
    cases = old.get("cases", {})
    cases.update({name: info if isinstance(info, dict) else dataclasses.asdict(info) for name, info in built.items()})
    cases = {name: c for name, c in cases.items() if (out / name).is_dir()}
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if not p.is_file() or rel == "MANIFEST.json" or any(part.startswith(".") for part in p.relative_to(out).parts):
            continue
        files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    generator = {
        "script": SCRIPT, "transformers": transformers.__version__, "torch": torch.__version__,
        "numpy": np.__version__, "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__, "python": platform.python_version(),
    }
    manifest = {
        # a --v5 run keeps the 4.57.6 generator entry; its cases carry their own versions
        "generator": old["generator"] if v5 and "generator" in old else generator,
        "cases": cases,
        "files": files,
    }
    atomic_write_bytes(path, (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="golden", type=Path, help="output directory (default: golden)")
    parser.add_argument("--only", nargs="+", metavar="PATTERN",
                        help="only these cases (fnmatch patterns such as 'gpt2/lm-act-*', or a family)")
    parser.add_argument("--v5", action="store_true",
                        help="build the transformers 5.x cases (V5_CASES, <family>/v5-<case>) instead; run with "
                             "a python whose transformers is 5.x")
    args = parser.parse_args(argv)

    check_versions(v5=args.v5)
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    if args.v5:  # v5 shows tqdm bars when it writes or loads weights
        transformers.utils.logging.disable_progress_bar()
    register_gpt2()
    register_arcee()
    register_family_modules()
    if args.v5:
        register_v5()

    names = select(args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    built = {}
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(names)}] {name} ...", end=" ", flush=True)
        built[name] = build_case(name, args.out)
        if args.v5:  # MANIFEST's global generator is the 4.57.6 stack: a v5 case names its own
            import tokenizers
            built[name] = {**dataclasses.asdict(built[name]), "twin": V5_CASES[name],
                           "transformers": transformers.__version__, "torch": torch.__version__,
                           "tokenizers": tokenizers.__version__}
        size = sum(p.stat().st_size for p in (args.out / name).rglob("*") if p.is_file())
        print(f"ok ({time.perf_counter() - t0:.1f}s, {size / 1024:.0f} KiB)", flush=True)
    write_manifest(args.out, built, v5=args.v5)
    print(f"wrote {args.out / 'MANIFEST.json'} ({len(built)} case(s) built)")


if __name__ == "__main__":
    main()

"""Model configs parsed from a Hugging Face `config.json`.

Field names are the HF config.json keys, unchanged. One parser per family fills the
implied defaults in one place (the HF `*Config.__init__` defaults) and raises on any key
that is neither handled nor listed as ignored, with the reason it is ignored. Configs
are frozen and hashable, so they can be passed to `jax.jit` as static arguments.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal, Mapping

# Keys every HF `PretrainedConfig` may carry that do not change what a model computes at
# inference. Each family adds its own. Values are the reason the key is ignored.
COMMON_IGNORED: dict[str, str] = {
    "_name_or_path": "where HF loaded the config from",
    "transformers_version": "version of the writer",
    "architectures": "read separately by `architecture_of`",
    "torch_dtype": "checkpoint dtype is read from the tensors themselves",
    "dtype": "checkpoint dtype is read from the tensors themselves",
    "use_bfloat16": "legacy dtype flag; dtype is read from the tensors",
    "initializer_range": "training-time initialisation only",
    "use_cache": "caching is chosen by the caller (generate uses it)",
    "return_dict": "refjax always returns an output dataclass",
    "output_hidden_states": "chosen per call",
    "output_attentions": "chosen per call",
    "torchscript": "PyTorch export flag",
    "id2label": "label names only; their count is num_labels",
    "label2id": "label names only",
    "finetuning_task": "metadata",
    "task_specific_params": "pipeline defaults, not model math",
    "tokenizer_class": "tokenizer metadata",
    "prefix": "tokenizer metadata",
    "pruned_heads": "must be empty: checked in `_common`",
    "chunk_size_feed_forward": "memory-saving chunking of the FFN; same result",
    "is_encoder_decoder": "must be false: checked in `_common`",
    "tie_encoder_decoder": "encoder-decoder only",
    "cross_attention_hidden_size": "encoder-decoder only",
    "decoder_start_token_id": "encoder-decoder only",
    "sep_token_id": "tokenizer metadata",
    "tf_legacy_loss": "TensorFlow-only loss switch",
    "gradient_checkpointing": "training memory option",
    "attn_implementation": "refjax implements HF's eager semantics",
    "_attn_implementation_autoset": "HF runtime bookkeeping",
    # Legacy generation defaults stored in old config.json files (HF moved them to
    # generation_config.json); refjax's generate takes its settings as arguments.
    **{
        k: "legacy generation default; pass sampling settings to generate"
        for k in (
            "max_length min_length do_sample early_stopping num_beams temperature top_k top_p "
            "typical_p repetition_penalty length_penalty no_repeat_ngram_size "
            "encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores "
            "return_dict_in_generate forced_bos_token_id forced_eos_token_id "
            "remove_invalid_values exponential_decay_length_penalty suppress_tokens "
            "begin_suppress_tokens num_beam_groups diversity_penalty"
        ).split()
    },
}

ProblemType = Literal["regression", "single_label_classification", "multi_label_classification"]
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Activation names of HF's ACT2FN that refjax implements (ref/nn.py). "prelu" and "xielu"
# carry learned parameters of their own and are not supported.
ACTIVATIONS = (
    "gelu", "gelu_10", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh",
    "gelu_python_tanh", "gelu_accurate", "laplace", "leaky_relu", "linear", "mish",
    "quick_gelu", "relu", "relu2", "relu6", "sigmoid", "silu", "swish", "tanh",
)


class ConfigError(ValueError):
    """A config.json value refjax cannot use; the message names the field."""


def read_config_json(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """Read `config.json` from a checkpoint directory, with errors that name the file."""
    path = os.path.join(os.fspath(checkpoint_dir), "config.json")
    if not os.path.isdir(checkpoint_dir):
        kind = "is not a directory" if os.path.exists(checkpoint_dir) else "does not exist"
        raise FileNotFoundError(f"checkpoint directory {os.fspath(checkpoint_dir)!r} {kind}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {os.fspath(checkpoint_dir)!r}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def architecture_of(raw: Mapping[str, Any]) -> str:
    """The HF class named by `architectures[0]`, as `from_pretrained` picks the head."""
    archs = raw.get("architectures")
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ConfigError("config field 'architectures' must be a non-empty list of class names")
    return archs[0]


class _Fields:
    """Typed reads from a raw config dict, recording which keys were used."""

    def __init__(self, raw: Mapping[str, Any], family: str):
        self.raw = dict(raw)
        self.family = family
        self.used: set[str] = set()

    def _get(self, key: str, default: Any, required: bool) -> Any:
        self.used.add(key)
        if key not in self.raw or (self.raw[key] is None and default is None and not required):
            if required:
                raise ConfigError(f"{self.family} config: missing required field '{key}'")
            return default
        return self.raw[key]

    def int(self, key: str, default: Any = None, *, required: bool = False, minimum: int | None = 1,
            optional: bool = False) -> Any:
        value = self._get(key, default, required)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.family} config: field '{key}' must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.family} config: field '{key}' must be >= {minimum}, got {value}")
        return value

    def float(self, key: str, default: Any = None, *, positive: bool = False) -> float:
        value = self._get(key, default, False)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{self.family} config: field '{key}' must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise ConfigError(f"{self.family} config: field '{key}' must be > 0, got {value}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.family} config: field '{key}' must be true or false, got {value!r}")
        return value

    def choice(self, key: str, default: Any, allowed: tuple) -> Any:
        value = self._get(key, default, False)
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{self.family} config: field '{key}' is {value!r}; accepted values: {shown}")
        return value

    def token_id(self, key: str, vocab_size: int) -> int | None:
        value = self._get(key, None, False)
        if value is None:
            return None
        if isinstance(value, list):  # HF allows a list of eos ids; the first is the pad/stop default
            if not value:
                return None
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.family} config: field '{key}' must be a token id, got {value!r}")
        return value

    def check_all_used(self, ignored: Mapping[str, str]) -> None:
        unknown = sorted(set(self.raw) - self.used - set(ignored) - set(COMMON_IGNORED))
        if unknown:
            raise ConfigError(
                f"{self.family} config: unknown field(s) {', '.join(repr(k) for k in unknown)}; "
                "refjax does not know what they change, so it refuses to guess"
            )


def _common(fields: _Fields) -> dict[str, Any]:
    """Fields every PretrainedConfig has that change outputs: labels and problem type."""
    raw = fields.raw
    if raw.get("pruned_heads"):
        raise ConfigError(f"{fields.family} config: field 'pruned_heads' is not supported (got {raw['pruned_heads']!r})")
    if raw.get("is_encoder_decoder"):
        raise ConfigError(f"{fields.family} config: field 'is_encoder_decoder' must be false")
    # HF: num_labels = len(id2label) when id2label is present, else num_labels, else 2.
    id2label = raw.get("id2label")
    fields.used.add("num_labels")
    if isinstance(id2label, dict) and id2label:
        num_labels = len(id2label)
    else:
        num_labels = fields.int("num_labels", 2)
    problem_type = fields.raw.get("problem_type")
    fields.used.add("problem_type")
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ConfigError(
            f"{fields.family} config: field 'problem_type' is {problem_type!r}; accepted values: "
            + ", ".join(repr(p) for p in PROBLEM_TYPES) + ", or null"
        )
    return dict(num_labels=num_labels, problem_type=problem_type)


# --------------------------------------------------------------------------------------
# GPT-2
# --------------------------------------------------------------------------------------

GPT2_ARCHITECTURES = (
    "GPT2Model",
    "GPT2LMHeadModel",
    "GPT2DoubleHeadsModel",
    "GPT2ForSequenceClassification",
    "GPT2ForTokenClassification",
    "GPT2ForQuestionAnswering",
)

# GPT2SequenceSummary.summary_type values refjax implements ("attn" raises in HF too).
SUMMARY_TYPES = ("last", "first", "mean", "cls_index")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """HF `GPT2Config` (models/gpt2/configuration_gpt2.py) plus the head it is used with."""

    architecture: str
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None
    activation_function: str
    layer_norm_epsilon: float
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    reorder_and_upcast_attn: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    num_labels: int
    problem_type: str | None
    summary_type: str
    summary_use_proj: bool
    summary_activation: str | None
    summary_proj_to_labels: bool

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def summary_size(self) -> int:
        """Output width of the double-heads summary projection (GPT2SequenceSummary)."""
        if self.summary_proj_to_labels and self.num_labels > 0:
            return self.num_labels
        return self.n_embd


GPT2_IGNORED = {
    "model_type": "checked to be 'gpt2'",
    "n_ctx": "legacy alias of n_positions",
    "resid_pdrop": "dropout: inference is deterministic",
    "embd_pdrop": "dropout: inference is deterministic",
    "attn_pdrop": "dropout: inference is deterministic",
    "summary_first_dropout": "dropout: inference is deterministic",
    "summary_last_dropout": "dropout: inference is deterministic",
    "classifier_dropout": "dropout: inference is deterministic",
    "add_cross_attention": "must be false: checked below",
    "is_decoder": "GPT-2 is always a causal decoder",
}


def parse_gpt2_config(raw: Mapping[str, Any], architecture: str | None = None) -> GPT2Config:
    """Parse a GPT-2 config.json dict with HF's defaults; unknown keys are errors."""
    f = _Fields(raw, "gpt2")
    if raw.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"gpt2 config: field 'model_type' is {raw.get('model_type')!r}; expected 'gpt2'")
    if architecture is None:
        architecture = architecture_of(raw) if raw.get("architectures") else "GPT2Model"
    if architecture not in GPT2_ARCHITECTURES:
        raise ConfigError(
            f"gpt2 config: architecture {architecture!r} is not supported; accepted values: "
            + ", ".join(GPT2_ARCHITECTURES)
        )
    if raw.get("add_cross_attention"):
        raise ConfigError("gpt2 config: field 'add_cross_attention' is not supported (GPT-2 as a cross-attending decoder)")
    n_embd = f.int("n_embd", 768)
    n_head = f.int("n_head", 12)
    if n_embd % n_head:
        raise ConfigError(f"gpt2 config: field 'n_head' ({n_head}) must divide 'n_embd' ({n_embd})")
    vocab_size = f.int("vocab_size", 50257)
    summary_activation = f.raw.get("summary_activation")
    f.used.add("summary_activation")
    if summary_activation is not None and summary_activation not in ACTIVATIONS:
        # HF's get_activation: any ACT2FN name; null or "" means identity.
        if summary_activation != "":
            raise ConfigError(
                f"gpt2 config: field 'summary_activation' is {summary_activation!r}; accepted values: "
                + ", ".join(ACTIVATIONS) + ", or null"
            )
        summary_activation = None
    config = GPT2Config(
        architecture=architecture,
        vocab_size=vocab_size,
        n_positions=f.int("n_positions", 1024),
        n_embd=n_embd,
        n_layer=f.int("n_layer", 12),
        n_head=n_head,
        n_inner=f.int("n_inner", None, optional=True),
        activation_function=f.choice("activation_function", "gelu_new", ACTIVATIONS),
        layer_norm_epsilon=f.float("layer_norm_epsilon", 1e-5, positive=True),
        scale_attn_weights=f.bool("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=f.bool("scale_attn_by_inverse_layer_idx", False),
        reorder_and_upcast_attn=f.bool("reorder_and_upcast_attn", False),
        tie_word_embeddings=f.bool("tie_word_embeddings", True),
        bos_token_id=f.token_id("bos_token_id", vocab_size),
        eos_token_id=f.token_id("eos_token_id", vocab_size),
        pad_token_id=f.token_id("pad_token_id", vocab_size),
        summary_type=f.choice("summary_type", "cls_index", SUMMARY_TYPES),
        summary_use_proj=f.bool("summary_use_proj", True),
        summary_activation=summary_activation,
        summary_proj_to_labels=f.bool("summary_proj_to_labels", True),
        **_common(f),
    )
    f.check_all_used(GPT2_IGNORED)
    return config


def count_gpt2_params(config: GPT2Config) -> int:
    """Number of parameters of the GPT-2 body (tied LM head adds none), from sizes alone."""
    d, inner, L = config.n_embd, config.inner_dim, config.n_layer
    per_layer = (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (2 * d) + (inner * d + inner) + (inner * d + d)
    return config.vocab_size * d + config.n_positions * d + L * per_layer + 2 * d

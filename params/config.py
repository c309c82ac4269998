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


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
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

    def token_id(self, key: str, allow_list: bool = False) -> int | tuple[int, ...] | None:
        """A token id; with allow_list, also a list of ids (HF's `eos_token_id` may be one:
        generation stops at any of them), returned as a tuple."""
        value = self._get(key, None, False)
        if value is None:
            return None
        if isinstance(value, list) and allow_list:
            ids = tuple(value)
            if not ids or any(isinstance(v, bool) or not isinstance(v, int) for v in ids):
                raise ConfigError(f"{self.family} config: field '{key}' must be a token id or a non-empty list "
                                  f"of them, got {value!r}")
            return ids[0] if len(ids) == 1 else ids
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


def _family_architecture(raw: Mapping[str, Any], family: str, architecture: str | None,
                         accepted: tuple[str, ...]) -> str:
    """Check model_type, and pick the head: the argument, else architectures[0], else the
    bare model (the first accepted name), as HF's Auto classes do."""
    if raw.get("model_type", family) != family:
        raise ConfigError(f"{family} config: field 'model_type' is {raw.get('model_type')!r}; expected {family!r}")
    if architecture is None:
        architecture = architecture_of(raw) if raw.get("architectures") else accepted[0]
    if architecture not in accepted:
        raise ConfigError(f"{family} config: architecture {architecture!r} is not supported; accepted values: "
                          + ", ".join(accepted))
    return architecture


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
    eos_token_id: int | tuple[int, ...] | None  # a tuple when config.json lists several
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


# HF GPT2Config.attribute_map: generic names HF accepts for GPT-2's own keys.
GPT2_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}


def _resolve_aliases(raw: Mapping[str, Any], aliases: Mapping[str, str], family: str) -> dict[str, Any]:
    """Rename HF attribute_map aliases to the family's own keys (both present: must agree)."""
    raw = dict(raw)
    for alias, key in aliases.items():
        if alias in raw:
            value = raw.pop(alias)
            if key in raw and raw[key] != value:
                raise ConfigError(f"{family} config: fields '{alias}' ({value!r}) and '{key}' ({raw[key]!r}) disagree")
            raw[key] = value
    return raw


def parse_gpt2_config(raw: Mapping[str, Any], architecture: str | None = None) -> GPT2Config:
    """Parse a GPT-2 config.json dict with HF's defaults; unknown keys are errors."""
    raw = _resolve_aliases(raw, GPT2_ALIASES, "gpt2")
    f = _Fields(raw, "gpt2")
    architecture = _family_architecture(raw, "gpt2", architecture, GPT2_ARCHITECTURES)
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
        bos_token_id=f.token_id("bos_token_id"),
        eos_token_id=f.token_id("eos_token_id", allow_list=True),
        pad_token_id=f.token_id("pad_token_id"),
        summary_type=f.choice("summary_type", "cls_index", SUMMARY_TYPES),
        summary_use_proj=f.bool("summary_use_proj", True),
        summary_activation=summary_activation,
        summary_proj_to_labels=f.bool("summary_proj_to_labels", True),
        **{**_common(f), **({"num_labels": 1} if architecture == "GPT2DoubleHeadsModel" else {})},
    )
    f.check_all_used(GPT2_IGNORED)
    return config


def count_gpt2_params(config: GPT2Config) -> int:
    """Number of parameters of the GPT-2 body (tied LM head adds none), from sizes alone."""
    d, inner, L = config.n_embd, config.inner_dim, config.n_layer
    per_layer = (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (2 * d) + (inner * d + inner) + (inner * d + d)
    return config.vocab_size * d + config.n_positions * d + L * per_layer + 2 * d


# --------------------------------------------------------------------------------------
# Arcee (AFM-4.5B)
# --------------------------------------------------------------------------------------

ARCEE_ARCHITECTURES = (
    "ArceeModel",
    "ArceeForCausalLM",
    "ArceeForSequenceClassification",
    "ArceeForTokenClassification",
    "ArceeForQuestionAnswering",
)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")

# rope_scaling keys each rope_type reads in HF 4.57.6 (modeling_rope_utils.py); others are errors.
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
    "longrope": {"factor", "short_factor", "long_factor", "attention_factor", "original_max_position_embeddings"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF `config.rope_scaling`, parsed. Fields a rope_type does not use stay None."""

    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None


@dataclasses.dataclass(frozen=True)
class ArceeConfig:
    """HF `ArceeConfig` (models/arcee/configuration_arcee.py) plus the head it is used with."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    # Top-level `original_max_position_embeddings` (not an ArceeConfig argument, but HF's
    # longrope reads it from the config object when config.json carries it).
    original_max_position_embeddings: int | None
    partial_rotary_factor: float
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None  # a tuple when config.json lists several
    pad_token_id: int | None
    num_labels: int
    problem_type: str | None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


ARCEE_IGNORED = {
    "model_type": "checked to be 'arcee'",
    "attention_dropout": "dropout: inference is deterministic",
    "classifier_dropout": "dropout: inference is deterministic",
    "is_decoder": "Arcee is always a causal decoder",
}


def _parse_rope_scaling(raw: Any, f: _Fields) -> RopeScaling:
    if raw is None:
        return RopeScaling()
    if not isinstance(raw, dict):
        raise ConfigError(f"arcee config: field 'rope_scaling' must be an object or null, got {raw!r}")
    raw = dict(raw)
    rope_type = raw.pop("rope_type", None)
    legacy = raw.pop("type", None)  # HF copies the legacy "type" key into "rope_type"
    rope_type = rope_type or legacy or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"arcee config: field 'rope_scaling.rope_type' is {rope_type!r}; accepted values: "
                          + ", ".join(repr(t) for t in ROPE_TYPES))
    unknown = sorted(set(raw) - _ROPE_KEYS[rope_type])
    if unknown:
        raise ConfigError(f"arcee config: rope_scaling key(s) {', '.join(map(repr, unknown))} are not used by "
                          f"rope_type {rope_type!r} (accepted: {', '.join(sorted(_ROPE_KEYS[rope_type])) or 'none'})")

    def number(key, required=False, positive=True):
        value = raw.get(key)
        if value is None:
            if required:
                raise ConfigError(f"arcee config: rope_type {rope_type!r} needs 'rope_scaling.{key}'")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) \
                or (positive and value <= 0):
            raise ConfigError(f"arcee config: field 'rope_scaling.{key}' must be a positive number, got {value!r}")
        return float(value)

    def factors(key):
        value = raw.get(key)
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and v > 0 for v in value):
            raise ConfigError(f"arcee config: rope_type 'longrope' needs 'rope_scaling.{key}' as a list of "
                              f"positive numbers, got {value!r}")
        return tuple(float(v) for v in value)

    factor = number("factor", required=rope_type in ("linear", "dynamic", "yarn", "llama3"))
    if factor is not None and factor < 1 and rope_type != "longrope":
        raise ConfigError(f"arcee config: field 'rope_scaling.factor' must be >= 1, got {factor}")
    original = raw.get("original_max_position_embeddings")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
        raise ConfigError(f"arcee config: field 'rope_scaling.original_max_position_embeddings' must be a positive "
                          f"integer, got {original!r}")
    if rope_type == "llama3" and original is None:
        raise ConfigError("arcee config: rope_type 'llama3' needs 'rope_scaling.original_max_position_embeddings'")
    truncate = raw.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"arcee config: field 'rope_scaling.truncate' must be true or false, got {truncate!r}")
    return RopeScaling(
        rope_type=rope_type,
        factor=factor,
        original_max_position_embeddings=original,
        attention_factor=number("attention_factor"),
        beta_fast=number("beta_fast"),
        beta_slow=number("beta_slow"),
        mscale=number("mscale", positive=False),
        mscale_all_dim=number("mscale_all_dim", positive=False),
        truncate=truncate,
        short_factor=factors("short_factor") if rope_type == "longrope" else None,
        long_factor=factors("long_factor") if rope_type == "longrope" else None,
        low_freq_factor=number("low_freq_factor", required=rope_type == "llama3"),
        high_freq_factor=number("high_freq_factor", required=rope_type == "llama3"),
    )


def parse_arcee_config(raw: Mapping[str, Any], architecture: str | None = None) -> ArceeConfig:
    """Parse an Arcee config.json dict with HF's defaults; unknown keys are errors."""
    f = _Fields(raw, "arcee")
    architecture = _family_architecture(raw, "arcee", architecture, ARCEE_ARCHITECTURES)
    hidden_size = f.int("hidden_size", 2560)
    heads = f.int("num_attention_heads", 32)
    kv_heads = f.int("num_key_value_heads", None, optional=True) or heads  # HF: None -> MHA
    if heads % kv_heads:
        raise ConfigError(f"arcee config: field 'num_key_value_heads' ({kv_heads}) must divide "
                          f"'num_attention_heads' ({heads})")
    head_dim = f.int("head_dim", None, optional=True)
    if head_dim is None:
        if hidden_size % heads:
            raise ConfigError(f"arcee config: field 'num_attention_heads' ({heads}) must divide 'hidden_size' "
                              f"({hidden_size}) when 'head_dim' is not given")
        head_dim = hidden_size // heads
    partial = f.float("partial_rotary_factor", 1.0, positive=True)
    if partial != 1.0:  # HF's Arcee attention rotates the whole head and fails on a partial table
        raise ConfigError(f"arcee config: field 'partial_rotary_factor' must be 1.0 (HF's ArceeAttention rotates "
                          f"the whole head), got {partial}")
    if head_dim % 2:
        raise ConfigError(f"arcee config: field 'head_dim' must be even for rotary embeddings, got {head_dim}")
    f.used.add("rope_scaling")
    rope = _parse_rope_scaling(raw.get("rope_scaling"), f)
    rotary_half = int(head_dim * partial) // 2
    for key in ("short_factor", "long_factor"):
        value = getattr(rope, key)
        if value is not None and len(value) != rotary_half:
            raise ConfigError(f"arcee config: 'rope_scaling.{key}' has {len(value)} entries; expected rotary_dim/2 "
                              f"= {rotary_half}")
    vocab_size = f.int("vocab_size", 32000)
    config = ArceeConfig(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=f.int("intermediate_size", 18432),
        num_hidden_layers=f.int("num_hidden_layers", 32),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=f.choice("hidden_act", "relu2", ACTIVATIONS),
        max_position_embeddings=f.int("max_position_embeddings", 4096),
        rms_norm_eps=f.float("rms_norm_eps", 1e-5, positive=True),
        rope_theta=f.float("rope_theta", 10000.0, positive=True),
        rope_scaling=rope,
        original_max_position_embeddings=f.int("original_max_position_embeddings", None, optional=True),
        partial_rotary_factor=partial,
        attention_bias=f.bool("attention_bias", False),
        mlp_bias=f.bool("mlp_bias", False),
        tie_word_embeddings=f.bool("tie_word_embeddings", False),
        bos_token_id=f.token_id("bos_token_id"),
        eos_token_id=f.token_id("eos_token_id", allow_list=True),
        pad_token_id=f.token_id("pad_token_id"),
        **_common(f),
    )
    f.check_all_used(ARCEE_IGNORED)
    _check_rope_against_sizes(config)
    return config


def _check_rope_against_sizes(config: ArceeConfig) -> None:
    """Combinations on which HF's rope init functions divide by zero or compare None
    (a ZeroDivisionError / TypeError at model build there): refused here, by name."""
    rope = config.rope_scaling
    if rope.rope_type == "dynamic" and config.head_dim <= 2:
        raise ConfigError(f"arcee config: rope_type 'dynamic' needs 'head_dim' > 2 (its NTK base grows with the "
                          f"power d / (d - 2)), got {config.head_dim}")
    if rope.rope_type == "longrope" and rope.attention_factor is None:
        original = config.original_max_position_embeddings
        if not original and rope.factor is None:
            raise ConfigError("arcee config: rope_type 'longrope' needs 'rope_scaling.factor' (or a top-level "
                              "'original_max_position_embeddings', or 'rope_scaling.attention_factor')")
        factor = config.max_position_embeddings / original if original else rope.factor
        if factor > 1 and (original or config.max_position_embeddings) == 1:
            raise ConfigError("arcee config: rope_type 'longrope' derives its attention factor from "
                              "log(original_max_position_embeddings), which is 0 here; give "
                              "'rope_scaling.attention_factor' or a longer original context")

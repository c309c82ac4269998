"""Model configs parsed from a Hugging Face `config.json`.

Field names are the HF config.json keys, unchanged. One parser per family fills the
implied defaults in one place (the HF `*Config.__init__` defaults) and raises on any key
that is neither handled nor listed as ignored, with the reason it is ignored. Configs
are frozen and hashable, so they can be passed to `jax.jit` as static arguments.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

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

    def probability(self, key: str, default: Any = None, *, optional: bool = False) -> float | None:
        """A dropout rate in [0, 1) (None allowed when optional: HF then falls back to another rate)."""
        value = self._get(key, default, False)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"{self.family} config: field '{key}' must be a dropout rate in [0, 1), got {value!r}")
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


def writer_major(raw: Mapping[str, Any]) -> int | None:
    """Major version of the transformers that wrote config.json (`transformers_version`, e.g.
    "5.25.0" -> 5); None when the key is absent or not a version. Read where HF's own
    computation changed between majors (GPT-2's pad queries: params/gpt2.py)."""
    version = raw.get("transformers_version")
    head = version.split(".", 1)[0] if isinstance(version, str) else ""
    return int(head) if head.isdigit() else None


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


# GPT2SequenceSummary.summary_type values refjax implements ("attn" raises in HF too).
SUMMARY_TYPES = ("last", "first", "mean", "cls_index")

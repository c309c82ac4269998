"""What an Arcee (AFM-4.5B) checkpoint is: the parameter pytree and its HF tensor names.

Mirrors `transformers/models/arcee/modeling_arcee.py`: HF `model.layers.3.self_attn.q_proj`
is `params.model.layers.self_attn.q_proj` here, layers stacked on a leading axis. Every
projection is an `nn.Linear` (HF weight [out, in]), stored transposed as kernel [in, out].
Llama-like decoder: RMSNorm, grouped-query attention with RoPE, and an MLP without a gate
(`down(act(up(x)))`, act = relu2 in AFM-4.5B).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import equinox as eqx
import jax
import numpy as np

from refjax.params.common import Embedding, Linear, RMSNorm
from refjax.params.config import ACTIVATIONS, ConfigError, _common, _family_architecture, _Fields, _finite
from refjax.params.io import NameRule


# The config: HF `ArceeConfig`, parsed from config.json

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
    # dropout rates (HF's training mode, `forward(..., train=True)`; inference ignores them)
    attention_dropout: float = 0.0  # on the attention probabilities (functional dropout in eager attention)
    classifier_dropout: float | None = None  # ArceeForTokenClassification's dropout (None: 0.1, as HF)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


ARCEE_IGNORED = {
    "model_type": "checked to be 'arcee'",
    "is_decoder": "Arcee is always a causal decoder",
}


def _parse_rope_scaling(raw: Any, f: _Fields, field: str = "rope_scaling") -> RopeScaling:
    """HF 4.x `rope_scaling` (or v5's `rope_parameters` once `_from_rope_parameters` has
    rewritten it: `field` names the field in messages)."""
    if raw is None:
        return RopeScaling()
    if not isinstance(raw, dict):
        raise ConfigError(f"arcee config: field '{field}' must be an object or null, got {raw!r}")
    raw = dict(raw)
    rope_type = raw.pop("rope_type", None)
    legacy = raw.pop("type", None)  # HF copies the legacy "type" key into "rope_type"
    rope_type = rope_type or legacy or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"arcee config: field '{field}.rope_type' is {rope_type!r}; accepted values: "
                          + ", ".join(repr(t) for t in ROPE_TYPES))
    unknown = sorted(set(raw) - _ROPE_KEYS[rope_type])
    if unknown:
        raise ConfigError(f"arcee config: {field} key(s) {', '.join(map(repr, unknown))} are not used by "
                          f"rope_type {rope_type!r} (accepted: {', '.join(sorted(_ROPE_KEYS[rope_type])) or 'none'})")

    def number(key, required=False, positive=True):
        value = raw.get(key)
        if value is None:
            if required:
                raise ConfigError(f"arcee config: rope_type {rope_type!r} needs '{field}.{key}'")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) \
                or (positive and value <= 0):
            raise ConfigError(f"arcee config: field '{field}.{key}' must be a positive number, got {value!r}")
        return float(value)

    def factors(key):
        value = raw.get(key)
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and v > 0 for v in value):
            raise ConfigError(f"arcee config: rope_type 'longrope' needs '{field}.{key}' as a list of "
                              f"positive numbers, got {value!r}")
        return tuple(float(v) for v in value)

    factor = number("factor", required=rope_type in ("linear", "dynamic", "yarn", "llama3"))
    if factor is not None and factor < 1 and rope_type != "longrope":
        raise ConfigError(f"arcee config: field '{field}.factor' must be >= 1, got {factor}")
    original = raw.get("original_max_position_embeddings")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
        raise ConfigError(f"arcee config: field '{field}.original_max_position_embeddings' must be a positive "
                          f"integer, got {original!r}")
    if rope_type == "llama3" and original is None:
        raise ConfigError(f"arcee config: rope_type 'llama3' needs '{field}.original_max_position_embeddings'")
    truncate = raw.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"arcee config: field '{field}.truncate' must be true or false, got {truncate!r}")
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


# transformers v5 writes RoPE settings as one `rope_parameters` object: rope_theta, rope_type and
# the scaling keys of 4.x's `rope_scaling` (and maybe partial_rotary_factor) together. Keys it
# may hold besides a rope_type's own (_ROPE_KEYS); they move to the top level, where 4.x keeps them.
_V5_ROPE_TOP_LEVEL = ("rope_theta", "partial_rotary_factor")


def _from_rope_parameters(raw: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """A v5 config (`rope_parameters`) rewritten into the 4.57 keys that compute the same
    rotary embedding (transformers 5.x `modeling_rope_utils.py`), and the field name for
    messages. A 4.x config is returned as is.

    v5's semantics, where they differ from 4.57's reading of `rope_scaling`:
    - yarn / longrope / llama3 take `original_max_position_embeddings` from `rope_parameters`,
      a top-level value winning (v5's Phi-3 exception), else `max_position_embeddings`.
    - longrope uses `factor` when given (4.57 replaces it by max / original when a top-level
      original exists): its attention factor is computed here from that factor, v5's formula,
      and the original context moves to the top level, where refjax's 4.57 longrope reads it.
    - yarn / longrope without `factor` use max_position_embeddings / original.
    """
    if raw.get("rope_parameters") is None:
        return raw, "rope_scaling"
    params = raw["rope_parameters"]
    if not isinstance(params, dict):
        raise ConfigError(f"arcee config: field 'rope_parameters' must be an object or null, got {params!r}")
    if raw.get("rope_scaling") is not None:  # v5 would take rope_scaling and drop rope_parameters: refuse to guess
        raise ConfigError("arcee config: both 'rope_scaling' (transformers 4.x) and 'rope_parameters' (v5) are "
                          "set; keep one")
    raw, params = {k: v for k, v in raw.items() if k != "rope_parameters"}, dict(params)
    for key in _V5_ROPE_TOP_LEVEL:  # v5 reads them from rope_parameters first; a differing top-level copy is ambiguous
        if key in params:
            value = params.pop(key)
            if raw.get(key, value) != value:
                raise ConfigError(f"arcee config: 'rope_parameters.{key}' ({value!r}) and the top-level '{key}' "
                                  f"({raw[key]!r}) differ")
            raw[key] = value
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type in ("yarn", "longrope", "llama3"):
        original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
            or raw.get("max_position_embeddings", 4096)
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise ConfigError(f"arcee config: field 'rope_parameters.original_max_position_embeddings' must be a "
                              f"positive integer, got {original!r}")
        params["original_max_position_embeddings"] = original
        factor = params.get("factor")
        if factor is None and rope_type in ("yarn", "longrope"):
            factor = params["factor"] = raw.get("max_position_embeddings", 4096) / original
        if rope_type == "longrope":
            raw["original_max_position_embeddings"] = params.pop("original_max_position_embeddings")
            if params.get("attention_factor") is None and isinstance(factor, (int, float)) \
                    and not isinstance(factor, bool):
                if factor > 1 and original == 1:
                    raise ConfigError("arcee config: rope_type 'longrope' derives its attention factor from "
                                      "log(original_max_position_embeddings), which is 0 here; give "
                                      "'rope_parameters.attention_factor' or a longer original context")
                params["attention_factor"] = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {**raw, "rope_scaling": params}, "rope_parameters"


def parse_arcee_config(raw: Mapping[str, Any], architecture: str | None = None) -> ArceeConfig:
    """Parse an Arcee config.json dict (transformers 4.x, or v5 with `rope_parameters`) with
    HF's defaults; unknown keys are errors."""
    raw, rope_field = _from_rope_parameters(raw)
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
    rope = _parse_rope_scaling(raw.get("rope_scaling"), f, rope_field)
    rotary_half = int(head_dim * partial) // 2
    for key in ("short_factor", "long_factor"):
        value = getattr(rope, key)
        if value is not None and len(value) != rotary_half:
            raise ConfigError(f"arcee config: '{rope_field}.{key}' has {len(value)} entries; expected rotary_dim/2 "
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
        attention_dropout=f.probability("attention_dropout", 0.0),
        classifier_dropout=f.probability("classifier_dropout", None, optional=True),
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


class ArceeAttention(eqx.Module):
    q_proj: Linear  # [L, D, N*H]
    k_proj: Linear  # [L, D, K*H]
    v_proj: Linear  # [L, D, K*H]
    o_proj: Linear  # [L, N*H, D]


class ArceeMLP(eqx.Module):
    up_proj: Linear  # [L, D, F]
    down_proj: Linear  # [L, F, D]


class ArceeLayer(eqx.Module):
    """One decoder layer; every leaf has a leading layer axis [L, ...]."""

    input_layernorm: RMSNorm
    self_attn: ArceeAttention
    post_attention_layernorm: RMSNorm
    mlp: ArceeMLP


class ArceeBody(eqx.Module):
    """HF `ArceeModel`."""

    embed_tokens: Embedding  # [V, D]
    layers: ArceeLayer  # stacked over L
    norm: RMSNorm


class ArceeParams(eqx.Module):
    """An Arcee body with the head its architecture needs; other head fields are None."""

    model: ArceeBody
    lm_head: Linear | None = None  # [D, V], no bias; None when tied to model.embed_tokens
    score: Linear | None = None  # [D, num_labels]; bias only for token classification
    qa_outputs: Linear | None = None  # [D, 2]


def skeleton(config: ArceeConfig, dtype=np.float32) -> ArceeParams:
    """The parameter tree with `jax.ShapeDtypeStruct` leaves: shapes without memory."""
    D, F, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    NH, KH = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    def proj(n_in, n_out, bias):
        return Linear(s(L, n_in, n_out), s(L, n_out) if bias else None)

    ab, mb = config.attention_bias, config.mlp_bias
    body = ArceeBody(
        embed_tokens=Embedding(s(V, D)),
        layers=ArceeLayer(
            input_layernorm=RMSNorm(s(L, D)),
            self_attn=ArceeAttention(q_proj=proj(D, NH, ab), k_proj=proj(D, KH, ab), v_proj=proj(D, KH, ab),
                                     o_proj=proj(NH, D, ab)),
            post_attention_layernorm=RMSNorm(s(L, D)),
            mlp=ArceeMLP(up_proj=proj(D, F, mb), down_proj=proj(F, D, mb)),
        ),
        norm=RMSNorm(s(D)),
    )
    arch, heads = config.architecture, {}
    if arch == "ArceeForCausalLM" and not config.tie_word_embeddings:
        heads["lm_head"] = Linear(s(D, V))
    if arch == "ArceeForSequenceClassification":
        heads["score"] = Linear(s(D, config.num_labels))
    if arch == "ArceeForTokenClassification":
        heads["score"] = Linear(s(D, config.num_labels), s(config.num_labels))
    if arch == "ArceeForQuestionAnswering":
        heads["qa_outputs"] = Linear(s(D, 2), s(2))
    return ArceeParams(model=body, **heads)


def base_prefix(config: ArceeConfig) -> str:
    """HF saves `ArceeModel` with bare keys, the QA head's body under `transformer.` (kept
    "for BC" in HF's ArceeForQuestionAnswering), and every other head's under `model.`."""
    if config.architecture == "ArceeModel":
        return ""
    return "transformer." if config.architecture == "ArceeForQuestionAnswering" else "model."


def name_rules(config: ArceeConfig) -> list[NameRule]:
    """Tree path <-> HF key for every leaf of `skeleton(config)`; `{i}` is the layer index."""
    p = base_prefix(config)
    rules = [
        NameRule("model.embed_tokens.table", f"{p}embed_tokens.weight"),
        NameRule("model.norm.scale", f"{p}norm.weight"),
        NameRule("model.layers.input_layernorm.scale", f"{p}layers.{{i}}.input_layernorm.weight"),
        NameRule("model.layers.post_attention_layernorm.scale", f"{p}layers.{{i}}.post_attention_layernorm.weight"),
    ]
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.up_proj", "mlp.down_proj"):
        rules.append(NameRule(f"model.layers.{module}.kernel", f"{p}layers.{{i}}.{module}.weight", transpose=True))
        rules.append(NameRule(f"model.layers.{module}.bias", f"{p}layers.{{i}}.{module}.bias"))
    for head in ("lm_head", "score", "qa_outputs"):
        rules.append(NameRule(f"{head}.kernel", f"{head}.weight", transpose=True))
        rules.append(NameRule(f"{head}.bias", f"{head}.bias"))
    return rules


def dropped_keys(config: ArceeConfig) -> dict[str, str]:
    """Checkpoint keys (regex) that real files may hold but we do not load."""
    dropped = {r"(model\.)?rotary_emb\.inv_freq": "RoPE buffer of old checkpoints; recomputed from the config"}
    if config.tie_word_embeddings:
        dropped[r"lm_head\.weight"] = "tied to model.embed_tokens.weight, as HF ties it"
    return dropped

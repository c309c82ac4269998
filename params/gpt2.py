"""What a GPT-2 checkpoint is: the parameter pytree and its Hugging Face tensor names.

Mirrors `transformers/models/gpt2/modeling_gpt2.py` module paths: `transformer.h.3.attn.c_attn`
in HF is `params.transformer.h.attn.c_attn` here, with the 12 layers stacked on a leading
axis so the forward pass can `lax.scan` over them. GPT-2 uses `Conv1D`, whose weight is
already [in, out]; the heads are `nn.Linear`, stored [out, in] in HF and transposed here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import equinox as eqx
import jax
import numpy as np

from refjax.params.common import Embedding, LayerNorm, Linear
from refjax.params.config import (ACTIVATIONS, SUMMARY_TYPES, ConfigError, _common, _family_architecture, _Fields,
                                  writer_major)
from refjax.params.io import NameRule


# The config: HF `GPT2Config`, parsed from config.json

GPT2_ARCHITECTURES = (
    "GPT2Model",
    "GPT2LMHeadModel",
    "GPT2DoubleHeadsModel",
    "GPT2ForSequenceClassification",
    "GPT2ForTokenClassification",
    "GPT2ForQuestionAnswering",
)


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
    # dropout rates (HF's training mode, `forward(..., train=True)`; inference ignores them)
    embd_pdrop: float = 0.1  # transformer.drop, on the embeddings' sum
    attn_pdrop: float = 0.1  # h.{i}.attn.attn_dropout, on the attention probabilities
    resid_pdrop: float = 0.1  # h.{i}.attn.resid_dropout and h.{i}.mlp.dropout, on each residual branch
    summary_first_dropout: float = 0.1  # multiple_choice_head.first_dropout (GPT2DoubleHeadsModel)
    summary_last_dropout: float = 0.0  # multiple_choice_head.last_dropout (HF: Identity unless the key is set)
    classifier_dropout: float | None = None  # GPT2ForTokenClassification's dropout (None: 0.1, as HF)
    # How eager attention fills a future key's score (ref/attention.py: FUTURE_NEG_INF, FUTURE_FINFO_MIN).
    # transformers 4.x's GPT-2 masks the future with a `where` and adds the padding mask, so a query that
    # sees no real key (a left-pad position) attends uniformly to its past; 5.x adds one finfo.min mask
    # for pad and future alike, so it attends uniformly to every key (real positions are unaffected).
    # Parsed from config.json's transformers_version: 5 or later -> "finfo.min" (refjax runs a config as
    # the transformers that wrote it does; golden gpt2/v5-lm, docs/design.md "transformers v5").
    future_fill: str = "-inf"

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
        embd_pdrop=f.probability("embd_pdrop", 0.1),
        attn_pdrop=f.probability("attn_pdrop", 0.1),
        resid_pdrop=f.probability("resid_pdrop", 0.1),
        summary_first_dropout=f.probability("summary_first_dropout", 0.1),
        summary_last_dropout=f.probability("summary_last_dropout", 0.0),  # GPT2Config has no such default
        classifier_dropout=f.probability("classifier_dropout", None, optional=True),
        future_fill="finfo.min" if (writer_major(raw) or 0) >= 5 else "-inf",
        **{**_common(f), **({"num_labels": 1} if architecture == "GPT2DoubleHeadsModel" else {})},
    )
    f.check_all_used(GPT2_IGNORED)
    return config


class GPT2Attention(eqx.Module):
    c_attn: Linear  # [L, D, 3D]  fused q, k, v
    c_proj: Linear  # [L, D, D]


class GPT2MLP(eqx.Module):
    c_fc: Linear  # [L, D, F]
    c_proj: Linear  # [L, F, D]


class GPT2Block(eqx.Module):
    """One transformer block; every leaf has a leading layer axis [L, ...]."""

    ln_1: LayerNorm
    attn: GPT2Attention
    ln_2: LayerNorm
    mlp: GPT2MLP


class GPT2Body(eqx.Module):
    """HF `GPT2Model`."""

    wte: Embedding  # [V, D]  also the tied LM head
    wpe: Embedding  # [P, D]
    h: GPT2Block  # stacked over L
    ln_f: LayerNorm


class GPT2Params(eqx.Module):
    """A GPT-2 body with the head its architecture needs; the other head fields are None."""

    transformer: GPT2Body
    lm_head: Linear | None = None  # [D, V]; None when tied to transformer.wte (HF default)
    multiple_choice_head: Linear | None = None  # GPT2SequenceSummary.summary [D, summary_size]
    score: Linear | None = None  # [D, num_labels], no bias
    classifier: Linear | None = None  # [D, num_labels]
    qa_outputs: Linear | None = None  # [D, 2]


LM_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2DoubleHeadsModel")


def skeleton(config: GPT2Config, dtype=np.float32) -> GPT2Params:
    """The parameter tree with `jax.ShapeDtypeStruct` leaves: shapes without memory."""
    D, F, V, P, L = config.n_embd, config.inner_dim, config.vocab_size, config.n_positions, config.n_layer

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    def norm(*lead):
        return LayerNorm(scale=s(*lead, D), bias=s(*lead, D))

    body = GPT2Body(
        wte=Embedding(s(V, D)),
        wpe=Embedding(s(P, D)),
        h=GPT2Block(
            ln_1=norm(L),
            attn=GPT2Attention(c_attn=Linear(s(L, D, 3 * D), s(L, 3 * D)), c_proj=Linear(s(L, D, D), s(L, D))),
            ln_2=norm(L),
            mlp=GPT2MLP(c_fc=Linear(s(L, D, F), s(L, F)), c_proj=Linear(s(L, F, D), s(L, D))),
        ),
        ln_f=norm(),
    )
    arch, heads = config.architecture, {}
    if arch in LM_ARCHITECTURES and not config.tie_word_embeddings:
        heads["lm_head"] = Linear(s(D, V))
    if arch == "GPT2DoubleHeadsModel" and config.summary_use_proj:
        heads["multiple_choice_head"] = Linear(s(D, config.summary_size), s(config.summary_size))
    if arch == "GPT2ForSequenceClassification":
        heads["score"] = Linear(s(D, config.num_labels))
    if arch == "GPT2ForTokenClassification":
        heads["classifier"] = Linear(s(D, config.num_labels), s(config.num_labels))
    if arch == "GPT2ForQuestionAnswering":
        heads["qa_outputs"] = Linear(s(D, 2), s(2))
    return GPT2Params(transformer=body, **heads)


def _body_rules(prefix: str) -> list[NameRule]:
    """HF names of the body; `{i}` is the layer index (stacked on axis 0 here)."""
    rules = [
        NameRule("transformer.wte.table", f"{prefix}wte.weight"),
        NameRule("transformer.wpe.table", f"{prefix}wpe.weight"),
        NameRule("transformer.ln_f.scale", f"{prefix}ln_f.weight"),
        NameRule("transformer.ln_f.bias", f"{prefix}ln_f.bias"),
    ]
    for ours, hf in [("ln_1.scale", "ln_1.weight"), ("ln_1.bias", "ln_1.bias"),
                     ("ln_2.scale", "ln_2.weight"), ("ln_2.bias", "ln_2.bias")]:
        rules.append(NameRule(f"transformer.h.{ours}", f"{prefix}h.{{i}}.{hf}"))
    for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        # Conv1D: weight already [in, out]
        rules.append(NameRule(f"transformer.h.{module}.kernel", f"{prefix}h.{{i}}.{module}.weight"))
        rules.append(NameRule(f"transformer.h.{module}.bias", f"{prefix}h.{{i}}.{module}.bias"))
    return rules


_HEAD_RULES = [  # nn.Linear heads: HF weight [out, in] -> kernel [in, out]
    NameRule("lm_head.kernel", "lm_head.weight", transpose=True),
    NameRule("multiple_choice_head.kernel", "multiple_choice_head.summary.weight", transpose=True),
    NameRule("multiple_choice_head.bias", "multiple_choice_head.summary.bias"),
    NameRule("score.kernel", "score.weight", transpose=True),
    NameRule("classifier.kernel", "classifier.weight", transpose=True),
    NameRule("classifier.bias", "classifier.bias"),
    NameRule("qa_outputs.kernel", "qa_outputs.weight", transpose=True),
    NameRule("qa_outputs.bias", "qa_outputs.bias"),
]


def name_rules(config: GPT2Config) -> list[NameRule]:
    """Tree path <-> HF key for every leaf of `skeleton(config)`.

    HF saves `GPT2Model` with bare keys (`h.0.ln_1.weight`) and every head class with
    the body under `transformer.`.
    """
    return _body_rules(base_prefix(config)) + _HEAD_RULES


def dropped_keys(config: GPT2Config) -> dict[str, str]:
    """Checkpoint keys (regex) that exist in real files but hold nothing we load."""
    dropped = {
        r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)": "causal-mask buffers of old checkpoints; recomputed",
    }
    if config.tie_word_embeddings:
        dropped[r"lm_head\.weight"] = "tied to transformer.wte.weight, as HF ties it"
    return dropped


def base_prefix(config: GPT2Config) -> str:
    """Where the body's keys live. HF's real `gpt2` checkpoint stores bare body keys
    (`h.0.ln_1.weight`) under a GPT2LMHeadModel config; HF (and the loader) accept that."""
    return "" if config.architecture == "GPT2Model" else "transformer."

"""What an I-BERT checkpoint is: config, parameter pytree, quantization state, HF names.

Mirrors `transformers/models/ibert/{configuration,modeling}_ibert.py` and `quant_modules.py`.
I-BERT (Kim et al., 2021, "I-BERT: Integer-only BERT Quantization") is RoBERTa with every
module swapped for a quantized twin; with `quant_mode=False` it is plain RoBERTa (post-LN,
exact GELU, RoBERTa position ids).

Three kinds of tensors sit in an HF I-BERT checkpoint:
  * parameters (`weight`, `bias`): the float weights; the tree below.
  * activation-range state (`QuantAct.x_min`/`x_max`, `IntLayerNorm.shift`): set only by
    running HF in train mode (calibration). Loaded as `params.state` (`IBertQuantState`),
    an explicit pytree; `ref.ibert.calibrate` is the pure train-mode update.
  * buffers HF recomputes at every quantized forward from the two above
    (`weight_integer`, `fc_scaling_factor`, `bias_integer`, `weight_scaling_factor`,
    `act_scaling_factor`) or never uses: `dropped_keys`, each with its reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import equinox as eqx
import jax
import numpy as np

from refjax.params.common import Embedding, LayerNorm, Linear
from refjax.params.config import ConfigError, _common, _Fields, _family_architecture
from refjax.params.io import NameRule

# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

IBERT_ARCHITECTURES = (
    "IBertModel",
    "IBertForMaskedLM",
    "IBertForSequenceClassification",
    "IBertForMultipleChoice",
    "IBertForTokenClassification",
    "IBertForQuestionAnswering",
)
FORCE_DEQUANT = ("none", "gelu", "softmax", "layernorm", "nonlinear")


@dataclasses.dataclass(frozen=True)
class IBertConfig:
    """HF `IBertConfig` plus the head it is used with."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    position_embedding_type: str
    quant_mode: bool
    force_dequant: str
    tie_word_embeddings: bool
    num_labels: int
    problem_type: str | None
    # dropout rates (HF's training mode, `forward(..., train=True)`; inference ignores them)
    hidden_dropout_prob: float = 0.1  # embeddings.dropout, both residual branches' dropout, the heads' dropout
    attention_probs_dropout_prob: float = 0.1  # encoder.layer.{i}.attention.self.dropout, on the probabilities

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table serves: RoBERTa positions start at
        pad_token_id + 1, so max_position_embeddings - pad_token_id - 1 tokens."""
        return self.max_position_embeddings - self.pad_token_id - 1

    def quantized(self, module: str) -> bool:
        """Whether `module` ("gelu", "softmax", "layernorm", or "linear" for the rest) runs
        integer-only: quant_mode, unless force_dequant switches it back to float."""
        if not self.quant_mode:
            return False
        if module == "linear":
            return True
        return self.force_dequant not in (module, "nonlinear")


IBERT_IGNORED = {
    "model_type": "checked to be 'ibert'",
    "classifier_dropout": "I-BERT's heads do not read it (their dropout rate is hidden_dropout_prob)",
    "is_decoder": "I-BERT is an encoder",
    "add_cross_attention": "I-BERT has no cross-attention (HF ignores it)",
}


def parse_ibert_config(raw: Mapping[str, Any], architecture: str | None = None) -> IBertConfig:
    """Parse an I-BERT config.json dict with HF's defaults; unknown keys are errors."""
    f = _Fields(raw, "ibert")
    architecture = _family_architecture(raw, "ibert", architecture, IBERT_ARCHITECTURES)
    hidden = f.int("hidden_size", 768)
    heads = f.int("num_attention_heads", 12)
    if hidden % heads:
        raise ConfigError(f"ibert config: field 'num_attention_heads' ({heads}) must divide 'hidden_size' ({hidden})")
    # HF raises for anything else in IBertIntermediate / IBertSelfAttention
    hidden_act = f.choice("hidden_act", "gelu", ("gelu",))
    position_embedding_type = f.choice("position_embedding_type", "absolute", ("absolute",))
    pad = f.token_id("pad_token_id")
    if pad is None:
        pad = 1 if "pad_token_id" not in raw else None
    if pad is None or pad < 0:
        raise ConfigError(f"ibert config: field 'pad_token_id' must be a token id >= 0 (RoBERTa positions start "
                          f"after it), got {raw.get('pad_token_id')!r}")
    max_pos = f.int("max_position_embeddings", 512)
    if max_pos <= pad + 1:
        raise ConfigError(f"ibert config: field 'max_position_embeddings' ({max_pos}) must exceed pad_token_id + 1 "
                          f"({pad + 1}): RoBERTa positions start at pad_token_id + 1")
    vocab = f.int("vocab_size", 30522)
    if pad >= vocab:
        raise ConfigError(f"ibert config: field 'pad_token_id' ({pad}) must be < vocab_size ({vocab})")
    common = _common(f)
    config = IBertConfig(
        architecture=architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=f.int("num_hidden_layers", 12),
        num_attention_heads=heads,
        intermediate_size=f.int("intermediate_size", 3072),
        hidden_act=hidden_act,
        max_position_embeddings=max_pos,
        type_vocab_size=f.int("type_vocab_size", 2),
        layer_norm_eps=f.float("layer_norm_eps", 1e-12, positive=True),
        pad_token_id=pad,
        bos_token_id=f.token_id("bos_token_id") if "bos_token_id" in raw else 0,
        eos_token_id=f.token_id("eos_token_id", allow_list=True) if "eos_token_id" in raw else 2,
        position_embedding_type=position_embedding_type,
        quant_mode=f.bool("quant_mode", False),
        force_dequant=f.choice("force_dequant", "none", FORCE_DEQUANT),
        tie_word_embeddings=f.bool("tie_word_embeddings", True),
        hidden_dropout_prob=f.probability("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=f.probability("attention_probs_dropout_prob", 0.1),
        **common,
    )
    if architecture == "IBertForQuestionAnswering" and config.num_labels != 2:
        raise ConfigError(f"ibert config: IBertForQuestionAnswering needs num_labels == 2 (start and end logits), "
                          f"got {config.num_labels}")
    f.check_all_used(IBERT_IGNORED)
    return config


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


class IBertEmbeddings(eqx.Module):
    word_embeddings: Embedding  # [V, D]
    position_embeddings: Embedding  # [P, D]
    token_type_embeddings: Embedding  # [type_vocab, D]
    LayerNorm: LayerNorm  # noqa: N815 (HF name)


class IBertSelfAttention(eqx.Module):
    query: Linear  # [L, D, D]
    key: Linear
    value: Linear


class IBertAttentionOutput(eqx.Module):
    dense: Linear  # [L, D, D]
    LayerNorm: LayerNorm  # noqa: N815


class IBertLayer(eqx.Module):
    """One encoder layer; every leaf has a leading layer axis [L, ...]."""

    attention_self: IBertSelfAttention  # HF `attention.self`
    attention_output: IBertAttentionOutput  # HF `attention.output`
    intermediate: Linear  # HF `intermediate.dense` [L, D, F]
    output: IBertAttentionOutput  # HF `output.dense` [L, F, D], `output.LayerNorm`


class IBertQuantState(eqx.Module):
    """Activation-range state of the quantized model (HF buffers), keyed by HF module path
    below `embeddings.` / `encoder.layer.{i}.`: `<QuantAct>.x_min`, `<QuantAct>.x_max` [1]
    and `<IntLayerNorm>.shift` [1] (a power-of-two exponent, stored as a float like HF).
    `layer` entries are stacked [L, 1]."""

    embeddings: dict
    layer: dict


# The QuantAct modules HF's forward calls (embeddings_act2 and IntLayerNorm.activation never are).
EMBEDDING_ACTS = ("embeddings_act1", "output_activation")
EMBEDDING_SHIFTS = ("LayerNorm",)
LAYER_ACTS = (
    "attention.self.query_activation", "attention.self.key_activation", "attention.self.value_activation",
    "attention.self.softmax.act", "attention.self.output_activation", "attention.output.ln_input_act",
    "attention.output.output_activation", "pre_intermediate_act", "intermediate.output_activation",
    "pre_output_act", "output.ln_input_act", "output.output_activation",
)
LAYER_SHIFTS = ("attention.output.LayerNorm", "output.LayerNorm")


class IBertBody(eqx.Module):
    """HF `IBertModel` (the pooler only where the head has one)."""

    embeddings: IBertEmbeddings
    layer: IBertLayer  # stacked over L
    pooler: Linear | None = None  # [D, D]


class IBertLMHead(eqx.Module):
    dense: Linear  # [D, D]
    layer_norm: LayerNorm
    decoder: Linear  # kernel [D, V] (None when tied to word_embeddings), bias [V] (HF `lm_head.bias`)


class IBertClassificationHead(eqx.Module):
    dense: Linear  # [D, D]
    out_proj: Linear  # [D, num_labels]


class IBertParams(eqx.Module):
    ibert: IBertBody
    state: IBertQuantState
    lm_head: IBertLMHead | None = None
    classifier: Any = None  # IBertClassificationHead (sequence classification) or Linear
    qa_outputs: Linear | None = None  # [D, 2]


def state_skeleton(config: IBertConfig, dtype=np.float32) -> IBertQuantState:
    L = config.num_hidden_layers
    emb = {f"{m}.{b}": jax.ShapeDtypeStruct((1,), dtype) for m in EMBEDDING_ACTS for b in ("x_min", "x_max")}
    emb.update({f"{m}.shift": jax.ShapeDtypeStruct((1,), dtype) for m in EMBEDDING_SHIFTS})
    layer = {f"{m}.{b}": jax.ShapeDtypeStruct((L, 1), dtype) for m in LAYER_ACTS for b in ("x_min", "x_max")}
    layer.update({f"{m}.shift": jax.ShapeDtypeStruct((L, 1), dtype) for m in LAYER_SHIFTS})
    return IBertQuantState(embeddings=emb, layer=layer)


def initial_state(config: IBertConfig, dtype=np.float32) -> IBertQuantState:
    """HF's buffers at construction: x_min = -1e-5, x_max = 1e-5 (in float32), shift = 0."""
    def init(path, spec):
        value = {"x_min": -1e-5, "x_max": 1e-5, "shift": 0.0}[path.rsplit(".", 1)[1]]
        return jax.numpy.full(spec.shape, np.float32(value), dtype)

    skel = state_skeleton(config, dtype)
    return IBertQuantState(embeddings={k: init(k, v) for k, v in skel.embeddings.items()},
                           layer={k: init(k, v) for k, v in skel.layer.items()})


def skeleton(config: IBertConfig, dtype=np.float32) -> IBertParams:
    """The parameter tree with `jax.ShapeDtypeStruct` leaves: shapes without memory."""
    D, F, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    def lin(n_in, n_out, stacked=True):
        return Linear(s(L, n_in, n_out), s(L, n_out)) if stacked else Linear(s(n_in, n_out), s(n_out))

    def ln(stacked=True):
        return LayerNorm(s(L, D), s(L, D)) if stacked else LayerNorm(s(D), s(D))

    arch = config.architecture
    body = IBertBody(
        embeddings=IBertEmbeddings(
            word_embeddings=Embedding(s(V, D)), position_embeddings=Embedding(s(config.max_position_embeddings, D)),
            token_type_embeddings=Embedding(s(config.type_vocab_size, D)), LayerNorm=ln(False)),
        layer=IBertLayer(
            attention_self=IBertSelfAttention(query=lin(D, D), key=lin(D, D), value=lin(D, D)),
            attention_output=IBertAttentionOutput(dense=lin(D, D), LayerNorm=ln()),
            intermediate=lin(D, F),
            output=IBertAttentionOutput(dense=lin(F, D), LayerNorm=ln())),
        pooler=lin(D, D, False) if arch in ("IBertModel", "IBertForMultipleChoice") else None,
    )
    heads: dict[str, Any] = {}
    if arch == "IBertForMaskedLM":
        decoder = Linear(None if config.tie_word_embeddings else s(D, V), s(V))
        heads["lm_head"] = IBertLMHead(dense=lin(D, D, False), layer_norm=ln(False), decoder=decoder)
    elif arch == "IBertForSequenceClassification":
        heads["classifier"] = IBertClassificationHead(dense=lin(D, D, False), out_proj=lin(D, config.num_labels, False))
    elif arch == "IBertForMultipleChoice":
        heads["classifier"] = lin(D, 1, False)
    elif arch == "IBertForTokenClassification":
        heads["classifier"] = lin(D, config.num_labels, False)
    elif arch == "IBertForQuestionAnswering":
        heads["qa_outputs"] = lin(D, config.num_labels, False)
    return IBertParams(ibert=body, state=state_skeleton(config, dtype), **heads)


def base_prefix(config: IBertConfig) -> str:
    return "" if config.architecture == "IBertModel" else "ibert."


def name_rules(config: IBertConfig) -> list[NameRule]:
    """Tree path <-> HF key for every leaf of `skeleton(config)`; `{i}` is the layer index."""
    p = base_prefix(config)
    e, l = f"{p}embeddings.", f"{p}encoder.layer.{{i}}."
    rules = [NameRule(f"ibert.embeddings.{n}.table", f"{e}{n}.weight")
             for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    rules += [NameRule("ibert.embeddings.LayerNorm.scale", f"{e}LayerNorm.weight"),
              NameRule("ibert.embeddings.LayerNorm.bias", f"{e}LayerNorm.bias")]
    linears = {"attention_self.query": "attention.self.query", "attention_self.key": "attention.self.key",
               "attention_self.value": "attention.self.value", "attention_output.dense": "attention.output.dense",
               "intermediate": "intermediate.dense", "output.dense": "output.dense"}
    for ours, hf in linears.items():
        rules.append(NameRule(f"ibert.layer.{ours}.kernel", f"{l}{hf}.weight", transpose=True))
        rules.append(NameRule(f"ibert.layer.{ours}.bias", f"{l}{hf}.bias"))
    for ours, hf in (("attention_output", "attention.output"), ("output", "output")):
        rules.append(NameRule(f"ibert.layer.{ours}.LayerNorm.scale", f"{l}{hf}.LayerNorm.weight"))
        rules.append(NameRule(f"ibert.layer.{ours}.LayerNorm.bias", f"{l}{hf}.LayerNorm.bias"))
    rules += [NameRule("ibert.pooler.kernel", f"{p}pooler.dense.weight", transpose=True),
              NameRule("ibert.pooler.bias", f"{p}pooler.dense.bias")]
    skel = state_skeleton(config)
    rules += [NameRule(f"state.embeddings.{k}", f"{e}{k}") for k in skel.embeddings]
    rules += [NameRule(f"state.layer.{k}", f"{l}{k}") for k in skel.layer]
    for head in ("lm_head.dense", "classifier.dense", "classifier.out_proj", "classifier", "qa_outputs"):
        rules.append(NameRule(f"{head}.kernel", f"{head}.weight", transpose=True))
        rules.append(NameRule(f"{head}.bias", f"{head}.bias"))
    rules += [NameRule("lm_head.layer_norm.scale", "lm_head.layer_norm.weight"),
              NameRule("lm_head.layer_norm.bias", "lm_head.layer_norm.bias"),
              NameRule("lm_head.decoder.kernel", "lm_head.decoder.weight", transpose=True),
              NameRule("lm_head.decoder.bias", "lm_head.bias")]
    return rules


def dropped_keys(config: IBertConfig) -> dict[str, str]:
    """Checkpoint keys (regex) that HF writes but we do not load, with the reason."""
    recomputed = "recomputed from the float weights at every quantized forward (HF overwrites it too)"
    dropped = {
        r".*\.(weight_integer|fc_scaling_factor|bias_integer|weight_scaling_factor)": recomputed,
        r".*\.act_scaling_factor": "recomputed from x_min/x_max at every quantized forward (HF overwrites it too)",
        r"(ibert\.)?embeddings\.embeddings_act2\.(x_min|x_max)": "HF's forward never calls embeddings_act2 "
                                                                 "(it applies embeddings_act1 twice)",
        r".*LayerNorm\.activation\.(x_min|x_max)": "IntLayerNorm.activation is never called by HF's forward",
        r"(ibert\.)?embeddings\.position_ids": "non-persistent buffer of old checkpoints; positions are computed",
        r"lm_head\.decoder\.bias": "tied to lm_head.bias, as HF ties it",
    }
    if config.tie_word_embeddings:
        dropped[r"lm_head\.decoder\.weight"] = "tied to embeddings.word_embeddings.weight, as HF ties it"
    return dropped

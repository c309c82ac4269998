"""What a RoFormer checkpoint is: its config, the parameter pytree and the HF tensor names.

Mirrors `transformers/models/roformer/{configuration,modeling}_roformer.py` (Su et al., 2021,
"RoFormer: Enhanced Transformer with Rotary Position Embedding"). A BERT-style post-LN
encoder (optionally a causal decoder, `is_decoder`) whose self-attention rotates queries and
keys (and, with `rotary_value`, values) by a sinusoidal table. HF `roformer.encoder.layer.3.
attention.self.query` is `params.roformer.encoder.layer.attention.self.query` here, layers
stacked on a leading axis. Every projection is an `nn.Linear` (HF weight [out, in]), stored
transposed as kernel [in, out].

The sinusoidal table (`encoder.embed_positions.weight` [P, H], H = hidden_size / heads) is an
`nn.Parameter` in HF: `save_pretrained` writes it and `from_pretrained` loads it, so it is a
parameter here too (`sinusoidal_table` recomputes HF's values, for tests and for checkpoints
that lack it: HF re-initialises a missing table, and so does `computed_tensors`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import equinox as eqx
import jax
import numpy as np

from refjax.params.common import Embedding, LayerNorm, Linear
from refjax.params.config import (ACTIVATIONS, SUMMARY_TYPES, ConfigError, _common, _family_architecture, _Fields)
from refjax.params.io import NameRule

# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

ROFORMER_ARCHITECTURES = (
    "RoFormerModel",
    "RoFormerForMaskedLM",
    "RoFormerForCausalLM",
    "RoFormerForSequenceClassification",
    "RoFormerForMultipleChoice",
    "RoFormerForTokenClassification",
    "RoFormerForQuestionAnswering",
)

# RoFormerSequenceSummary (multiple choice) reads the optional summary_* config attributes with
# getattr; RoFormerConfig itself has none of them, so HF's defaults are "last", no projection, no
# activation. Accepted summary types: GPT-2's (params.config.SUMMARY_TYPES, the same HF class).


@dataclasses.dataclass(frozen=True)
class RoFormerConfig:
    """HF `RoFormerConfig` (models/roformer/configuration_roformer.py) plus the head it is used with."""

    architecture: str
    vocab_size: int
    embedding_size: int  # HF: hidden_size when null; != hidden_size adds `embeddings_project`
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int  # rows of the sinusoidal table: the longest sequence (+ cache)
    type_vocab_size: int
    layer_norm_eps: float
    rotary_value: bool  # rotate the values too
    is_decoder: bool  # causal self-attention (and a KV cache); any head honours it, as in HF
    tie_word_embeddings: bool  # MLM/CLM decoder weight = word embeddings
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    pad_token_id: int | None
    num_labels: int
    problem_type: str | None
    summary_type: str
    summary_use_proj: bool
    summary_proj_to_labels: bool
    summary_activation: str | None
    # dropout rates (HF's training mode, `forward(..., train=True)`; inference ignores them)
    hidden_dropout_prob: float = 0.1  # embeddings.dropout, both residual branches' dropout, the heads' dropout
    attention_probs_dropout_prob: float = 0.1  # encoder.layer.{i}.attention.self.dropout, on the probabilities
    summary_first_dropout: float = 0.0  # sequence_summary.first_dropout (multiple choice; HF: absent = none)
    summary_last_dropout: float = 0.0  # sequence_summary.last_dropout

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def summary_size(self) -> int:
        """Width of RoFormerSequenceSummary's optional projection."""
        if self.summary_proj_to_labels and self.num_labels > 0:
            return self.num_labels
        return self.hidden_size


ROFORMER_IGNORED = {
    "model_type": "checked to be 'roformer'",
    "classifier_dropout": "RoFormer's heads do not read it (their dropout rate is hidden_dropout_prob)",
    "add_cross_attention": "must be false: checked below",
}


def parse_roformer_config(raw: Mapping[str, Any], architecture: str | None = None) -> RoFormerConfig:
    """Parse a RoFormer config.json dict with HF's defaults; unknown keys are errors."""
    f = _Fields(raw, "roformer")
    architecture = _family_architecture(raw, "roformer", architecture, ROFORMER_ARCHITECTURES)
    if raw.get("add_cross_attention"):
        raise ConfigError("roformer config: field 'add_cross_attention' is not supported (RoFormer as a "
                          "cross-attending decoder needs encoder_hidden_states)")
    hidden_size = f.int("hidden_size", 768)
    heads = f.int("num_attention_heads", 12)
    if hidden_size % heads:  # HF skips this check (RoFormerConfig always has embedding_size) and then fails on shapes
        raise ConfigError(f"roformer config: field 'num_attention_heads' ({heads}) must divide 'hidden_size' "
                          f"({hidden_size})")
    if (hidden_size // heads) % 2:
        raise ConfigError(f"roformer config: hidden_size / num_attention_heads = {hidden_size // heads} must be even "
                          "(the rotary embedding rotates pairs of features)")
    embedding_size = f.int("embedding_size", None, optional=True)
    summary_activation = f.raw.get("summary_activation")
    f.used.add("summary_activation")
    if summary_activation in ("", None):  # HF: a falsy name means identity
        summary_activation = None
    elif summary_activation not in ACTIVATIONS:
        raise ConfigError(f"roformer config: field 'summary_activation' is {summary_activation!r}; accepted values: "
                          + ", ".join(ACTIVATIONS) + ", or null")
    summary_type = f.choice("summary_type", "last", SUMMARY_TYPES)
    common = _common(f)
    if architecture == "RoFormerForQuestionAnswering":
        common["num_labels"] = 2  # HF's __init__ overwrites config.num_labels
    config = RoFormerConfig(
        architecture=architecture,
        vocab_size=f.int("vocab_size", 50000),
        embedding_size=embedding_size if embedding_size is not None else hidden_size,
        hidden_size=hidden_size,
        num_hidden_layers=f.int("num_hidden_layers", 12),
        num_attention_heads=heads,
        intermediate_size=f.int("intermediate_size", 3072),
        hidden_act=f.choice("hidden_act", "gelu", ACTIVATIONS),
        max_position_embeddings=f.int("max_position_embeddings", 1536),
        type_vocab_size=f.int("type_vocab_size", 2),
        layer_norm_eps=f.float("layer_norm_eps", 1e-12, positive=True),
        rotary_value=f.bool("rotary_value", False),
        is_decoder=f.bool("is_decoder", False),
        tie_word_embeddings=f.bool("tie_word_embeddings", True),
        bos_token_id=f.token_id("bos_token_id"),
        eos_token_id=f.token_id("eos_token_id", allow_list=True),
        pad_token_id=f.token_id("pad_token_id") if "pad_token_id" in raw else 0,  # HF default 0
        summary_type=summary_type,
        summary_use_proj=f.bool("summary_use_proj", False),
        summary_proj_to_labels=f.bool("summary_proj_to_labels", False),
        summary_activation=summary_activation,
        hidden_dropout_prob=f.probability("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=f.probability("attention_probs_dropout_prob", 0.1),
        # RoFormerSequenceSummary: nn.Dropout only when the attribute exists and is > 0
        summary_first_dropout=f.probability("summary_first_dropout", 0.0),
        summary_last_dropout=f.probability("summary_last_dropout", 0.0),
        **common,
    )
    f.used.add("pad_token_id")
    f.check_all_used(ROFORMER_IGNORED)
    if architecture == "RoFormerForMultipleChoice" and config.summary_use_proj and config.summary_size != hidden_size:
        raise ConfigError(f"roformer config: summary_proj_to_labels projects to num_labels={config.num_labels}, but "
                          f"the multiple-choice classifier reads hidden_size={hidden_size} features (HF fails too)")
    return config


# --------------------------------------------------------------------------------------
# Parameter tree
# --------------------------------------------------------------------------------------


class RoFormerEmbeddings(eqx.Module):
    word_embeddings: Embedding  # [V, E]
    token_type_embeddings: Embedding  # [type_vocab_size, E]
    LayerNorm: LayerNorm  # [E]


class RoFormerSelfAttention(eqx.Module):
    query: Linear  # [L, D, D]
    key: Linear  # [L, D, D]
    value: Linear  # [L, D, D]


class RoFormerSelfOutput(eqx.Module):
    dense: Linear  # [L, D, D]
    LayerNorm: LayerNorm  # [L, D]


class RoFormerAttention(eqx.Module):
    self_attention: RoFormerSelfAttention  # HF `attention.self` (a field cannot be named `self`)
    output: RoFormerSelfOutput


class RoFormerIntermediate(eqx.Module):
    dense: Linear  # [L, D, F]


class RoFormerOutput(eqx.Module):
    dense: Linear  # [L, F, D]
    LayerNorm: LayerNorm  # [L, D]


class RoFormerLayer(eqx.Module):
    """One post-LN layer; every leaf has a leading layer axis [L, ...]."""

    attention: RoFormerAttention
    intermediate: RoFormerIntermediate
    output: RoFormerOutput


class RoFormerEncoder(eqx.Module):
    embed_positions: Embedding  # [P, H]: [sin | cos] halves per position (see sinusoidal_table)
    layer: RoFormerLayer  # stacked over L


class RoFormerBody(eqx.Module):
    """HF `RoFormerModel` (no pooler)."""

    embeddings: RoFormerEmbeddings
    encoder: RoFormerEncoder
    embeddings_project: Linear | None = None  # [E, D] when embedding_size != hidden_size


class RoFormerPredictionHeadTransform(eqx.Module):
    dense: Linear  # [D, E]
    LayerNorm: LayerNorm  # [E]


class RoFormerLMPredictionHead(eqx.Module):
    """HF `cls.predictions`: transform, then decoder (tied: word embeddings) + bias [V]."""

    transform: RoFormerPredictionHeadTransform
    bias: jax.Array  # [V]
    decoder: Linear | None = None  # [E, V] without bias; None when tied to word_embeddings


class RoFormerClassificationHead(eqx.Module):
    """HF `RoFormerClassificationHead`: out_proj(act(dense(x[:, 0])))."""

    dense: Linear  # [D, D]
    out_proj: Linear  # [D, num_labels]


class RoFormerParams(eqx.Module):
    """A RoFormer body with the head its architecture needs; other head fields are None.

    `classifier` is a RoFormerClassificationHead for sequence classification and a Linear
    for token classification ([D, num_labels]) and multiple choice ([D, 1])."""

    roformer: RoFormerBody
    predictions: RoFormerLMPredictionHead | None = None  # HF `cls.predictions` (MaskedLM, CausalLM)
    classifier: Any = None
    sequence_summary: Linear | None = None  # multiple choice with summary_use_proj
    qa_outputs: Linear | None = None  # [D, 2]


def skeleton(config: RoFormerConfig, dtype=np.float32) -> RoFormerParams:
    """The parameter tree with `jax.ShapeDtypeStruct` leaves: shapes without memory."""
    D, E, F, V, L = (config.hidden_size, config.embedding_size, config.intermediate_size, config.vocab_size,
                     config.num_hidden_layers)

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    def lin(n_in, n_out, stacked=False, bias=True):
        lead = (L,) if stacked else ()
        return Linear(s(*lead, n_in, n_out), s(*lead, n_out) if bias else None)

    def norm(n, stacked=False):
        lead = (L,) if stacked else ()
        return LayerNorm(s(*lead, n), s(*lead, n))

    body = RoFormerBody(
        embeddings=RoFormerEmbeddings(word_embeddings=Embedding(s(V, E)),
                                      token_type_embeddings=Embedding(s(config.type_vocab_size, E)),
                                      LayerNorm=norm(E)),
        encoder=RoFormerEncoder(
            embed_positions=Embedding(s(config.max_position_embeddings, config.head_dim)),
            layer=RoFormerLayer(
                attention=RoFormerAttention(
                    self_attention=RoFormerSelfAttention(query=lin(D, D, True), key=lin(D, D, True), value=lin(D, D, True)),
                    output=RoFormerSelfOutput(dense=lin(D, D, True), LayerNorm=norm(D, True))),
                intermediate=RoFormerIntermediate(dense=lin(D, F, True)),
                output=RoFormerOutput(dense=lin(F, D, True), LayerNorm=norm(D, True)))),
        embeddings_project=lin(E, D) if E != D else None,
    )
    arch, heads = config.architecture, {}
    if arch in ("RoFormerForMaskedLM", "RoFormerForCausalLM"):
        heads["predictions"] = RoFormerLMPredictionHead(
            transform=RoFormerPredictionHeadTransform(dense=lin(D, E), LayerNorm=norm(E)),
            bias=s(V), decoder=None if config.tie_word_embeddings else lin(E, V, bias=False))
    elif arch == "RoFormerForSequenceClassification":
        heads["classifier"] = RoFormerClassificationHead(dense=lin(D, D), out_proj=lin(D, config.num_labels))
    elif arch == "RoFormerForMultipleChoice":
        heads["classifier"] = lin(D, 1)
        if config.summary_use_proj:
            heads["sequence_summary"] = lin(D, config.summary_size)
    elif arch == "RoFormerForTokenClassification":
        heads["classifier"] = lin(D, config.num_labels)
    elif arch == "RoFormerForQuestionAnswering":
        heads["qa_outputs"] = lin(D, 2)
    return RoFormerParams(roformer=body, **heads)


def base_prefix(config: RoFormerConfig) -> str:
    """HF saves `RoFormerModel` with bare keys and every head's body under `roformer.`."""
    return "" if config.architecture == "RoFormerModel" else "roformer."


def name_rules(config: RoFormerConfig) -> list[NameRule]:
    """Tree path <-> HF key for every leaf of `skeleton(config)`; `{i}` is the layer index."""
    p = base_prefix(config)
    rules = [
        NameRule("roformer.embeddings.word_embeddings.table", f"{p}embeddings.word_embeddings.weight"),
        NameRule("roformer.embeddings.token_type_embeddings.table", f"{p}embeddings.token_type_embeddings.weight"),
        NameRule("roformer.embeddings.LayerNorm.scale", f"{p}embeddings.LayerNorm.weight"),
        NameRule("roformer.embeddings.LayerNorm.bias", f"{p}embeddings.LayerNorm.bias"),
        NameRule("roformer.embeddings_project.kernel", f"{p}embeddings_project.weight", transpose=True),
        NameRule("roformer.embeddings_project.bias", f"{p}embeddings_project.bias"),
        NameRule("roformer.encoder.embed_positions.table", f"{p}encoder.embed_positions.weight"),
    ]
    layer = f"{p}encoder.layer.{{i}}"
    for module in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                   "intermediate.dense", "output.dense"):
        path = module.replace("attention.self.", "attention.self_attention.")
        rules.append(NameRule(f"roformer.encoder.layer.{path}.kernel", f"{layer}.{module}.weight", transpose=True))
        rules.append(NameRule(f"roformer.encoder.layer.{path}.bias", f"{layer}.{module}.bias"))
    for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
        rules.append(NameRule(f"roformer.encoder.layer.{norm}.scale", f"{layer}.{norm}.weight"))
        rules.append(NameRule(f"roformer.encoder.layer.{norm}.bias", f"{layer}.{norm}.bias"))
    rules += [
        NameRule("predictions.transform.dense.kernel", "cls.predictions.transform.dense.weight", transpose=True),
        NameRule("predictions.transform.dense.bias", "cls.predictions.transform.dense.bias"),
        NameRule("predictions.transform.LayerNorm.scale", "cls.predictions.transform.LayerNorm.weight"),
        NameRule("predictions.transform.LayerNorm.bias", "cls.predictions.transform.LayerNorm.bias"),
        NameRule("predictions.bias", "cls.predictions.bias"),
        NameRule("predictions.decoder.kernel", "cls.predictions.decoder.weight", transpose=True),
    ]
    if config.architecture == "RoFormerForSequenceClassification":
        for module in ("dense", "out_proj"):
            rules.append(NameRule(f"classifier.{module}.kernel", f"classifier.{module}.weight", transpose=True))
            rules.append(NameRule(f"classifier.{module}.bias", f"classifier.{module}.bias"))
    else:
        rules.append(NameRule("classifier.kernel", "classifier.weight", transpose=True))
        rules.append(NameRule("classifier.bias", "classifier.bias"))
    for head, hf in (("sequence_summary", "sequence_summary.summary"), ("qa_outputs", "qa_outputs")):
        rules.append(NameRule(f"{head}.kernel", f"{hf}.weight", transpose=True))
        rules.append(NameRule(f"{head}.bias", f"{hf}.bias"))
    return rules


def dropped_keys(config: RoFormerConfig) -> dict[str, str]:
    """Checkpoint keys (regex) that real files may hold but we do not load."""
    dropped = {
        r"cls\.predictions\.decoder\.bias": "4.x: the same tensor as cls.predictions.bias (HF ties them); 5.x untied: "
                                        "its own bias, read in that one's place (computed_tensors)",
        r"(roformer\.)?pooler\..*": "converted TF checkpoints carry a BERT pooler; HF's RoFormerModel has none and "
                                    "ignores it",
    }
    if config.tie_word_embeddings:
        dropped[r"cls\.predictions\.decoder\.weight"] = "tied to roformer.embeddings.word_embeddings.weight, as HF ties it"
    return dropped


def sinusoidal_table(num_positions: int, dim: int) -> np.ndarray:
    """HF `RoFormerSinusoidalPositionalEmbedding._init_weight`, value for value: angles
    pos / 10000^(2*(j//2)/dim) in numpy float64, sin of the even columns into the first half,
    cos of the odd ones into the second, each rounded to float32 (`torch.FloatTensor`).
    Row p is [sin(p*w_0) .. sin(p*w_{d/2-1}), cos(p*w_0) .. cos(p*w_{d/2-1})], w_i = 10000^(-2i/d).
    HF's float64 models keep these float32-rounded values (the table is built in float32).
    [num_positions, dim] float32"""
    position_enc = np.array(
        [[pos / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)] for pos in range(num_positions)])
    sentinel = dim // 2 if dim % 2 == 0 else dim // 2 + 1
    out = np.empty((num_positions, dim), np.float32)
    out[:, :sentinel] = np.sin(position_enc[:, 0::2]).astype(np.float32)
    out[:, sentinel:] = np.cos(position_enc[:, 1::2]).astype(np.float32)
    return out


def computed_tensors(config: RoFormerConfig, tensors) -> dict[str, np.ndarray]:
    """Tensors HF's from_pretrained ends up with where the file lacks them or says otherwise
    (`tensors`: the checkpoint's, name -> tensor):

    - the sinusoidal table, when missing (from_pretrained re-runs `_init_weight` for it);
    - with an untied decoder, `cls.predictions.decoder.bias` in place of `cls.predictions.bias`
      when the file has it: transformers 5.x ties the two only with tie_word_embeddings, so an
      untied model has two biases, saves both and adds only the decoder's (golden
      roformer/v5-mlm-untied). 4.x shares one tensor and writes `cls.predictions.bias` alone
      (or both, equal, in old .bin files), so this changes nothing for 4.x files.
    """
    out = {}
    if not config.tie_word_embeddings and "cls.predictions.decoder.bias" in tensors:
        out["cls.predictions.bias"] = tensors["cls.predictions.decoder.bias"]
    table_key = "encoder.embed_positions.weight"
    if any(k.endswith(table_key) for k in tensors):
        return out
    prefixed = base_prefix(config) and any(k.startswith(base_prefix(config)) for k in tensors)
    name = (base_prefix(config) if prefixed else "") + table_key
    return {**out, name: sinusoidal_table(config.max_position_embeddings, config.head_dim)}

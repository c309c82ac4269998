"""What an Arcee (AFM-4.5B) checkpoint is: the parameter pytree and its HF tensor names.

Mirrors `transformers/models/arcee/modeling_arcee.py`: HF `model.layers.3.self_attn.q_proj`
is `params.model.layers.self_attn.q_proj` here, layers stacked on a leading axis. Every
projection is an `nn.Linear` (HF weight [out, in]), stored transposed as kernel [in, out].
Llama-like decoder: RMSNorm, grouped-query attention with RoPE, and an MLP without a gate
(`down(act(up(x)))`, act = relu2 in AFM-4.5B).
"""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np

from refjax.params.common import Embedding, Linear, RMSNorm
from refjax.params.config import ArceeConfig
from refjax.params.io import NameRule


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

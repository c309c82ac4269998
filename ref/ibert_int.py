"""I-BERT's encoder on integer tensors: the integer-only inference of Kim et al. (2021),
beyond HF (`modeling_ibert.py` simulates the integers with float tensors).

The modules of ref/ibert.py on integers: an activation is `Act(q, s)` with q int32 (8, 16
or 22-bit values; int64 out of i-GELU and LayerNorm) and s its float32 scale. Scales,
weight integers and the kernels' constants depend only on parameters and state (what an
integer accelerator receives offline) and are computed by the fake-quant code of
ref/quant.py, so they are HF's bit for bit; everything that touches the input ids is
integer arithmetic (tested on the jaxpr in tests/test_integer_ibert.py). Each layer gets
its input's true scale: the fake-quant twin is `ibert.model(..., propagate_scales=True)`.
The quantization state is only read here (eval mode). Reads top to bottom: act ->
embeddings -> attention -> layer -> `integer_encoder`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from refjax import layers, quant
from refjax.params.common import Linear
from refjax.params.ibert import IBertAttentionOutput, IBertBody, IBertConfig, IBertEmbeddings, IBertLayer
from refjax.params.ibert import IBertQuantState, IBertSelfAttention
from refjax.quant import Act
from refjax.shell import Tokens


def act(state: dict, name: str, bits: int, z: Act, identity: Act | None = None) -> Act:
    """HF's QuantAct (eval) on integers: requantize z (+ identity) to `bits` at the scale
    of `name`'s calibrated range, with a dyadic multiplier (`quant.requantize_int`)."""
    s = quant.symmetric_scale(bits, state[f"{name}.x_min"], state[f"{name}.x_max"])
    ident, ident_s = (None, None) if identity is None else identity
    return Act(quant.requantize_int(z.x, z.s, bits, s, ident, ident_s), s)


def embed(p: IBertEmbeddings, state: dict, tokens: Tokens) -> Act:
    """`IBertEmbeddings` on integers: int8 table rows, two 16-bit requantizations (words +
    types, + positions), integer LayerNorm, 8-bit output. -> [B, T, D] int32, s [1]."""

    def lookup(table, ids: Int[Array, "B T"]) -> Act:  # QuantEmbedding: per-tensor 8-bit table, int8 rows
        w_int, table_scale = quant.embedding_table_int(table)
        return Act(jnp.take(w_int.astype(jnp.int8), ids, axis=0), table_scale)

    words = lookup(p.word_embeddings.table, tokens.input_ids)
    x = act(state, "embeddings_act1", 16, words, lookup(p.token_type_embeddings.table, tokens.token_type_ids))
    x = act(state, "embeddings_act1", 16, x, lookup(p.position_embeddings.table, tokens.position_ids))
    y = Act(*quant.int_layer_norm_int(x.x, x.s, p.LayerNorm.scale, p.LayerNorm.bias, state["LayerNorm.shift"]))
    return act(state, "output_activation", 8, y)


def linear(p: Linear, x: Act) -> Act:
    """QuantLinear on integers: int8 weights, int32 accumulation, + the 32-bit bias (int64)."""
    return Act(*quant.quant_linear_int(p.kernel, p.bias, x.x, x.s))


class Out(NamedTuple):
    """What attention and a layer return."""

    out: Act  # [B, T, D] int32 (8-bit values)
    probs: Act  # [B, N, T, S] int64 in [0, 256], scale [1]
    taps: dict


def attention(p: IBertSelfAttention, config: IBertConfig, state: dict, h: Act,
              keep: Bool[Array, "B 1 1 S"]) -> Out:
    """`IBertSelfAttention` on integers: int8 q/k/v, int32 q.k scores, integer softmax
    (8-bit probabilities), int32 probs @ v."""
    B, T, D = h.x.shape
    N, H = config.num_attention_heads, config.head_dim
    query = act(state, "attention.self.query_activation", 8, linear(p.query, h))
    key = act(state, "attention.self.key_activation", 8, linear(p.key, h))
    value = act(state, "attention.self.value_activation", 8, linear(p.value, h))
    heads_of = lambda t: t.reshape(B, T, N, H).transpose(0, 2, 1, 3)  # [B, N, T, H]
    scores = quant.int_matmul("bnth,bnsh->bnts", heads_of(query.x), heads_of(key.x))  # 8-bit x 8-bit
    scores_scale = quant.div(query.s * key.s, math.sqrt(H))
    # a masked key: far below any row's max - 30 |x0_int|, where i-exp's clamp gives HF's value;
    # a row with no key at all becomes uniform, as in the fake-quant path (docs/design.md)
    scores = jnp.where(keep, scores.astype(jnp.int64), jnp.int64(-(2 ** 40)))
    probs = Act(*quant.int_softmax_int(scores, scores_scale, state["attention.self.softmax.act.x_min"],
                                       state["attention.self.softmax.act.x_max"]))  # [B, N, T, S]
    context = quant.int_matmul("bnts,bnsh->bnth", probs.x, heads_of(value.x))  # 9-bit x 8-bit: [B, N, T, H]
    context = context.transpose(0, 2, 1, 3).reshape(B, T, D)  # [B, T, D]
    out = act(state, "attention.self.output_activation", 8, Act(context, probs.s * value.s))
    taps = {"attention.self.query": query, "attention.self.key": key, "attention.self.value": value,
            "attention.self.softmax": probs, "attention.self": out}
    return Out(out, probs, taps)


def output(p: IBertAttentionOutput, state: dict, prefix: str, h: Act, residual: Act) -> tuple[Act, dict]:
    """`IBertSelfOutput` / `IBertOutput` on integers: int32 dense, + residual requantized
    to 22 bits, integer LayerNorm, 8 bits."""
    y = linear(p.dense, h)
    r = act(state, f"{prefix}.ln_input_act", 22, y, residual)
    normed = Act(*quant.int_layer_norm_int(r.x, r.s, p.LayerNorm.scale, p.LayerNorm.bias,
                                           state[f"{prefix}.LayerNorm.shift"]))
    out = act(state, f"{prefix}.output_activation", 8, normed)
    return out, {f"{prefix}.dense": y, f"{prefix}.ln_input_act": r, f"{prefix}.LayerNorm": normed, prefix: out}


def layer(p: IBertLayer, config: IBertConfig, state: dict, h: Act, keep: Bool[Array, "B 1 1 S"]) -> Out:
    """`IBertLayer` on integers (post-LN): attention block, then the requantized FFN block.
    -> the layer's output [B, T, D] int32 (8-bit values) with the attention's probabilities."""
    attn = attention(p.attention_self, config, state, h, keep)
    a, attn_out_taps = output(p.attention_output, state, "attention.output", attn.out, h)
    a = act(state, "pre_intermediate_act", 8, a)
    inter = linear(p.intermediate, a)
    g = Act(*quant.int_gelu_int(inter.x, inter.s))  # int64
    i = act(state, "intermediate.output_activation", 8, g)
    i = act(state, "pre_output_act", 8, i)
    out, out_taps = output(p.output, state, "output", i, a)
    taps = {**attn.taps, **attn_out_taps, "pre_intermediate_act": a, "intermediate.dense": inter,
            "intermediate.intermediate_act_fn": g, "intermediate": i, **out_taps, "": out}
    return Out(out, attn.probs, taps)


class IntEncoding(NamedTuple):
    """What `integer_encoder` returns: integers with their scales."""

    hidden: Int[Array, "L+1 B T D"]  # int32 8-bit values: the embedding output, then every layer's
    scales: Float[Array, "L+1 1"]  # the scale of each
    probs: Int[Array, "L B N T S"]  # int64, integers of 2^-8
    probs_scale: Float[Array, "1"]
    taps: dict | None  # each module's Act (integers [L, ...], scale [L, 1 or C]) under `ibert.TAPS` names


def integer_encoder(p: IBertBody, config: IBertConfig, state: IBertQuantState, tokens: Tokens, *,
                    taps: bool = False) -> IntEncoding:
    """The I-BERT encoder computed in integers end to end. `tokens`: input_ids with
    attention_mask, token_type_ids and position_ids given (`ibert.with_defaults` fills
    HF's). Needs quant_mode with force_dequant="none"."""
    B, T = tokens.shape
    mask = jnp.ones((B, T), bool) if tokens.attention_mask is None else tokens.attention_mask != 0
    keep = mask[:, None, None, :]  # [B, 1, 1, S]
    x = embed(p.embeddings, state.embeddings, tokens)

    def step(h: Act, xs):
        p_layer, _, layer_state = xs
        out = layer(p_layer, config, layer_state, h, keep)
        return out.out, (h, out.probs, out.taps if taps else None)

    last, (inputs, probs, layer_taps) = layers.run_layers(step, x, p.layer, state.layer)
    return IntEncoding(hidden=jnp.concatenate([inputs.x, last.x[None]], axis=0),
                       scales=jnp.concatenate([inputs.s, last.s[None]], axis=0),
                       probs=probs.x, probs_scale=probs.s[0],
                       taps=layers.prefixed_taps("encoder.layer", layer_taps) if taps else None)

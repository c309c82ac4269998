"""I-BERT (Kim et al., 2021, "I-BERT: Integer-only BERT Quantization").

Mirrors HF `transformers/models/ibert/modeling_ibert.py`. With `quant_mode=False` it is
RoBERTa: post-LN encoder, exact GELU, positions pad_token_id + 1 + (count of non-pad
tokens so far). With `quant_mode=True` every module is its quantized twin from
`ref/quant.py` and every activation carries a scaling factor: a pair (x, s) below, x a
float tensor equal to integers * s, s [1] or [D] (None in float mode). `force_dequant`
switches GELU, softmax and/or LayerNorm back to float (`config.quantized(...)`).

The activation ranges (HF's QuantAct buffers) are the explicit state `params.state`;
`calibrate` is HF's train-mode range update as a pure function. Beyond HF:
`integer_encoder` computes the quant-mode encoder on integer tensors (int8/int32, int64
inside i-GELU, i-exp and LayerNorm), with each layer handed its input's true scale, which
HF does not do (`propagate_scales`). Reads top to bottom: quantization context ->
embeddings -> attention -> layer -> encoder -> integer-only encoder -> heads -> forward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from refjax.params.common import LayerNorm, Linear
from refjax.params.ibert import IBertBody, IBertConfig, IBertLayer, IBertParams, IBertQuantState
from refjax import heads, losses, nn
from refjax import quant
from refjax.validate import as_arrays, check_task_labels, check_token_inputs


class QuantContext:
    """The activation-range state of one module group during one call (trace-time only).

    `act` is HF's `QuantAct.forward`: in training (calibration) it first moves the range
    of `name` to cover identity + x, then (quant mode) requantizes with the new range."""

    def __init__(self, state: dict, quant_mode: bool, training: bool):
        self.state, self.quant_mode, self.training = dict(state), quant_mode, training

    def act(self, name: str, bits: int, x, pre_scale=None, identity=None, identity_scale=None, quant_mode=None):
        lo, hi = self.state[f"{name}.x_min"], self.state[f"{name}.x_max"]
        if self.training:
            lo, hi = quant.update_range(lo, hi, x if identity is None else quant.fence(identity) + quant.fence(x))
            self.state[f"{name}.x_min"], self.state[f"{name}.x_max"] = lo, hi
        if not (self.quant_mode if quant_mode is None else quant_mode):
            return (x if identity is None else quant.fence(identity) + quant.fence(x)), None
        return quant.quant_act(x, bits, lo, hi, pre_scale, identity, identity_scale)


def linear(config: IBertConfig, p: Linear, x, scale):
    """HF `QuantLinear` (nn.Linear in float mode). x [..., in] -> ([..., out], scale)."""
    if not config.quant_mode:
        return nn.linear(p, x), None
    return quant.quant_linear(p.kernel, p.bias, x, scale)


def layer_norm(config: IBertConfig, q: QuantContext, name: str, p: LayerNorm, x, scale):
    """HF `IntLayerNorm`; its float path is y / sqrt(eps + var) * weight + bias."""
    if config.quantized("layernorm"):
        out, out_scale, shift = quant.int_layer_norm(x, scale, p.scale, p.bias, q.state[f"{name}.shift"],
                                                     training=q.training)
        q.state[f"{name}.shift"] = shift
        return out, out_scale
    mean = x.mean(axis=-1, keepdims=True)
    y = x - mean
    var = jnp.mean(jnp.square(y), axis=-1, keepdims=True)
    y = y / jnp.sqrt(jnp.asarray(config.layer_norm_eps, x.dtype) + var)
    return y * p.scale + p.bias, None


def gelu(config: IBertConfig, x, scale):
    """HF `IntGELU`: i-GELU in quant mode, exact GELU (nn.GELU) otherwise."""
    if config.quantized("gelu"):
        return quant.int_gelu(x, scale)
    return nn.gelu_erf(x), None


# --------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------


def position_ids_from(config: IBertConfig, input_ids, inputs_embeds):
    """RoBERTa positions: pad_token_id + cumsum(non-pad) at real tokens, pad_token_id at
    pads (HF `create_position_ids_from_input_ids`); with inputs_embeds, pad+1 .. pad+T."""
    pad = config.pad_token_id
    if input_ids is not None:
        mask = (input_ids != pad).astype(jnp.int32)
        return jnp.cumsum(mask, axis=1, dtype=jnp.int32) * mask + pad
    B, T = inputs_embeds.shape[:2]
    return jnp.broadcast_to(jnp.arange(pad + 1, T + pad + 1, dtype=jnp.int32), (B, T))


def embeddings(config: IBertConfig, p: IBertBody, q: QuantContext, input_ids, token_type_ids, position_ids,
               inputs_embeds):
    """HF `IBertEmbeddings`: words + token types (QuantAct embeddings_act1), + positions
    (embeddings_act1 again: HF never uses embeddings_act2), LayerNorm, QuantAct."""
    e = p.embeddings
    if config.quant_mode:
        def embed(table, ids):
            return quant.quant_embedding(table, ids)
    else:
        def embed(table, ids):
            return jnp.take(table, ids, axis=0), None
    if inputs_embeds is None:
        words, words_scale = embed(e.word_embeddings.table, input_ids)
    else:
        words, words_scale = inputs_embeds, None
    types, types_scale = embed(e.token_type_embeddings.table, token_type_ids)
    x, s = q.act("embeddings_act1", 16, words, words_scale, identity=types, identity_scale=types_scale)
    positions, positions_scale = embed(e.position_embeddings.table, position_ids)
    x, s = q.act("embeddings_act1", 16, x, s, identity=positions, identity_scale=positions_scale)
    x_ln, s = layer_norm(config, q, "LayerNorm", e.LayerNorm, x, s)
    out, s = q.act("output_activation", 8, x_ln, s)
    return out, s, {"embeddings.word_embeddings": words, "embeddings.LayerNorm": x_ln, "embeddings": out}


# --------------------------------------------------------------------------------------
# Encoder layer
# --------------------------------------------------------------------------------------


def attention(config: IBertConfig, p: IBertLayer, q: QuantContext, x, s, mask_add):
    """HF `IBertSelfAttention`: quantized q/k/v, scores / sqrt(H) + additive mask,
    IntSoftmax, probs @ v, requantized context. x [B, T, D] -> ([B, T, D], s, probs [B, N, T, S])."""
    B, T, D = x.shape
    N, H = config.num_attention_heads, config.head_dim
    a = p.attention_self
    proj = {}
    for name in ("query", "key", "value"):
        y, ys = linear(config, getattr(a, name), x, s)
        proj[name] = q.act(f"attention.self.{name}_activation", 8, y, ys)
    (qx, qs), (kx, ks), (vx, vs) = proj["query"], proj["key"], proj["value"]
    heads_of = lambda t: t.reshape(B, T, N, H).transpose(0, 2, 1, 3)  # [B, N, T, H]
    scale = math.sqrt(H)
    if config.quant_mode:  # torch's summation order, bit for bit (see quant.sequential_dot)
        scores = quant._div(quant.sequential_dot(heads_of(qx), heads_of(kx)), scale)  # [B, N, T, S]
    else:
        scores = jnp.einsum("bnth,bnsh->bnts", heads_of(qx), heads_of(kx)) / scale
    scores_scale = quant._div(qs * ks, scale) if config.quant_mode else None
    scores = scores + mask_add
    if config.quantized("softmax"):
        # A query whose keys are all padding: HF's scores are all ~finfo.min, which / scale overflows
        # to -inf, and -inf - max = NaN for the whole row. refjax departs from HF there: the row gets
        # equal scores, i.e. uniform attention, as float mode gives it (docs/design.md, I-BERT).
        no_key = jnp.all(mask_add <= jnp.finfo(scores.dtype).min / 2, axis=-1, keepdims=True)
        scores = jnp.where(no_key, jnp.zeros_like(scores), scores)
        act = lambda e, es: q.act("attention.self.softmax.act", 16, e, es)
        probs, probs_scale = quant.int_softmax(scores, scores_scale, act)
    else:
        probs, probs_scale = jax.nn.softmax(scores, axis=-1), None
    if config.quant_mode:  # calibration reads the unrounded context's min/max: torch's order again
        context = quant.sequential_dot(probs, heads_of(vx).swapaxes(-1, -2), fused=False)  # [B, N, T, H]
    else:
        context = jnp.einsum("bnts,bnsh->bnth", probs, heads_of(vx))
    context = context.transpose(0, 2, 1, 3).reshape(B, T, D)
    context_scale = probs_scale * vs if probs_scale is not None else None
    out, out_s = q.act("attention.self.output_activation", 8, context, context_scale)
    taps = {"attention.self.query": qx, "attention.self.key": kx, "attention.self.value": vx,
            "attention.self.scores": scores, "attention.self.softmax": probs, "attention.self": out}
    return out, out_s, probs, taps


def self_output(config, q: QuantContext, prefix: str, dense: Linear, ln: LayerNorm, h, hs, residual, rs):
    """HF `IBertSelfOutput` / `IBertOutput`: dense, + residual at 22 bits, LayerNorm, 8 bits."""
    y, ys = linear(config, dense, h, hs)
    r, rs = q.act(f"{prefix}.ln_input_act", 22, y, ys, identity=residual, identity_scale=rs)
    y_ln, ys = layer_norm(config, q, f"{prefix}.LayerNorm", ln, r, rs)
    out, out_s = q.act(f"{prefix}.output_activation", 8, y_ln, ys)
    return out, out_s, {f"{prefix}.dense": y, f"{prefix}.ln_input_act": r, f"{prefix}.LayerNorm": y_ln, prefix: out}


def layer(config: IBertConfig, p: IBertLayer, q: QuantContext, x, s, mask_add):
    """HF `IBertLayer` (post-LN): attention block, then the requantized FFN block."""
    ctx, cs, probs, taps = attention(config, p, q, x, s, mask_add)
    a, a_s, t = self_output(config, q, "attention.output", p.attention_output.dense, p.attention_output.LayerNorm,
                            ctx, cs, x, s)
    taps.update(t)
    a, a_s = q.act("pre_intermediate_act", 8, a, a_s)
    h, hs = linear(config, p.intermediate, a, a_s)
    g, gs = gelu(config, h, hs)
    i, i_s = q.act("intermediate.output_activation", 8, g, gs)
    i, i_s = q.act("pre_output_act", 8, i, i_s)
    out, out_s, t = self_output(config, q, "output", p.output.dense, p.output.LayerNorm, i, i_s, a, a_s)
    taps.update(t)
    taps.update({"pre_intermediate_act": a, "intermediate.dense": h, "intermediate.intermediate_act_fn": g,
                 "intermediate": i, "": out})
    return out, out_s, probs, taps


TAPS = ("embeddings.word_embeddings", "embeddings.LayerNorm", "embeddings",
        "encoder.layer.{i}.attention.self.query", "encoder.layer.{i}.attention.self.key",
        "encoder.layer.{i}.attention.self.value", "encoder.layer.{i}.attention.self.scores",
        "encoder.layer.{i}.attention.self.softmax", "encoder.layer.{i}.attention.self",
        "encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.attention.output.ln_input_act",
        "encoder.layer.{i}.attention.output.LayerNorm", "encoder.layer.{i}.attention.output",
        "encoder.layer.{i}.pre_intermediate_act", "encoder.layer.{i}.intermediate.dense",
        "encoder.layer.{i}.intermediate.intermediate_act_fn", "encoder.layer.{i}.intermediate",
        "encoder.layer.{i}.output.dense", "encoder.layer.{i}.output.ln_input_act", "encoder.layer.{i}.output.LayerNorm",
        "encoder.layer.{i}.output", "encoder.layer.{i}", "pooler")


def encoder(params: IBertParams, config: IBertConfig, state: IBertQuantState, input_ids, attention_mask,
            token_type_ids, position_ids, inputs_embeds, training=False, want_taps=False, propagate_scales=False):
    """HF `IBertModel` without the pooler: -> (last [B, T, D], hidden_states [L+1, B, T, D],
    attentions [L, B, N, T, T], new state, taps). `propagate_scales`: hand each layer its
    input's true scale (the previous layer's output scale) instead of HF's embedding scale."""
    p = params.ibert
    B, T = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    dtype = p.embeddings.word_embeddings.table.dtype
    if position_ids is None:
        position_ids = position_ids_from(config, input_ids, inputs_embeds)
    if token_type_ids is None:
        token_type_ids = jnp.zeros((B, T), jnp.int32)
    mask = jnp.ones((B, T), dtype) if attention_mask is None else attention_mask.astype(dtype)
    mask_add = ((1.0 - mask) * jnp.finfo(dtype).min)[:, None, None, :]  # HF get_extended_attention_mask

    q = QuantContext(state.embeddings, config.quant_mode, training)
    x, s, embed_taps = embeddings(config, p, q, input_ids, token_type_ids, position_ids, inputs_embeds)
    new_embed_state = q.state

    def step(carry, xs):
        x, s = carry
        p_layer, st_layer = xs
        ql = QuantContext(st_layer, config.quant_mode, training)
        out, out_s, probs, taps = layer(config, p_layer, ql, x, s, mask_add)
        # HF quirk, reproduced by default: IBertLayer drops its output's scaling factor, so every
        # layer is told the *embedding* output's scale (x / s is then not an integer after layer 0)
        return (out, out_s if propagate_scales else s), (x, probs, ql.state, taps if want_taps else None)

    (last, _), (inputs, attentions, layer_state, layer_taps) = jax.lax.scan(step, (x, s), (p.layer, state.layer))
    hidden_states = jnp.concatenate([inputs, last[None]], axis=0)
    taps = None
    if want_taps:
        taps = {**embed_taps, **{f"encoder.layer.{k}" if k else "encoder.layer": v for k, v in layer_taps.items()}}
    return last, hidden_states, attentions, IBertQuantState(new_embed_state, layer_state), taps


# One compiled encoder per (config, shapes, mode): eager calls (the CLI, verify, tests) would
# otherwise retrace the layer scan and its inner summation scans at every call.
_encoder_jit = jax.jit(encoder, static_argnames=("config", "training", "want_taps", "propagate_scales"))


# --------------------------------------------------------------------------------------
# Integer-only encoder (beyond HF: HF simulates integers with float tensors)
#
# The same modules on integer tensors: an activation is (q, s) with q int32 (8/16/22-bit
# values; int64 out of i-GELU and LayerNorm) and s its float32 scale. Scales, weights'
# integers and the kernels' constants depend only on parameters and state (what an integer
# accelerator receives offline) and are computed by the fake-quant code, so they are HF's
# bit for bit; everything that touches the input ids is integer arithmetic (tested on the
# jaxpr in tests/test_integer_ibert.py). Each layer gets its input's true scale (the fake-quant
# twin is `encoder(..., propagate_scales=True)`).
# --------------------------------------------------------------------------------------


class IntContext:
    """HF's QuantAct (eval) on integers: requantize (z, pre_scale) to `name`'s range."""

    def __init__(self, state: dict):
        self.state = state

    def scale(self, name: str, bits: int):
        return quant.symmetric_scale(bits, self.state[f"{name}.x_min"], self.state[f"{name}.x_max"])

    def act(self, name: str, bits: int, z, pre_scale, identity=None, identity_scale=None):
        s = self.scale(name, bits)
        return quant.requantize_int(z, pre_scale, bits, s, identity, identity_scale), s


def int_embeddings(p: IBertBody, q: IntContext, input_ids, token_type_ids, position_ids):
    """`IBertEmbeddings` on integers: int8 table rows, two 16-bit requantizations (words +
    types, + positions), integer LayerNorm, 8-bit output. -> (q [B, T, D] int32, s [1])."""
    e = p.embeddings

    def embed(table, ids):  # QuantEmbedding: per-tensor 8-bit table, rows looked up as int8
        w_int, table_scale = quant.embedding_table_int(table)
        return jnp.take(w_int.astype(jnp.int8), ids, axis=0), table_scale

    words, words_s = embed(e.word_embeddings.table, input_ids)
    types, types_s = embed(e.token_type_embeddings.table, token_type_ids)
    positions, positions_s = embed(e.position_embeddings.table, position_ids)
    x, s = q.act("embeddings_act1", 16, words, words_s, identity=types, identity_scale=types_s)
    x, s = q.act("embeddings_act1", 16, x, s, identity=positions, identity_scale=positions_s)
    y, ys = quant.int_layer_norm_int(x, s, e.LayerNorm.scale, e.LayerNorm.bias, q.state["LayerNorm.shift"])
    return q.act("output_activation", 8, y, ys)


def int_attention(config: IBertConfig, p: IBertLayer, q: IntContext, x, s, keep):
    """`IBertSelfAttention` on integers: int8 q/k/v, int32 q.k scores, integer softmax
    (8-bit probabilities), int32 probs @ v. x [B, T, D] int32, keep [B, 1, 1, S] bool
    -> (context [B, T, D] int32, s, probs [B, N, T, S] int64 in [0, 256], probs_scale)."""
    B, T, D = x.shape
    N, H = config.num_attention_heads, config.head_dim
    a = p.attention_self
    proj = {}
    for name in ("query", "key", "value"):
        acc, acc_s = quant.quant_linear_int(getattr(a, name).kernel, getattr(a, name).bias, x, s)
        proj[name] = q.act(f"attention.self.{name}_activation", 8, acc, acc_s)
    (qx, qs), (kx, ks), (vx, vs) = proj["query"], proj["key"], proj["value"]
    heads_of = lambda t: t.reshape(B, T, N, H).transpose(0, 2, 1, 3)  # [B, N, T, H]
    scores = quant.int_matmul("bnth,bnsh->bnts", heads_of(qx), heads_of(kx))  # 8-bit x 8-bit
    scores_scale = quant._div(qs * ks, math.sqrt(H))
    # a masked key: far below any row's max - 30 |x0_int|, where i-exp's clamp gives HF's value;
    # a row with no key at all becomes uniform, as in the fake-quant path (docs/design.md)
    scores = jnp.where(keep, scores.astype(jnp.int64), jnp.int64(-(2 ** 40)))
    probs, probs_s = quant.int_softmax_int(scores, scores_scale, q.state["attention.self.softmax.act.x_min"],
                                           q.state["attention.self.softmax.act.x_max"])  # [B, N, T, S]
    context = quant.int_matmul("bnts,bnsh->bnth", probs, heads_of(vx))  # 9-bit x 8-bit: [B, N, T, H]
    context = context.transpose(0, 2, 1, 3).reshape(B, T, D)
    out, out_s = q.act("attention.self.output_activation", 8, context, probs_s * vs)
    taps = {"attention.self.query": (qx, qs), "attention.self.key": (kx, ks), "attention.self.value": (vx, vs),
            "attention.self.softmax": (probs, probs_s), "attention.self": (out, out_s)}
    return out, out_s, probs, probs_s, taps


def int_self_output(q: IntContext, prefix: str, dense: Linear, ln: LayerNorm, h, hs, residual, rs):
    """`IBertSelfOutput` / `IBertOutput` on integers: int32 dense, + residual requantized
    to 22 bits, integer LayerNorm, 8 bits."""
    acc, acc_s = quant.quant_linear_int(dense.kernel, dense.bias, h, hs)
    r, r_s = q.act(f"{prefix}.ln_input_act", 22, acc, acc_s, identity=residual, identity_scale=rs)
    y, ys = quant.int_layer_norm_int(r, r_s, ln.scale, ln.bias, q.state[f"{prefix}.LayerNorm.shift"])
    out, out_s = q.act(f"{prefix}.output_activation", 8, y, ys)
    return out, out_s, {f"{prefix}.dense": (acc, acc_s), f"{prefix}.ln_input_act": (r, r_s),
                        f"{prefix}.LayerNorm": (y, ys), prefix: (out, out_s)}


def int_layer(config: IBertConfig, p: IBertLayer, q: IntContext, x, s, keep):
    """`IBertLayer` on integers -> (out [B, T, D] int32 8-bit values, s, probs, probs_scale)."""
    ctx, cs, probs, probs_s, taps = int_attention(config, p, q, x, s, keep)
    a, a_s, t = int_self_output(q, "attention.output", p.attention_output.dense, p.attention_output.LayerNorm,
                                ctx, cs, x, s)
    taps.update(t)
    a, a_s = q.act("pre_intermediate_act", 8, a, a_s)
    acc, acc_s = quant.quant_linear_int(p.intermediate.kernel, p.intermediate.bias, a, a_s)
    g, gs = quant.int_gelu_int(acc, acc_s)  # int64
    i, i_s = q.act("intermediate.output_activation", 8, g, gs)
    i, i_s = q.act("pre_output_act", 8, i, i_s)
    out, out_s, t = int_self_output(q, "output", p.output.dense, p.output.LayerNorm, i, i_s, a, a_s)
    taps.update(t)
    taps.update({"pre_intermediate_act": (a, a_s), "intermediate.dense": (acc, acc_s),
                 "intermediate.intermediate_act_fn": (g, gs), "intermediate": (i, i_s), "": (out, out_s)})
    return out, out_s, probs, probs_s, taps


def integer_encoder(params: IBertParams, config: IBertConfig, state: IBertQuantState, input_ids, attention_mask,
                    token_type_ids=None, position_ids=None, want_taps=False):
    """The I-BERT encoder computed in integers end to end: input ids -> (hidden [L+1, B, T, D]
    int32 (8-bit values), their scales [L+1, 1], probs [L, B, N, T, T] int64 (integers of
    2^-8), probs_scale [1], taps: each module's (integers [L, ...], scale [L, 1 or C]) under
    `TAPS` names, or None). Needs quant_mode with force_dequant="none"."""
    p = params.ibert
    B, T = input_ids.shape
    if position_ids is None:
        position_ids = position_ids_from(config, input_ids, None)
    if token_type_ids is None:
        token_type_ids = jnp.zeros((B, T), jnp.int32)
    keep = (jnp.ones((B, T), bool) if attention_mask is None else attention_mask != 0)[:, None, None, :]
    x, s = int_embeddings(p, IntContext(state.embeddings), input_ids, token_type_ids, position_ids)

    def step(carry, xs):
        x, s = carry
        p_layer, st_layer = xs
        out, out_s, probs, probs_s, taps = int_layer(config, p_layer, IntContext(st_layer), x, s, keep)
        return (out, out_s), (x, s, probs, probs_s, taps if want_taps else None)

    (last, last_s), (inputs, scales, probs, probs_s, taps) = jax.lax.scan(step, (x, s), (p.layer, state.layer))
    hidden = jnp.concatenate([inputs, last[None]], axis=0)
    if want_taps:
        taps = {f"encoder.layer.{k}" if k else "encoder.layer": v for k, v in taps.items()}
    return hidden, jnp.concatenate([scales, last_s[None]], axis=0), probs, probs_s[0], taps


_integer_encoder_jit = jax.jit(integer_encoder, static_argnames=("config", "want_taps"))


# --------------------------------------------------------------------------------------
# Validation, calibration, forward
# --------------------------------------------------------------------------------------


def _check_inputs(config: IBertConfig, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                  allow_choices):
    shape = check_token_inputs(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, input_ids=input_ids,
        attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds, cache=None,
        max_positions=config.max_position_embeddings, token_type_ids=token_type_ids,
        type_vocab_size=config.type_vocab_size, allow_choices=allow_choices)
    if position_ids is None and shape[-1] > config.max_tokens:
        raise ValueError(
            f"sequence length {shape[-1]} exceeds the position table: RoBERTa-style positions start at "
            f"pad_token_id + 1 = {config.pad_token_id + 1}, so max_position_embeddings - pad_token_id - 1 = "
            f"{config.max_tokens} tokens fit (max_position_embeddings={config.max_position_embeddings})")
    if config.quant_mode and not jax.config.jax_enable_x64:
        raise ValueError("quant_mode=True needs jax_enable_x64: HF's FixedPointMul requantizes in float64")
    return shape


def _flat(x):
    """[B, C, T(, D)] -> [B*C, T(, D)], as HF views multiple-choice inputs."""
    return None if x is None else x.reshape(-1, *x.shape[2:])


def calibrate(params: IBertParams, config: IBertConfig, state: IBertQuantState, input_ids=None,
              attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
              propagate_scales=False) -> IBertQuantState:
    """One calibration batch: HF's model in train mode with dropout off, as a pure function
    (state -> state). Every QuantAct moves its range to the batch's min/max (first batch)
    or by EMA (momentum 0.95); quantized LayerNorms raise their shift on overflow.
    `propagate_scales=True` calibrates the scale-propagating model that `integer=True` runs."""
    x = as_arrays(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                  position_ids=position_ids, inputs_embeds=inputs_embeds)
    input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds = x.values()
    allow = config.architecture == "IBertForMultipleChoice"
    shape = _check_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, allow)
    if len(shape) == 3:
        input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds = map(
            _flat, (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds))
    return _encoder_jit(params, config, state, input_ids, attention_mask, token_type_ids, position_ids,
                        inputs_embeds, training=True, propagate_scales=propagate_scales)[3]


def forward(params: IBertParams, config: IBertConfig, input_ids=None, attention_mask=None, token_type_ids=None,
            position_ids=None, inputs_embeds=None, labels=None, start_positions=None, end_positions=None,
            cache=None, *, state: IBertQuantState | None = None, output_hidden_states=False,
            output_attentions=False, taps=False, fast=False, propagate_scales=False,
            integer=False) -> heads.Output:
    """Any HF I-BERT class, chosen by `config.architecture`; returns HF's output fields.

    `state`: activation ranges (default `params.state`, as loaded from the checkpoint).
    IBertForMultipleChoice takes [B, C, T] inputs; its hidden states are [L+1, B*C, T, D]
    as HF returns them. Quant mode only: `propagate_scales=True` fixes HF's scale hand-off
    between layers (see `encoder`); `integer=True` runs `integer_encoder` (int8/int32
    arithmetic, true scales) and dequantizes its integers (q * s) for the float heads."""
    if cache is not None:
        raise ValueError("I-BERT is an encoder: it takes no cache")
    if fast:
        raise ValueError("I-BERT has no fast path: its attention is integer softmax (use fast=False)")
    if (integer or propagate_scales) and not config.quant_mode:
        raise ValueError(f"{'integer' if integer else 'propagate_scales'}=True needs a quant_mode=True model "
                         f"(this config has quant_mode=False)")
    if integer:
        if config.force_dequant != "none":
            raise ValueError(f"integer=True needs every nonlinearity integer-only, but force_dequant="
                             f"{config.force_dequant!r} makes some float (use force_dequant='none')")
        if inputs_embeds is not None:
            raise ValueError("integer=True takes input_ids: inputs_embeds are float vectors, not table rows")
        if taps:
            raise ValueError("integer=True has no taps: ref.ibert.integer_encoder returns every layer's integers")
    x = as_arrays(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                  position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels,
                  start_positions=start_positions, end_positions=end_positions)
    input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, labels, start_positions, \
        end_positions = x.values()
    arch = config.architecture
    choices = arch == "IBertForMultipleChoice"
    if inputs_embeds is not None and choices and inputs_embeds.ndim == 4:
        C = inputs_embeds.shape[1]
        inputs_embeds = _flat(inputs_embeds)
        flat_embeds = True
    else:
        flat_embeds = False
    shape = _check_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, choices)
    if flat_embeds:
        shape = (shape[0] // C, C, shape[1])
    if arch == "IBertForMaskedLM":
        check_task_labels("token", labels, shape, config.vocab_size)
    elif arch == "IBertForSequenceClassification":
        check_task_labels("sequence", labels, shape, config.num_labels, config.problem_type)
    elif arch == "IBertForTokenClassification":
        check_task_labels("token", labels, shape, config.num_labels)
    elif arch == "IBertForMultipleChoice" and labels is not None:
        from refjax.validate import check_labels
        if len(shape) != 3:
            raise ValueError(f"IBertForMultipleChoice needs input_ids [batch, choices, seq], got {list(shape)}")
        check_labels(labels, "labels", shape[:1], shape[1], "choices")
    if choices and len(shape) == 3:
        input_ids, attention_mask, token_type_ids, position_ids = map(
            _flat, (input_ids, attention_mask, token_type_ids, position_ids))
    state = params.state if state is None else state
    if integer:
        dtype = params.ibert.embeddings.word_embeddings.table.dtype
        hidden_q, hidden_s, probs_q, probs_s, _ = _integer_encoder_jit(
            params, config, state, input_ids, attention_mask, token_type_ids, position_ids)
        hidden_states = hidden_q.astype(dtype) * hidden_s.reshape(-1, 1, 1, 1)  # [L+1, B, T, D]
        last, attentions, tap_values = hidden_states[-1], probs_q.astype(dtype) * probs_s, None
    else:
        last, hidden_states, attentions, _, tap_values = _encoder_jit(
            params, config, state, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
            want_taps=taps, propagate_scales=propagate_scales)
    out = dict(last_hidden_state=last, taps=tap_values,
               hidden_states=hidden_states if output_hidden_states else None,
               attentions=attentions if output_attentions else None)
    pooled = None
    if params.ibert.pooler is not None:
        pooled = jnp.tanh(nn.linear(params.ibert.pooler, last[:, 0]))
        if tap_values is not None:
            tap_values["pooler"] = pooled
    if arch == "IBertModel":
        out["pooler_output"] = pooled
    elif arch == "IBertForMaskedLM":
        h = params.lm_head
        y = nn.layer_norm(h.layer_norm, nn.gelu_erf(nn.linear(h.dense, last)), config.layer_norm_eps)
        kernel = h.decoder.kernel if h.decoder.kernel is not None else params.ibert.embeddings.word_embeddings.table.T
        out["logits"] = nn.linear(Linear(kernel, h.decoder.bias), y)
        if labels is not None:
            out["loss"] = losses.cross_entropy(out["logits"].reshape(-1, config.vocab_size), labels.reshape(-1))
    elif arch == "IBertForSequenceClassification":
        c = params.classifier
        logits = nn.linear(c.out_proj, jnp.tanh(nn.linear(c.dense, last[:, 0])))
        out["logits"] = logits
        if labels is not None:
            out["loss"] = losses.sequence_classification_loss(logits, labels, config.num_labels, config.problem_type)
    elif arch == "IBertForMultipleChoice":
        logits = nn.linear(params.classifier, pooled).reshape(-1, shape[1] if len(shape) == 3 else 1)
        out["logits"] = logits
        if labels is not None:
            out["loss"] = losses.cross_entropy(logits, labels.reshape(-1))
    elif arch == "IBertForTokenClassification":
        out["logits"], out["loss"] = heads.token_classification(params.classifier, last, config.num_labels, labels)
    elif arch == "IBertForQuestionAnswering":
        out["start_logits"], out["end_logits"], out["loss"] = heads.question_answering(
            params.qa_outputs, last, start_positions, end_positions)
    return heads.Output(**out)


def calibration_tolerance(config: IBertConfig) -> tuple[float, str]:
    """How closely `calibrate` reproduces HF's calibrated buffers (ref/verify.py): exactly
    while GELU and LayerNorm are integer-only. A float GELU or LayerNorm (force_dequant)
    feeds its float32 output's min/max into the next range, and torch's erf / mean
    round differently from XLA's in the last bit: relative 1e-5 there."""
    if config.quantized("gelu") and config.quantized("layernorm"):
        return 0.0, "calibrated ranges, exact"
    return 1e-5, "float GELU/LayerNorm (force_dequant) feed the ranges: torch's float32 rounding differs"

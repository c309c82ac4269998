"""MEGA (Ma et al. 2022, "Mega: Moving Average Equipped Gated Attention"), as HF 4.57.6 runs it.

Mirrors `transformers/models/deprecated/mega/modeling_mega.py` in eval mode (every dropout,
feature dropout included, is the identity). Reads top to bottom: norms -> multi-dimensional
damped EMA (kernel, FFT convolution, bidirectional kernel, the step recurrence) ->
relative position bias -> attention functions -> moving-average gated attention -> normalized
FFN -> block -> stack (a `lax.scan` over stacked layers) -> heads -> `forward`.

HF works sequence-first [T, B, D]; refjax batch-first [B, T, D] throughout. One MEGA layer
(paper eqs. 8-18, HF `MegaMovingAverageGatedAttention` + `MegaNormalizedFeedForwardNetwork`):
    h = norm(x)                                  (if normalize_before_mega)
    v = act(v_proj(h))                           [B, T, E]
    e = silu(EMA(h) + omega * h)                 [B, T, D]
    r, (qk, gate), z = split(mx_proj(e))         sigmoid r; silu qk and gate
    q, k = qk * qk_weight + qk_bias              [B, T, Z] each
    o = act(z + h_proj(attention(q, k, v) * gate))
    x = x + r * (o - x)                          (then norm(x) if post-norm)
    x = x + fc2(act(fc1(norm(x))))               (normalized FFN, if use_normalized_ffn)
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from refjax.params.common import Linear
from refjax.params.mega import MegaConfig, MegaEma, MegaGatedAttention, MegaLayer, MegaNorm, MegaParams
from refjax import heads, layers, losses, nn
from refjax.validate import as_arrays, check_labels, check_task_labels, check_token_inputs

NORM_EPS = 1e-5  # HF MegaSequenceNorm passes eps=1e-5 to every norm type


# ---------------------------------------------------------------------------------------
# Norms (HF MegaSequenceNorm)
# ---------------------------------------------------------------------------------------

def sequence_norm(p: MegaNorm, config: MegaConfig, x: jax.Array) -> jax.Array:
    """HF `MegaSequenceNorm` in eval mode over the last axis of x [..., D].

    scalenorm: (scalar * x) / sqrt(mean(x^2) + eps)  (one learned scalar).
    rmsnorm: HF's `MegaRMSNorm` discards its normalisation (`input * rsqrt(...)` is computed
        and thrown away), so it returns x * weight; reproduced, not fixed.
    layernorm: torch.nn.LayerNorm. batchnorm / syncbatchnorm: eval mode uses the running
        statistics, (x - running_mean) / sqrt(running_var + eps) * weight + bias; SyncBatchNorm
        is the same in eval (it synchronises only training-time batch statistics).
    """
    t = config.normalization_type
    if t == "scalenorm":
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        if p.weight is not None:
            x = p.weight * x
        return x * jax.lax.rsqrt(mean_square + NORM_EPS)
    if t == "rmsnorm":
        return x if p.weight is None else x * p.weight
    if t == "layernorm":
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + NORM_EPS)
    else:  # batchnorm, syncbatchnorm
        y = (x - p.running_mean) * jax.lax.rsqrt(p.running_var + NORM_EPS)
    if p.weight is not None:
        y = y * p.weight + p.bias
    return y


# ---------------------------------------------------------------------------------------
# Multi-dimensional damped EMA (HF MegaMultiDimensionDampedEma)
# ---------------------------------------------------------------------------------------
# Per kernel row d and EMA dimension n (paper eq. 3-5), with delta = sigmoid(damping_factor),
# alpha = sigmoid(decay_factor), q = 1 - delta * alpha:
#     state_t = delta * beta * u_t + q * state_{t-1}        [B, K, N]
#     y_t     = sum_n gamma * sqrt(1/N) * state_t
# Unrolled over a sequence this is a causal convolution with kernel
#     k[d, l] = sum_n gamma[d,n] sqrt(1/N) delta[d,n] beta[d,n] q[d,n]^l,
# which HF applies with an FFT.

def ema_coefficients(p: MegaEma):
    """(delta, q) [K, N, 1]: the input weight and the previous-step weight."""
    delta = jax.nn.sigmoid(p.damping_factor)
    alpha = jax.nn.sigmoid(p.decay_factor)
    return delta, 1.0 - delta * alpha


def ema_kernel(p: MegaEma, length: int) -> jax.Array:
    """The EMA convolution kernel [K, length] (HF `_compute_efficient_ema_kernel`)."""
    delta, q = ema_coefficients(p)
    n = p.kernel_projection_matrix.shape[-1]
    vander = jnp.arange(length, dtype=q.dtype).reshape(1, 1, length) * jnp.log(q)  # [K, N, length]
    kernel = (delta * p.ema_expansion_matrix) * jnp.exp(vander)
    return jnp.einsum("dnl,dn->dl", kernel, p.kernel_projection_matrix * math.sqrt(1.0 / n))


def fft_convolution(inputs: jax.Array, kernel: jax.Array, length: int, fft_dtype=jnp.float32) -> jax.Array:
    """HF `fft_convolution`: irfft(rfft(u, 2n) * rfft(k, 2n), 2n) over the last axis.

    HF casts both operands to float32 (`.float()`) whatever the model dtype, so a float64
    model's EMA is float32-accurate; refjax does the same (see ref/verify.py). `fft_dtype`
    exists for the tests (float64 shows the convolution equals the recurrence to 1e-12)."""
    n = 2 * length
    u = jnp.fft.rfft(inputs.astype(fft_dtype), n=n)
    k = jnp.fft.rfft(kernel.astype(fft_dtype), n=n)
    return jnp.fft.irfft(u * k, n=n)


def ema_full(p: MegaEma, config: MegaConfig, u: jax.Array, fft_dtype=jnp.float32) -> jax.Array:
    """EMA over a whole sequence (HF forward without cache). u [B, D, T] already masked.
    Returns [B, D, T]. Bidirectional: rows [:D] run forward in time, rows [D:] backward;
    both halves of the kernel are laid out around one centre and convolved at once."""
    T, D = u.shape[-1], config.hidden_size
    size = T if config.truncation is None else min(config.truncation, T)
    kernel = ema_kernel(p, size)  # [K, size]
    if not config.bidirectional:
        out = fft_convolution(u, kernel, T, fft_dtype)[..., :T]
    else:
        k1, k2 = kernel[:D], kernel[D:]
        kernel = jnp.pad(k1, ((0, 0), (size - 1, 0))) + jnp.pad(k2[:, ::-1], ((0, 0), (0, size - 1)))  # [D, 2s-1]
        u = jnp.pad(u, ((0, 0), (0, 0), (size - 1, 0)))
        start = 2 * size - 2
        out = fft_convolution(u, kernel, T + size - 1, fft_dtype)[..., start:start + T]
    return out.astype(u.dtype)


def ema_steps(p: MegaEma, u: jax.Array, past_state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """HF `ema_step` for T > 1 tokens after a state [B, D, N] (zeros = no past): the FFT
    convolution over the new tokens (never truncated) plus the decayed past state.
    u [B, D, T] -> (y [B, D, T], new state [B, D, N])."""
    T = u.shape[-1]
    delta, q = ema_coefficients(p)
    n = p.kernel_projection_matrix.shape[-1]
    gamma = p.kernel_projection_matrix * math.sqrt(1.0 / n)  # [D, N]
    vander = jnp.exp(jnp.arange(T + 1, dtype=q.dtype).reshape(1, 1, T + 1) * jnp.log(q))  # [D, N, T+1]
    past_proj = vander[:, :, 1:] * gamma[..., None]  # [D, N, T]
    past_out = jnp.einsum("bdn,dnl->bdl", past_state, past_proj)
    past_decay = vander[:, :, -1] * past_state  # [B, D, N]
    kernel = (delta * p.ema_expansion_matrix) * vander[:, :, :-1]  # [D, N, T]
    kernel_proj = jnp.einsum("dnl,dn->dl", kernel, gamma)
    out = fft_convolution(u, kernel_proj, T)[..., :T].astype(u.dtype) + past_out
    state = jnp.einsum("bdl,dnl->bdn", u, kernel[:, :, ::-1]) + past_decay
    return out, state


def ema_one_step(p: MegaEma, u: jax.Array, past_state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """HF `one_ema_step`: one token u [B, D, 1] -> (y [B, D, 1], new state [B, D, N])."""
    delta, q = ema_coefficients(p)
    n = p.kernel_projection_matrix.shape[-1]
    state = (delta * p.ema_expansion_matrix)[..., 0] * u + q[..., 0] * past_state  # [B, D, N]
    out = jnp.einsum("bdn,dn->bd", state, p.kernel_projection_matrix * math.sqrt(1.0 / n))
    return out[..., None], state


def ema_recurrence(p: MegaEma, u: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The EMA as a plain step-by-step recurrence (a `lax.scan` of `ema_one_step`); used by
    the tests to show the FFT convolution computes the same thing. u [B, D, T]."""
    def step(s, u_t):
        y, s = ema_one_step(p, u_t[..., None], s)
        return s, y[..., 0]
    state, ys = jax.lax.scan(step, state, jnp.moveaxis(u, -1, 0))
    return jnp.moveaxis(ys, 0, -1), state


def ema_gate(p: MegaEma, config: MegaConfig, x: jax.Array, mask, state=None, cached=False):
    """HF `MegaMultiDimensionDampedEma.forward`: silu(EMA(x * mask) + omega * x).
    x [B, T, D], mask [B, T] or None; with `cached` the state [B, D, N] is read and returned."""
    residual = x * p.residual_weight
    u = jnp.swapaxes(x, 1, 2)  # [B, D, T]
    if mask is not None:
        u = u * mask[:, None, :].astype(u.dtype)
    if not cached:
        y, new_state = ema_full(p, config, u), None
    elif x.shape[1] == 1:
        y, new_state = ema_one_step(p, u, state)
    else:
        y, new_state = ema_steps(p, u, state)
    return jax.nn.silu(jnp.swapaxes(y, 1, 2) + residual), new_state


# ---------------------------------------------------------------------------------------
# Relative position bias
# ---------------------------------------------------------------------------------------

def rotary_sinusoids(positions: int, dim: int, dtype) -> tuple[jax.Array, jax.Array]:
    """HF `get_sinusoid_embeddings`: computed in float32 (HF builds them once in float32 and
    casts them to the model dtype), here on the host with numpy float32, as torch does."""
    half = dim // 2
    step = np.float32(math.log(10000) / half)
    freq = np.exp(np.arange(half, dtype=np.float32) * -step)
    angles = np.arange(positions, dtype=np.float32)[:, None] * freq[None, :]
    return jnp.asarray(np.sin(angles), dtype), jnp.asarray(np.cos(angles), dtype)


def relative_bias(p, config: MegaConfig, length: int) -> jax.Array:
    """bias[i, j] for query i and key j of a `length`-token window [length, length].
    simple (HF `MegaSimpleRelativePositionalBias`): w[M - 1 + j - i], M = bias_positions.
    rotary (HF `MegaRotaryRelativePositionalBias`): rot(alpha)_i . rot(b_param)_j."""
    if config.relative_positional_bias == "simple":
        M = config.bias_positions
        offsets = jnp.arange(length)[None, :] - jnp.arange(length)[:, None]  # j - i
        return p.rel_pos_bias[M - 1 + offsets]
    sin, cos = rotary_sinusoids(length, config.shared_representation_size, p.alpha.dtype)

    def rotate(v):  # v [1, Z] -> [length, Z]
        v1, v2 = jnp.split(jnp.broadcast_to(v, (length, v.shape[-1])), 2, axis=-1)
        return jnp.concatenate([v1 * cos - v2 * sin, v2 * cos + v1 * sin], axis=-1)

    return jnp.einsum("mk,nk->mn", rotate(p.alpha), rotate(p.b_param))


# ---------------------------------------------------------------------------------------
# Attention functions (HF softmax_attention / element_attention)
# ---------------------------------------------------------------------------------------

def attention_weights(p: MegaGatedAttention, config: MegaConfig, q, k, mask, causal):
    """Attention weights within each chunk. q [B, C, T, Z], k [B, C, S, Z] (C chunks, 1 when
    not chunking), mask [B, C, S] or None (1 = real token), causal [T, S] bool or None.

    softmax: softmax(q k^T / sqrt(Z) + bias) with -inf at future keys and at pad keys,
        except that a chunk whose keys are all padding is not masked at all (HF).
    laplace / relu2: act(q k^T / n + bias) * mask * causal, n = real keys in the chunk
        (at least 1), or i + 1 for query i of a decoder (HF's causal count)."""
    S = k.shape[2]
    bias = relative_bias(p.rel_pos_bias, config, S)  # [S, S]
    if q.shape[2] != S:
        bias = bias[-1:]
    if config.attention_activation == "softmax":
        scores = jnp.einsum("bctz,bcsz->bcts", q * config.shared_representation_size ** -0.5, k) + bias
        if causal is not None:
            scores = jnp.where(causal, scores, -jnp.inf)
        if mask is not None:
            pad = mask == 0  # [B, C, S]
            pad = pad & ~jnp.all(pad, axis=-1, keepdims=True)
            scores = jnp.where(pad[:, :, None, :], -jnp.inf, scores)
        return jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        lengths = jnp.maximum(jnp.sum(mask, axis=-1), 1)[..., None, None].astype(q.dtype)  # [B, C, 1, 1]
    else:
        lengths = jnp.asarray(S, q.dtype)
    if causal is not None:
        lengths = jnp.sum(causal, axis=-1, keepdims=True).astype(q.dtype)  # [T, 1]
    scores = jnp.einsum("bctz,bcsz->bcts", q, k) / lengths + bias
    weights = nn.ACT2FN[config.attention_activation](scores)
    if mask is not None:
        weights = weights * mask[:, :, None, :].astype(weights.dtype)
    if causal is not None:
        weights = weights * causal.astype(weights.dtype)
    return weights


def chunked(x: jax.Array, config: MegaConfig) -> jax.Array:
    """[B, T, ...] -> [B, C, T / C, ...]: HF's chunks of chunk_size (one chunk when shorter)."""
    B, T = x.shape[:2]
    if not config.use_chunking or T < config.chunk_size:
        return x[:, None]
    return x.reshape(B, T // config.chunk_size, config.chunk_size, *x.shape[2:])


def decode_weights(p: MegaGatedAttention, config: MegaConfig, q, keys, new_valid, position):
    """Weights of one new query at slot `position` over the cached keys [B, S, Z] (slots after
    `position` are unfilled and get weight 0). HF's incremental step passes only the new
    token's mask: past pad keys are NOT masked (softmax never masks a single-key mask; the
    element functions multiply every key by the new token's mask) and the element length
    is 1 (HF's causal mask for a one-token input). q [B, 1, Z]; returns [B, 1, 1, S]."""
    S = keys.shape[1]
    slots = jnp.arange(S, dtype=jnp.int32)
    filled = slots <= position  # [S]
    if config.relative_positional_bias == "simple":
        M = config.bias_positions
        bias = p.rel_pos_bias.rel_pos_bias[jnp.clip(M - 1 + slots - position, 0, None)]
    else:
        sin, cos = rotary_sinusoids(S, config.shared_representation_size, q.dtype)

        def rotate(v, s, c):
            v1, v2 = jnp.split(jnp.broadcast_to(v, (s.shape[0], v.shape[-1])), 2, axis=-1)
            return jnp.concatenate([v1 * c - v2 * s, v2 * c + v1 * s], axis=-1)

        row = jax.lax.dynamic_slice_in_dim(rotate(p.rel_pos_bias.alpha, sin, cos), position, 1)  # [1, Z]
        bias = jnp.einsum("mk,nk->mn", row, rotate(p.rel_pos_bias.b_param, sin, cos))[0]
    if config.attention_activation == "softmax":
        scores = jnp.einsum("btz,bsz->bts", q * config.shared_representation_size ** -0.5, keys) + bias
        weights = jax.nn.softmax(jnp.where(filled, scores, -jnp.inf), axis=-1)
    else:
        scores = jnp.einsum("btz,bsz->bts", q, keys) + bias
        weights = nn.ACT2FN[config.attention_activation](scores)
        weights = weights * new_valid[:, :, None].astype(weights.dtype) * filled.astype(weights.dtype)
    return weights[:, None]


# ---------------------------------------------------------------------------------------
# Moving-average gated attention, normalized FFN, block
# ---------------------------------------------------------------------------------------

def gated_attention(p: MegaGatedAttention, config: MegaConfig, x, mask, layer_cache=None, start=None):
    """HF `MegaMovingAverageGatedAttention.forward`. x [B, T, D]; mask [B, T] or None.
    layer_cache: (keys [B, S, Z], values [B, S, E], ema_state [B, D, N]) or None.
    Returns (out [B, T, D], weights, new layer cache, taps)."""
    B, T, D = x.shape
    E, Z = config.intermediate_size, config.shared_representation_size
    act = nn.ACT2FN[config.activation]
    residual = x
    h = sequence_norm(p.norm, config, x) if config.normalize_before_mega else x
    value = act(nn.linear(p.v_proj, h))  # [B, T, E]
    cached = layer_cache is not None
    ema_out, new_state = ema_gate(p.ema_gate, config, h, mask, layer_cache[2] if cached else None, cached)
    base = nn.linear(p.mx_proj, ema_out)  # [B, T, D + Z + E + D]
    residual_weight = jax.nn.sigmoid(base[..., :D])
    qk_gates = jax.nn.silu(base[..., D:D + Z + E])
    intermediate = base[..., D + Z + E:]
    query_key, attention_gate = qk_gates[..., :Z], qk_gates[..., Z:]
    q = query_key * p.qk_weight[0] + p.qk_bias[0]  # [B, T, Z]
    k = query_key * p.qk_weight[1] + p.qk_bias[1]

    new_cache = None
    if cached and T == 1:
        keys = jax.lax.dynamic_update_slice_in_dim(layer_cache[0], k.astype(layer_cache[0].dtype), start, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(layer_cache[1], value.astype(layer_cache[1].dtype), start, axis=1)
        new_valid = jnp.ones((B, 1), bool) if mask is None else mask.astype(bool)
        weights = decode_weights(p, config, q, keys, new_valid, start)  # [B, 1, 1, S]
        context = jnp.einsum("bcts,bse->bcte", weights, values)
        new_cache = (keys, values, new_state)
    else:
        causal = None
        if config.is_decoder:
            n = T if not config.use_chunking else config.chunk_size
            causal = jnp.tril(jnp.ones((n, n), bool))
        chunk_mask = None if mask is None else chunked(mask, config)
        weights = attention_weights(p, config, chunked(q, config), chunked(k, config), chunk_mask, causal)
        context = jnp.einsum("bcts,bcse->bcte", weights, chunked(value, config))
        if cached:  # prefill: the new tokens fill slots [start, start + T)
            keys = jax.lax.dynamic_update_slice_in_dim(layer_cache[0], k.astype(layer_cache[0].dtype), start, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(layer_cache[1], value.astype(layer_cache[1].dtype), start,
                                                         axis=1)
            new_cache = (keys, values, new_state)
    context = context.reshape(B, T, E)
    hidden = act(intermediate + nn.linear(p.h_proj, context * attention_gate))  # [B, T, D]
    out = residual + residual_weight * (hidden - residual)
    if not config.normalize_before_mega:
        out = sequence_norm(p.norm, config, out)
    taps = {"mega_layer.ema_gate": ema_out, "mega_layer.attn_weights": weights, "mega_layer": out}
    return out, weights, new_cache, taps


def normalized_ffn(p, config: MegaConfig, x):
    """HF `MegaNormalizedFeedForwardNetwork`: x + fc2(act(fc1(norm(x)))) (pre- or post-norm)."""
    h = sequence_norm(p.norm, config, x) if config.normalize_before_ffn else x
    out = nn.linear(p.fc2, nn.ACT2FN[config.activation](nn.linear(p.fc1, h))) + x
    return out if config.normalize_before_ffn else sequence_norm(p.norm, config, out)


def block(p: MegaLayer, config: MegaConfig, x, mask, layer_cache=None, start=None):
    """HF `MegaBlock` (no cross-attention). p holds ONE layer's params."""
    x, weights, new_cache, taps = gated_attention(p.mega_layer, config, x, mask, layer_cache, start)
    if p.nffn is not None:
        x = normalized_ffn(p.nffn, config, x)
    taps["nffn"] = x  # = the mega_layer output when use_normalized_ffn is false
    taps[""] = x
    return x, weights, new_cache, taps


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------

class MegaCache(eqx.Module):
    """Incremental decoding state, passed in and returned, never stored.

    keys [L, B, S, Z] and values [L, B, S, E]: the attention keys and values of every slot
    (HF's self_key / self_value, preallocated here); ema_state [L, B, D, N]: the EMA state
    after the last token (HF's self_ema_state); length []: slots filled."""

    keys: jax.Array
    values: jax.Array
    ema_state: jax.Array
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]


def check_cache_support(config: MegaConfig) -> None:
    """HF caches only decoders with a one-directional EMA and no chunking; refuse the rest."""
    if not config.is_decoder:
        raise ValueError("MEGA caches only decoders (config.is_decoder=true); HF ignores use_cache otherwise")
    if config.bidirectional:
        raise ValueError("a bidirectional EMA cannot decode incrementally (config.bidirectional=true; HF raises "
                         "'Bidirectional EMA does not support incremental state')")
    if config.use_chunking:
        raise ValueError("HF MEGA's incremental decoding does not work with config.use_chunking=true (its causal "
                         "mask has chunk_size rows and fails against a one-token query); refjax refuses it")


def unstack_layers(params: MegaParams) -> MegaParams:
    """The same params with the layers as a tuple, for decoding (see ref/layers.py)."""
    return layers.unstack_at(params, lambda p: p.mega.layers)


def init_cache(config: MegaConfig, batch: int, max_length: int, dtype) -> MegaCache:
    """An empty cache for `max_length` tokens."""
    check_cache_support(config)
    L, D, N = config.num_hidden_layers, config.hidden_size, config.ema_projection_size
    return MegaCache(
        keys=jnp.zeros((L, batch, max_length, config.shared_representation_size), dtype),
        values=jnp.zeros((L, batch, max_length, config.intermediate_size), dtype),
        ema_state=jnp.zeros((L, batch, D, N), dtype),
        length=jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------------------------------
# Stack and heads
# ---------------------------------------------------------------------------------------

TAPS = ("embedding_layer", "layers.{i}.mega_layer.ema_gate", "layers.{i}.mega_layer.attn_weights",
        "layers.{i}.mega_layer", "layers.{i}.nffn", "layers.{i}")


def check_sequence(config: MegaConfig, T: int, cache: MegaCache | None) -> None:
    """Length rules HF enforces (or fails on with a shape error): chunking splits the input into
    chunk_size pieces; the simple bias reaches bias_positions tokens; a cache takes one token
    at a time after the first call."""
    C = config.chunk_size
    if config.use_chunking:
        if T > C and T % C:
            raise ValueError(f"input sequence length ({T}) must be at most or a multiple of config.chunk_size ({C}) "
                             "when config.use_chunking is true (HF fails on this input)")
        if config.is_decoder and T % C:
            raise ValueError(f"input sequence length ({T}) must be a multiple of config.chunk_size ({C}) for a "
                             "chunked decoder (HF's causal mask has chunk_size rows and fails on this input)")
    window = min(T, C) if config.use_chunking else T
    if cache is not None:
        filled = int(cache.length) if nn.is_concrete(cache.length) else 0
        if filled and T != 1:
            raise ValueError(f"with a non-empty cache, input_ids must hold exactly one new token (HF's incremental "
                             f"decoding only supports length 1), got {T}")
        window = filled + T
    if config.relative_positional_bias == "simple" and window > config.bias_positions:
        what = "chunk_size" if config.chunk_size >= 0 else "max_positions"
        raise ValueError(f"sequence length {window} goes beyond the simple relative position bias "
                         f"(config.{what}={config.bias_positions})")


def model(p: MegaParams, config: MegaConfig, input_ids=None, attention_mask=None, token_type_ids=None,
          inputs_embeds=None, cache: MegaCache | None = None, want_taps=False):
    """HF `MegaModel`: (last_hidden_state, hidden_states [L+1, B, T, D], attentions, cache, taps).
    No position embeddings: positions enter only through the relative bias and the EMA."""
    body = p.mega
    x = nn.embed(body.word_embeddings, input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
    if body.token_type_embeddings is not None:
        types = jnp.zeros(x.shape[:2], jnp.int32) if token_type_ids is None else token_type_ids
        x = x + nn.embed(body.token_type_embeddings, types)
    embedded = x
    start = None if cache is None else cache.length

    def step(x, layer):
        layer_params, _, layer_cache = layer
        x_in = x
        x, weights, new_cache, taps = block(layer_params, config, x, attention_mask, layer_cache, start)
        return x, (x_in, weights, new_cache, taps if want_taps else None)

    layer_caches = None if cache is None else (cache.keys, cache.values, cache.ema_state)
    # a lax.scan over the stacked layers (or a loop over `ref.layers.unstack`ed ones)
    x, (layer_inputs, attentions, new_caches, layer_taps) = layers.run_layers(step, x, body.layers, layer_caches)
    hidden_states = jnp.concatenate([layer_inputs, x[None]], axis=0)
    new_cache = None
    if cache is not None:
        T = x.shape[1]
        new_cache = MegaCache(keys=new_caches[0], values=new_caches[1], ema_state=new_caches[2],
                              length=cache.length + T)
    taps = None
    if want_taps:
        taps = {"embedding_layer": embedded, **{f"layers.{k}" if k else "layers": v for k, v in layer_taps.items()}}
    return x, hidden_states, attentions, new_cache, taps


def lm_scores(p: MegaParams, config: MegaConfig, hidden):
    """LM heads: optional dense + tanh, then the vocab projection (tied to the word embeddings
    when tie_word_embeddings; the bias is always its own)."""
    if p.dense is not None:
        hidden = jnp.tanh(nn.linear(p.dense, hidden))
    if p.lm_head.kernel is None:
        return jnp.einsum("...d,vd->...v", hidden, p.mega.word_embeddings.table) + p.lm_head.bias
    return nn.linear(p.lm_head, hidden)


def forward(params: MegaParams, config: MegaConfig, input_ids=None, attention_mask=None, token_type_ids=None,
            inputs_embeds=None, labels=None, start_positions=None, end_positions=None,
            cache: MegaCache | None = None, *, output_hidden_states=False, output_attentions=False, taps=False,
            fast=False) -> heads.Output:
    """Any HF MEGA class, chosen by `config.architecture`; returns HF's output fields.

    attentions are HF's per-chunk weights [L, B, chunks, T', S'] (chunks = 1 without chunking).
    With a cache (decoders only, see `check_cache_support`), attention_mask covers only the
    new tokens; after the first call, one token per call (HF's incremental decoding).
    MEGA has no position ids. `fast` is accepted for the shared API: MEGA has no fast path.
    """
    if fast:
        raise ValueError("MEGA has no fast attention path; use fast=False")
    x = as_arrays(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                  inputs_embeds=inputs_embeds, labels=labels, start_positions=start_positions,
                  end_positions=end_positions)
    input_ids, attention_mask, token_type_ids, inputs_embeds, labels, start_positions, end_positions = x.values()
    arch = config.architecture
    if token_type_ids is not None and not config.add_token_type_embeddings:
        raise ValueError("token_type_ids given, but config.add_token_type_embeddings is false (the model has no "
                         "token type embeddings; HF would ignore them)")
    if cache is not None:
        check_cache_support(config)
    shape = check_token_inputs(vocab_size=config.vocab_size, hidden_size=config.hidden_size, input_ids=input_ids,
                               attention_mask=attention_mask, position_ids=None, inputs_embeds=inputs_embeds,
                               cache=cache, max_positions=None, token_type_ids=token_type_ids,
                               type_vocab_size=config.type_vocab_size,
                               allow_choices=arch == "MegaForMultipleChoice")
    if arch == "MegaForMultipleChoice" and len(shape) != 3:
        raise ValueError(f"MegaForMultipleChoice needs input_ids [batch, choices, seq], got {list(shape)}")
    check_sequence(config, shape[-1], cache)
    if arch in ("MegaForCausalLM", "MegaForMaskedLM"):
        check_task_labels("lm", labels, shape, config.vocab_size)
    elif arch == "MegaForSequenceClassification":
        check_task_labels("sequence", labels, shape, config.num_labels, config.problem_type)
    elif arch == "MegaForTokenClassification":
        check_task_labels("token", labels, shape, config.num_labels)
    elif arch == "MegaForMultipleChoice":
        check_labels(labels, "labels", shape[:1], shape[1], "choices", shape_source="input_ids' batch")

    if arch == "MegaForMultipleChoice":  # flatten choices into the batch, as HF
        def flat(a):
            return None if a is None else a.reshape(-1, *a.shape[2:])
        input_ids, attention_mask, token_type_ids, inputs_embeds = map(
            flat, (input_ids, attention_mask, token_type_ids, inputs_embeds))
    last, hidden_states, attentions, new_cache, tap_values = model(
        params, config, input_ids, attention_mask, token_type_ids, inputs_embeds, cache, taps)
    out = dict(last_hidden_state=last, cache=new_cache, taps=tap_values,
               hidden_states=hidden_states if output_hidden_states else None,
               attentions=attentions if output_attentions else None)
    pooled = None
    if params.mega.pooler is not None:  # HF MegaPooler: tanh(dense(first token))
        pooled = jnp.tanh(nn.linear(params.mega.pooler, last[:, 0]))
    if arch == "MegaModel":
        out["pooler_output"] = pooled
    if arch == "MegaForCausalLM":
        out["logits"] = lm_scores(params, config, last)
        if labels is not None:
            out["loss"] = losses.causal_lm_loss(out["logits"], labels)
    elif arch == "MegaForMaskedLM":
        out["logits"] = lm_scores(params, config, last)
        if labels is not None:
            out["loss"] = losses.cross_entropy(out["logits"].reshape(-1, config.vocab_size), labels.reshape(-1))
    elif arch == "MegaForSequenceClassification":
        head = params.classifier
        pooled = jnp.tanh(nn.linear(head.dense, last[:, 0]))  # the <s> token
        out["logits"] = nn.linear(head.out_proj, pooled)
        if labels is not None:
            out["loss"] = losses.sequence_classification_loss(out["logits"], labels, config.num_labels,
                                                              config.problem_type)
    elif arch == "MegaForTokenClassification":
        out["logits"], out["loss"] = heads.token_classification(params.classifier, last, config.num_labels, labels)
    elif arch == "MegaForMultipleChoice":
        out["logits"] = nn.linear(params.classifier, pooled).reshape(shape[0], shape[1])
        if labels is not None:
            out["loss"] = losses.cross_entropy(out["logits"], labels.reshape(-1))
    elif arch == "MegaForQuestionAnswering":
        out["start_logits"], out["end_logits"], out["loss"] = heads.question_answering(
            params.qa_outputs, last, start_positions, end_positions)
    return heads.Output(**out)

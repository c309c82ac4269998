"""MEGA's single-head attention within chunks (Ma et al. 2022, sec. 3.3 and 3.5), as HF 4.57.6 runs it.

Mirrors `MegaMovingAverageGatedAttention.softmax_attention` / `element_attention` and the
two relative position biases in `transformers/models/deprecated/mega/modeling_mega.py`:

    weights = softmax(q k^T / sqrt(Z) + bias)          attention_activation "softmax"
    weights = act(q k^T / n + bias) * mask             "laplace" / "relu2", n = real keys

Queries and keys come from the shared representation (width Z); there is one head. With
`use_chunking` the sequence is cut into chunks of chunk_size tokens that attend only within
themselves: shapes [B, C, T, S] with C chunks (C = 1 without chunking). `decode_weights` is
HF's incremental step: one new query over every cached key.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from refjax import nn
from refjax.params.mega import MegaConfig, MegaRelativeBias


def rotary_sinusoids(positions: int, dim: int, dtype) -> tuple[jax.Array, jax.Array]:
    """HF `get_sinusoid_embeddings` -> (sin, cos) [positions, dim / 2]: computed in float32 (HF
    builds them once in float32 and casts them to the model dtype), here on the host with
    numpy float32, as torch does."""
    half = dim // 2
    step = np.float32(math.log(10000) / half)
    freq = np.exp(np.arange(half, dtype=np.float32) * -step)
    angles = np.arange(positions, dtype=np.float32)[:, None] * freq[None, :]
    return jnp.asarray(np.sin(angles), dtype), jnp.asarray(np.cos(angles), dtype)


def relative_bias(p: MegaRelativeBias, config: MegaConfig, query_slots: Int[Array, "T"], S: int) -> Float[Array, "T S"]:
    """bias[t, j] for the query at slot query_slots[t] and key slot j < S.
    simple (HF `MegaSimpleRelativePositionalBias`): w[M - 1 + j - i], M = bias_positions
        (keys more than M - 1 slots back share w[0]: only unfilled decode slots reach that far).
    rotary (HF `MegaRotaryRelativePositionalBias`): rot(alpha)_i . rot(b_param)_j."""
    if config.relative_positional_bias == "simple":
        offsets = jnp.arange(S, dtype=query_slots.dtype)[None, :] - query_slots[:, None]  # j - i
        return p.rel_pos_bias[jnp.clip(config.bias_positions - 1 + offsets, 0, None)]
    sin, cos = rotary_sinusoids(S, config.shared_representation_size, p.alpha.dtype)

    def rotate(v):  # v [1, Z] -> [S, Z], rotating halves
        v1, v2 = jnp.split(jnp.broadcast_to(v, (S, v.shape[-1])), 2, axis=-1)
        return jnp.concatenate([v1 * cos - v2 * sin, v2 * cos + v1 * sin], axis=-1)

    return jnp.einsum("tz,sz->ts", rotate(p.alpha)[query_slots], rotate(p.b_param))


def chunked(x: Array, config: MegaConfig) -> Array:
    """[B, T, ...] -> [B, C, T / C, ...]: HF's chunks of chunk_size (one chunk when shorter)."""
    B, T = x.shape[:2]
    if not config.use_chunking or T < config.chunk_size:
        return x[:, None]
    return x.reshape(B, T // config.chunk_size, config.chunk_size, *x.shape[2:])


def weights(p: MegaRelativeBias, config: MegaConfig, q: Float[Array, "B C T Z"], k: Float[Array, "B C S Z"],
            mask: Int[Array, "B C S"] | None, causal: Bool[Array, "T S"] | None) -> Float[Array, "B C T S"]:
    """Attention weights within each chunk; mask: 1 = real key; causal [T, S] bool (decoders).

    softmax: softmax(q k^T / sqrt(Z) + bias) with -inf at future keys and at pad keys,
        except that a chunk whose keys are all padding is not masked at all (HF).
    laplace / relu2: act(q k^T / n + bias) * mask * causal, n = real keys in the chunk
        (at least 1), or i + 1 for query i of a decoder (HF's causal count)."""
    S = k.shape[2]
    bias = relative_bias(p, config, jnp.arange(S, dtype=jnp.int32), S)  # [S, S]
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
    w = nn.ACT2FN[config.attention_activation](jnp.einsum("bctz,bcsz->bcts", q, k) / lengths + bias)
    if mask is not None:
        w = w * mask[:, :, None, :].astype(w.dtype)
    if causal is not None:
        w = w * causal.astype(w.dtype)
    return w


def decode_weights(p: MegaRelativeBias, config: MegaConfig, q: Float[Array, "B 1 Z"], keys: Float[Array, "B S Z"],
                   new_valid: Array, position: Int[Array, ""]) -> Float[Array, "B 1 1 S"]:
    """Weights of one new query at slot `position` over the cached keys (slots after
    `position` are unfilled and get weight 0). HF's incremental step passes only the new
    token's mask [B, 1]: past pad keys are NOT masked (softmax never masks a single-key mask;
    the element functions multiply every key by the new token's mask) and the element length
    is 1 (HF's causal mask for a one-token input)."""
    S = keys.shape[1]
    filled = jnp.arange(S, dtype=jnp.int32) <= position  # [S]
    bias = relative_bias(p, config, position[None], S)  # [1, S]
    if config.attention_activation == "softmax":
        scores = jnp.einsum("btz,bsz->bts", q * config.shared_representation_size ** -0.5, keys) + bias
        w = jax.nn.softmax(jnp.where(filled, scores, -jnp.inf), axis=-1)
    else:
        w = nn.ACT2FN[config.attention_activation](jnp.einsum("btz,bsz->bts", q, keys) + bias)
        w = w * new_valid[:, :, None].astype(w.dtype) * filled.astype(w.dtype)
    return w[:, None]

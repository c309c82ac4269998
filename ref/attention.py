"""Masks and readable softmax attention, multi-head and grouped-query.

Query head n uses key/value head n // (N // K) (GQA, HF `repeat_kv` order); K/V are never
repeated in memory: the query heads are grouped instead, [B, T, K, G, H] with G = N // K.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from refjax.cache import write_slots
from refjax.nn import accum_dtype


def causal_mask(query_slots: jax.Array, num_slots: int) -> jax.Array:
    """Which key slots each query may see: [T] query slots -> [T, S] bool (key slot <= query
    slot). Query slots are 0.. without a cache and cache.length.. with one."""
    return jnp.arange(num_slots, dtype=query_slots.dtype)[None, :] <= query_slots[:, None]


class Mask(NamedTuple):
    """Which key slots each query of one call may see, built once per call (`mask_for`).

    Without a cache the T queries are slots 0..T-1 and S = T; with one they are slots
    [start, start + T) of the cache's S slots, of which `filled` = start + T hold a key."""

    key_valid: jax.Array  # [B, S] bool: the slot holds a real (non-pad) token
    causal: jax.Array | None  # [T, S] bool: key slot <= query slot (None: bidirectional)
    slots: jax.Array  # [T] int32: the query slots (default position ids)
    start: jax.Array  # [] int32: first slot this call writes (0 without a cache)
    filled: jax.Array | None  # [] int32: slots holding a key after this call (None without a cache)


def mask_for(attention_mask: jax.Array | None, batch: int, length: int, cache=None, causal: bool = True) -> Mask:
    """The `Mask` of a call with T = `length` new tokens; attention_mask [B, T] covers only
    the new tokens, the cache (a `KVCache`-like value with key_valid and length) the rest."""
    start = jnp.zeros((), jnp.int32) if cache is None else cache.length
    slots = start + jnp.arange(length, dtype=jnp.int32)  # [T]
    new_valid = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
    key_valid = new_valid if cache is None else write_slots(cache.key_valid, new_valid, start)  # [B, S]
    return Mask(key_valid=key_valid, causal=causal_mask(slots, key_valid.shape[1]) if causal else None,
                slots=slots, start=start, filled=None if cache is None else start + length)


# How HF's eager attention fills a *future* key's score (a named choice per family):
FUTURE_NEG_INF = "-inf"  # GPT-2 (4.x): causal `where(.., finfo.min)` plus the additive mask overflows to -inf
FUTURE_FINFO_MIN = "finfo.min"  # Arcee, RoFormer, GPT-2 in 5.x: one additive mask, finfo.min for pad and future alike


def mask_scores(scores: jax.Array, key_valid: jax.Array, causal: jax.Array | None,
                future_fill: str = FUTURE_NEG_INF, filled: jax.Array | None = None) -> jax.Array:
    """Apply padding and causal masks exactly as HF's eager attention does.

    scores [B, N, T, S]; key_valid [B, S] (1 = real token); causal [T, S] or None.
    A pad key gets `finfo.min`, never -inf, so every row stays finite (never NaN). A query
    with no real key at all (a left-pad query) then attends uniformly: to its past keys
    when future keys are -inf (GPT-2), to every key when they are finfo.min too (Arcee).
    `filled`: number of cache slots that hold a key; later slots do not exist in HF's
    growing cache, so they are -inf whatever `future_fill` says.
    """
    lowest = jnp.asarray(jnp.finfo(scores.dtype).min, scores.dtype)
    zero = jnp.zeros((), scores.dtype)
    masked = ~key_valid[:, None, None, :]  # [B, 1, 1, S]
    if causal is not None and future_fill == FUTURE_FINFO_MIN:
        masked = masked | ~causal  # [B, 1, T, S]
    # HF *adds* finfo.min (scores + finfo.min == finfo.min for any realistic score): the same
    # forward values as a `where`, but the gradient reaches the scores of a row that has no
    # visible key at all (a pad query attends uniformly), as HF autograd's does.
    scores = scores + jnp.where(masked, lowest, zero)
    if causal is not None and future_fill == FUTURE_NEG_INF:
        scores = jnp.where(causal, scores, -jnp.inf)
    if filled is not None:
        exists = jnp.arange(scores.shape[-1], dtype=filled.dtype) < filled  # [S]
        scores = jnp.where(exists, scores, -jnp.inf)
    return scores


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, causal: jax.Array | None,
                      scale: float, score_dtype=None, future_fill: str = FUTURE_NEG_INF,
                      filled: jax.Array | None = None, scores_hook=None,
                      probs_hook=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """softmax(mask(q k^T * scale)) v.

    q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N; key_valid [B, S] bool;
    causal [T, S] bool or None (bidirectional).
    `score_dtype`: dtype of q k^T and the softmax; default: q's dtype promoted to at least
    fp32 (softmax always accumulates in fp32 or wider). Probabilities are cast back to
    v's dtype before the weighted sum, as HF does.
    `scores_hook` / `probs_hook`: functions applied to the scores before masking and to the
    probabilities before the weighted sum (a family's taps, patches and attention dropout:
    ref/probe.py); what they return is what flows on and what is returned.
    Returns (context [B, T, N, H], probs [B, N, T, S], scores [B, N, T, S] before masking).
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    score_dtype = score_dtype or accum_dtype(q.dtype)
    q_grouped = q.reshape(B, T, K, N // K, H).astype(score_dtype)  # [B, T, K, G, H]
    scores = jnp.einsum("btkgh,bskh->bkgts", q_grouped, k.astype(score_dtype)) * jnp.asarray(scale, score_dtype)
    scores = scores.reshape(B, N, T, S)  # [B, N, T, S]
    if scores_hook is not None:
        scores = scores_hook(scores)
    probs = jax.nn.softmax(mask_scores(scores, key_valid, causal, future_fill, filled), axis=-1).astype(v.dtype)
    if probs_hook is not None:
        probs = probs_hook(probs)
    probs_grouped = probs.reshape(B, K, N // K, T, S)
    context = jnp.einsum("bkgts,bskh->btkgh", probs_grouped, v).reshape(B, T, N, H)
    return context, probs, scores


def fast_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, causal: jax.Array,
                   scale: jax.Array | float, filled: jax.Array | None = None) -> jax.Array:
    """The fast path: `jax.nn.dot_product_attention` (XLA, or cuDNN flash attention on GPU),
    GQA without repeating K/V. Same result as `softmax_attention` for every query that has
    a real key; rows with none (pad queries) are implementation-defined, as in HF's SDPA.
    No probabilities are returned. q [B, T, N, H], k/v [B, S, K, H] -> context [B, T, N, H]."""
    mask = causal[None, None, :, :] & key_valid[:, None, None, :]  # [B, 1, T, S]
    if filled is not None:
        mask = mask & (jnp.arange(k.shape[1], dtype=filled.dtype) < filled)
    q = q * jnp.asarray(scale, q.dtype)  # the scale may be traced (GPT-2's per-layer 1/(layer+1))
    with jax.numpy_dtype_promotion("standard"):  # JAX's own code mixes fp32 into fp64 inputs
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0)

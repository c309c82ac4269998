"""The KV cache: a value passed into a forward and returned updated, never stored.

Shapes, once: keys and values are [L, B, S, K, H] with S the preallocated number of
slots; `key_valid` [B, S] marks slots that hold a real (non-pad) token; `length` is how
many slots are filled (the same for every row: padding is expressed by `key_valid`).
A forward with a cache writes its T new tokens into slots [length, length + T) with
`lax.dynamic_update_slice` and attends over all S slots; unfilled slots are excluded by
the causal mask, because they lie after every query.

`per_layer()` holds keys and values as tuples of L arrays [B, S, K, H] instead: what
`generate` decodes with on unstacked layers, so each layer reads and writes its own buffer
(a stacked cache is sliced and re-stacked around every layer of every step, which XLA:CPU
does with copies).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp


class KVCache(eqx.Module):
    keys: jax.Array | tuple[jax.Array, ...]  # [L, B, S, K, H], or L x [B, S, K, H] (per_layer)
    values: jax.Array | tuple[jax.Array, ...]  # as keys
    key_valid: jax.Array  # [B, S] bool
    length: jax.Array  # [] int32

    @property
    def max_length(self) -> int:
        return self.key_valid.shape[1]

    @property
    def layers(self) -> "LayerKV":
        """Per-layer keys and values, stacked [L, ...] (what the layer scan slices) or tuples."""
        return LayerKV(self.keys, self.values)

    def per_layer(self) -> "KVCache":
        """The same cache with keys and values as tuples of per-layer buffers."""
        return dataclasses.replace(self, keys=tuple(self.keys), values=tuple(self.values))


class LayerKV(NamedTuple):
    """One layer's cached keys and values [B, S, K, H] (stacked [L, B, S, K, H], or per-layer
    tuples, for the whole stack)."""

    keys: jax.Array
    values: jax.Array


def init_cache(num_layers: int, batch: int, max_length: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
    shape = (num_layers, batch, max_length, kv_heads, head_dim)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        key_valid=jnp.zeros((batch, max_length), bool),
        length=jnp.zeros((), jnp.int32),
    )


def write_slots(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write new [B, T, ...] into buffer [B, S, ...] at slots [start, start + T)."""
    index = (jnp.zeros((), jnp.int32), start.astype(jnp.int32)) + (jnp.zeros((), jnp.int32),) * (buffer.ndim - 2)
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), index)


def updated(cache: KVCache, kv: LayerKV, key_valid: jax.Array, new_tokens: int) -> KVCache:
    """The cache after a call that wrote `new_tokens` slots: the stack's new keys/values (in
    the layout `kv` has: `layers.run_stack` keeps the cache's)."""
    return KVCache(keys=kv.keys, values=kv.values, key_valid=key_valid, length=cache.length + new_tokens)


def write_layer(kv: LayerKV, keys: jax.Array, values: jax.Array, start: jax.Array) -> LayerKV:
    """One layer's cache with this call's keys/values [B, T, K, H] written at slot `start`."""
    return LayerKV(write_slots(kv.keys, keys, start), write_slots(kv.values, values, start))

"""Autoregressive decoding: one jit-compiled `lax.while_loop` over a preallocated KV cache.

Family-agnostic: a family supplies `forward(params, config, input_ids, attention_mask,
position_ids=..., cache=...)` returning an `Output` with `logits` and `cache`, and
`init_cache(config, batch, max_length, dtype)`.

Semantics follow HF `GenerationMixin.generate` for decoder-only models:
- prompts are left-padded; position ids are `cumsum(attention_mask) - 1` (pads get 1), so
  every row's first real token is at position 0;
- logits processing order: temperature, top-k, top-p (HF's warper order); greedy is argmax;
- a row that emitted `eos_token_id` (or any id of a tuple of them) is finished: it gets
  `pad_token_id` from then on, and
  decoding stops once every row is finished (the returned sequences are then shorter).
Sampling uses JAX's PRNG, so sampled tokens are not HF's; greedy tokens are.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from refjax import nn


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding settings (static under jit). `do_sample=False` is greedy argmax."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def process_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """HF's warpers in order: temperature, top-k, top-p; removed tokens get -inf. [B, V]."""
    logits = logits / jnp.asarray(sampling.temperature, logits.dtype)
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth_best = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth_best, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        # HF TopPLogitsWarper: sort ascending, drop the low tail whose total mass is
        # <= 1 - top_p, always keeping the most likely token.
        order = jnp.argsort(logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        tail_mass = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = tail_mass <= 1.0 - sampling.top_p
        remove_sorted = remove_sorted.at[:, -1].set(False)
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def next_token(logits: jax.Array, sampling: Sampling, key: jax.Array) -> jax.Array:
    """[B, V] logits (fp32, as HF) -> [B] int32 token ids."""
    if not sampling.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, process_logits(logits, sampling), axis=-1).astype(jnp.int32)


def prompt_positions(attention_mask: jax.Array) -> jax.Array:
    """HF `prepare_inputs_for_generation`: cumsum(mask) - 1, pads set to 1. [B, T]"""
    positions = jnp.cumsum(attention_mask, axis=-1) - 1
    return jnp.where(attention_mask == 0, 1, positions).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("forward", "init_cache", "config", "max_new_tokens", "sampling",
                                             "eos_token_id", "pad_token_id", "return_logits", "fast",
                                             "takes_position_ids", "unstack_layers"))
def _generate(params, input_ids, attention_mask, key, *, forward: Callable, init_cache: Callable, config: Any,
              max_new_tokens: int, sampling: Sampling, eos_token_id: int | tuple[int, ...] | None, pad_token_id: int,
              return_logits: bool, fast: bool, takes_position_ids: bool, unstack_layers: Callable | None):
    if unstack_layers is not None:  # per-layer buffers, sliced once here, before the decode loop
        params = unstack_layers(params)
    B, T0 = input_ids.shape
    total = T0 + max_new_tokens
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    cache = init_cache(config, B, total, dtype)
    if unstack_layers is not None:  # and a buffer per layer for the cache (ref/cache.py)
        cache = cache.per_layer()
    # Families whose HF model has no position_ids input (positions = cache slot index) get none.
    positions = (lambda p: dict(position_ids=p)) if takes_position_ids else (lambda p: {})
    prefill = forward(params, config, input_ids, attention_mask, **positions(prompt_positions(attention_mask)),
                      cache=cache, fast=fast)
    sequences = jnp.concatenate([input_ids.astype(jnp.int32), jnp.full((B, max_new_tokens), pad_token_id, jnp.int32)], 1)
    step_logits = jnp.zeros((B, max_new_tokens if return_logits else 0, prefill.logits.shape[-1]), jnp.float32)
    state = dict(
        step=jnp.zeros((), jnp.int32),
        sequences=sequences,  # [B, T0 + N]
        logits=prefill.logits[:, -1].astype(jnp.float32),  # [B, V] next-token logits
        cache=prefill.cache,
        next_position=jnp.sum(attention_mask, axis=-1).astype(jnp.int32),  # [B]
        finished=jnp.zeros((B,), bool),
        key=key,
        step_logits=step_logits,
    )

    zero = jnp.zeros((), jnp.int32)  # dynamic_update_slice indices must share one int type
    eos_ids = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())  # stop at any of them

    def running(s):
        return (s["step"] < max_new_tokens) & ~jnp.all(s["finished"])

    def body(s):
        key, sample_key = jax.random.split(s["key"])
        token = next_token(s["logits"], sampling, sample_key)
        token = jnp.where(s["finished"], pad_token_id, token)
        finished = s["finished"] if not eos_ids else s["finished"] | jnp.isin(token, jnp.asarray(eos_ids, token.dtype))
        sequences = jax.lax.dynamic_update_slice(s["sequences"], token[:, None], (zero, T0 + s["step"]))
        if return_logits:
            step_logits = jax.lax.dynamic_update_slice(s["step_logits"], s["logits"][:, None], (zero, s["step"], zero))
        else:
            step_logits = s["step_logits"]
        out = forward(params, config, token[:, None], jnp.ones((B, 1), jnp.int32),
                      **positions(s["next_position"][:, None]), cache=s["cache"], fast=fast)
        return dict(step=s["step"] + 1, sequences=sequences, logits=out.logits[:, -1].astype(jnp.float32),
                    cache=out.cache, next_position=s["next_position"] + 1, finished=finished, key=key,
                    step_logits=step_logits)

    final = jax.lax.while_loop(running, body, state)
    return final["sequences"], final["step"], final["step_logits"]


def generate(forward: Callable, init_cache: Callable, params, config, input_ids, attention_mask=None, *,
             max_new_tokens: int, sampling: Sampling = Sampling(), eos_token_id: int | tuple[int, ...] | None = None,
             pad_token_id: int | None = None, key: jax.Array | None = None, max_positions: int | None = None,
             return_logits: bool = False, fast: bool = False, takes_position_ids: bool = True,
             unstack_layers: Callable | None = None):
    """Decode up to `max_new_tokens` after left-padded prompts [B, T0].

    Returns sequences [B, T0 + n] (prompt + new tokens, n <= max_new_tokens: shorter when
    every row hit eos, as HF), and with `return_logits` also the fp32 next-token logits
    [B, n, V] that chose each new token. `fast` selects the fast attention path.
    `takes_position_ids=False` is for families whose HF forward has no position ids
    (RoFormer, MEGA): `forward` is then called without them.
    `unstack_layers` (the family's): run the decode loop on per-layer weights, sliced out of
    the stack once per call. On CPU, XLA copies a scanned layer's weights out of the stack
    before its matmuls, so a stacked decode step reads every weight three times (read, write,
    read) instead of once; the sliced copy costs one extra copy of the layer weights in memory
    while `generate` runs (see `FamilyOps.generate` for when it is used). The KV cache is
    then held per layer too (`per_layer()`, ref/cache.py): a stacked one is sliced and
    re-stacked around every layer of every step (GPT-2 124M, 500-token prompt: 33.0 ->
    23.7 ms/token on a 2-core AMD EPYC). Same results.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] array, got shape {list(input_ids.shape)}")
    nn.check_ids(input_ids, config.vocab_size, "input_ids")
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}; input_ids has {list(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    mask_np = np.asarray(attention_mask)
    if mask_np.shape[1] > 1 and np.any(mask_np[:, 1:] < mask_np[:, :-1]):
        raise ValueError("prompts must be left-padded (attention_mask 0s before 1s in every row), as HF requires")
    if max_positions is not None:
        # positions count real tokens; without position ids they are the slots, pads included
        prompt = int(mask_np.sum(-1).max()) if takes_position_ids else mask_np.shape[1]
        longest = prompt + max_new_tokens
        if longest > max_positions:
            raise ValueError(f"prompt ({prompt} tokens) + max_new_tokens ({max_new_tokens}) = "
                             f"{longest} exceeds the position table ({max_positions} positions)")
    if max_new_tokens == 0:
        return (input_ids, jnp.zeros((input_ids.shape[0], 0, 0), jnp.float32)) if return_logits else input_ids
    if pad_token_id is None:
        # HF: pad with (the first) eos when no pad id is set
        pad_token_id = int(np.atleast_1d(eos_token_id)[0]) if eos_token_id is not None else 0
    key = jax.random.PRNGKey(0) if key is None else key
    sequences, steps, step_logits = _generate(
        params, input_ids, attention_mask, key, forward=forward, init_cache=init_cache, config=config,
        max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        return_logits=return_logits, fast=fast, takes_position_ids=takes_position_ids, unstack_layers=unstack_layers)
    n = int(steps)
    sequences = sequences[:, : input_ids.shape[1] + n]
    return (sequences, step_logits[:, :n]) if return_logits else sequences

"""Running the layer stack: `lax.scan` over stacked params, or a loop over unstacked ones.

Params keep every per-layer tensor stacked on axis 0 ([L, ...]), so the forward is one
`lax.scan` and compile time does not grow with depth. The price is paid in decoding:
XLA's CPU backend cannot feed a dynamic slice of a stacked weight straight into a matmul,
so every scan step first *copies* its layer's weights out of the stack (for GPT-2 124M,
about 340 MB of copying per generated token, more than half the weights' own reads).

`unstack(layers)` re-lays a stack once as a tuple of per-layer trees (one copy, done by
the caller, e.g. before a long `generate`); `run_layers` then loops over the tuple in
Python, each layer reading its own buffers with no per-step copy. Same math, same
results (tested); compile time then grows with depth, so it is a decode-time choice.

jaxlib before 0.12 has no 16-bit float arithmetic on CPU: XLA upcasts every bf16/fp16 op to
fp32, the stack included, and hoists that convert out of the scan, so a bf16 forward first
makes an fp32 copy of all stacked weights (for AFM-4.5B, 16 GB more than the 8 GB stack:
killed on a 24 GiB machine). There the scan slices a bit-pattern (uint16) view of the stack,
which XLA leaves alone, and each step turns only its own layer back into floats
(`stack_bits`). That view is one copy of the stack (same size, not double), made once.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxlib


def unstack(layers: Any) -> tuple:
    """A stacked layer tree ([L, ...] leaves) -> a tuple of L per-layer trees (a tuple is
    returned as it is)."""
    if isinstance(layers, tuple):
        return layers
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))


def per_layer(a: Any) -> bool:
    """Is `a` a plain tuple of per-layer buffers where a stacked [L, ...] array could be
    (decoding state held per layer, e.g. `KVCache.per_layer()`)? NamedTuples are not."""
    return type(a) is tuple


def layer_of(xs: Any, i: int) -> Any:
    """Layer i of per-layer state whose leaves are stacked [L, ...] arrays or `per_layer` tuples
    (`a[i]` is layer i of either)."""
    return jax.tree.map(lambda a: a[i], xs, is_leaf=per_layer)


def unstack_at(tree: Any, where: Callable[[Any], Any]) -> Any:
    """`tree` with its layer stack `where(tree)` replaced by `unstack(where(tree))`."""
    return eqx.tree_at(where, tree, unstack(where(tree)))


HALF_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cpu_upcasts_half_floats() -> bool:
    """True where XLA computes bf16/fp16 in fp32 and hoists the upcast of scanned weights:
    the CPU backend of jaxlib < 0.12 (measured with 0.10.2; 0.12.0.1 keeps bf16)."""
    major, minor = (int(part) for part in jaxlib.__version__.split(".")[:2])
    return (major, minor) < (0, 12) and jax.default_backend() == "cpu"


def stack_bits(layers: Any) -> tuple[Any, Callable[[Any], Any]]:
    """`layers` with bf16/fp16 leaves as uint16 bit patterns, and the function that turns one
    sliced layer back (other leaves pass through); see the module docstring for why."""
    dtypes = jax.tree.map(lambda a: a.dtype, layers)
    if not any(dtype in HALF_FLOATS for dtype in jax.tree_util.tree_leaves(dtypes)):
        return layers, lambda layer: layer
    bits = jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype in HALF_FLOATS else a, layers)
    return bits, lambda layer: jax.tree.map(
        lambda a, dtype: jax.lax.bitcast_convert_type(a, dtype) if dtype in HALF_FLOATS else a, layer, dtypes)


def run_layers(step: Callable, x: jax.Array, layers: Any, xs: Any = None, remat: bool = False):
    """`lax.scan(step, x, (layer_params, layer_index, xs))` over stacked `layers`, or the same
    as a Python loop when `layers` is a tuple from `unstack`; `xs` leaves are stacked [L, ...]
    or `per_layer` tuples (the loop takes each layer's own buffer: no slicing of a stack).
    Returns (x, ys) with ys stacked [L, ...] either way."""
    step = jax.checkpoint(step) if remat else step
    if not isinstance(layers, tuple):
        n = jax.tree_util.tree_leaves(layers)[0].shape[0]
        xs = jax.tree.map(lambda a: jnp.stack(a) if per_layer(a) else a, xs, is_leaf=per_layer)
        if cpu_upcasts_half_floats():
            layers, from_bits = stack_bits(layers)
            float_step = step

            def step(x, layer):
                layer_params, index, layer_xs = layer
                return float_step(x, (from_bits(layer_params), index, layer_xs))

        return jax.lax.scan(step, x, (layers, jnp.arange(n, dtype=jnp.int32), xs))
    outputs = []
    for i, layer in enumerate(layers):
        x, y = step(x, (layer, jnp.asarray(i, jnp.int32), layer_of(xs, i)))
        outputs.append(y)
    return x, jax.tree.map(lambda *ys: jnp.stack(ys), *outputs)


class LayerOut(NamedTuple):
    """What one attention or block call returns (scan stacks each field over layers)."""

    x: jax.Array  # [B, T, D] the output
    probs: jax.Array | None = None  # [B, N, T, S] attention probabilities (None on the fast path)
    kv: Any = None  # this layer's cache entry after the call (None without a cache)
    taps: dict | None = None  # named intermediates of this layer ("" = the layer's own output)


class Stack(NamedTuple):
    """The layer stack's result: the last layer's output and each layer's, stacked [L, ...]."""

    x: jax.Array  # [B, T, D] after the last layer
    inputs: jax.Array  # [L, B, T, D] every layer's input (HF's hidden_states before the last)
    attentions: jax.Array | None  # [L, B, N, T, S]
    kv: Any  # the new per-layer cache entries, in the given cache's layout (None without a cache)
    taps: dict | None  # per-layer taps stacked [L, ...], by name within the layer


def run_stack(block: Callable[..., LayerOut], x: jax.Array, layers: Any, kv: Any = None, *, remat: bool = False,
              taps: bool = False) -> Stack:
    """Apply `block(layer_params, layer_index, x, layer_kv) -> LayerOut` over the stack
    (see `run_layers`); `kv` is the per-layer cache (or None), stacked [L, ...] or `per_layer`
    tuples, and `Stack.kv` comes back in the same layout."""

    def step(x, layer):
        layer_params, index, layer_kv = layer
        out = block(layer_params, index, x, layer_kv)
        return out.x, (x, out.probs, None if kv is None else out.kv, out.taps if taps else None)

    x, (inputs, attentions, new_kv, layer_taps) = run_layers(step, x, layers, kv, remat)
    if kv is not None:  # a per-layer cache stays per layer (XLA drops the stack-then-slice: no copy)
        new_kv = jax.tree.map(lambda new, old: tuple(new) if per_layer(old) else new, new_kv, kv, is_leaf=per_layer)
    return Stack(x, inputs, attentions, new_kv, layer_taps)


def hidden_states(stack: Stack, last: jax.Array) -> jax.Array:
    """HF's hidden_states tuple, stacked: every layer's input, then `last` ([L + 1, B, T, D])."""
    return jnp.concatenate([stack.inputs, last[None]], axis=0)


def prefixed_taps(prefix: str, layer_taps: dict) -> dict:
    """Per-layer taps under the stack's module path: "attn.q" -> "h.attn.q", "" -> "h"."""
    return {f"{prefix}.{name}" if name else prefix: value for name, value in layer_taps.items()}

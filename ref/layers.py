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
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp


def unstack(layers: Any) -> tuple:
    """A stacked layer tree ([L, ...] leaves) -> a tuple of L per-layer trees."""
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))


def unstack_at(tree: Any, where: Callable[[Any], Any]) -> Any:
    """`tree` with its layer stack `where(tree)` replaced by `unstack(where(tree))`."""
    return eqx.tree_at(where, tree, unstack(where(tree)))


def run_layers(step: Callable, x: jax.Array, layers: Any, xs: Any = None, remat: bool = False):
    """`lax.scan(step, x, (layer_params, layer_index, xs))` over stacked `layers`, or the same
    as a Python loop when `layers` is a tuple from `unstack`; `xs` is always stacked [L, ...].
    Returns (x, ys) with ys stacked [L, ...] either way."""
    step = jax.checkpoint(step) if remat else step
    if not isinstance(layers, tuple):
        n = jax.tree_util.tree_leaves(layers)[0].shape[0]
        return jax.lax.scan(step, x, (layers, jnp.arange(n, dtype=jnp.int32), xs))
    outputs = []
    for i, layer in enumerate(layers):
        x, y = step(x, (layer, jnp.asarray(i, jnp.int32), jax.tree.map(lambda a, i=i: a[i], xs)))
        outputs.append(y)
    return x, jax.tree.map(lambda *ys: jnp.stack(ys), *outputs)

"""Parameter containers shared by every family: plain data, no math.

Every container is a frozen `eqx.Module` pytree of arrays. Sizes are never stored here;
they live in the config. Conventions (one alphabet across refjax):
    D model width, F ffn width, V vocab, P positions, L layers, O output width.
Linear kernels are stored [in, out] so that `x @ kernel` is the layer: HF's GPT-2
`Conv1D` uses that layout already; `nn.Linear` checkpoints are transposed on load.
"""

from __future__ import annotations

import equinox as eqx
import jax


class Linear(eqx.Module):
    kernel: jax.Array  # [in, out]  (stacked: [L, in, out])
    bias: jax.Array | None = None  # [out]


class LayerNorm(eqx.Module):
    scale: jax.Array  # [D]  HF: `weight`
    bias: jax.Array | None = None  # [D]


class Embedding(eqx.Module):
    table: jax.Array  # [V, D]  HF: `weight`


class RMSNorm(eqx.Module):
    scale: jax.Array  # [D]  HF: `weight`

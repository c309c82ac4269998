"""Small pure building blocks: linear layers, embeddings, norms, activations.

Shape alphabet used across refjax: B batch, T query length, S key length, D model width,
F ffn width, N heads, K kv heads, H head dim, V vocab, P positions, L layers.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from refjax.params.common import Embedding, LayerNorm, Linear, RMSNorm


def accum_dtype(dtype) -> jnp.dtype:
    """The dtype softmax, norms and losses accumulate in: fp32, or fp64 for fp64 inputs."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def linear(p: Linear, x: jax.Array) -> jax.Array:
    """`x @ kernel + bias`; kernel is [in, out] (HF Conv1D layout)."""
    y = jnp.einsum("...i,io->...o", x, p.kernel)
    return y if p.bias is None else y + p.bias


def layer_norm(p: LayerNorm, x: jax.Array, eps: float) -> jax.Array:
    """`torch.nn.LayerNorm`: biased variance, eps inside the square root.

    Statistics accumulate in at least fp32 (a bf16 input is upcast, fp64 stays fp64)."""
    dtype = x.dtype
    x = x.astype(accum_dtype(dtype))
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    y = y.astype(dtype) * p.scale
    return y if p.bias is None else y + p.bias


def rms_norm(p: RMSNorm, x: jax.Array, eps: float) -> jax.Array:
    """HF `LlamaRMSNorm`/`ArceeRMSNorm`: x / sqrt(mean(x^2) + eps), cast back, then * weight.

    Accumulates in fp32 (HF), or fp64 for fp64 inputs (HF downcasts those to fp32)."""
    dtype = x.dtype
    x = x.astype(accum_dtype(dtype))
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return p.scale * y.astype(dtype)


def is_concrete(x) -> bool:
    """True for values we can inspect now (not jit tracers): validation runs only then."""
    return not isinstance(x, jax.core.Tracer)


def check_ids(ids, upper: int, name: str, what: str = "vocab_size") -> None:
    """Raise if an integer id array has values outside [0, upper).

    JAX gathers clamp out-of-range indices silently, so this is checked before compute
    whenever the ids are concrete (eager calls, the CLI); under jit it is skipped."""
    if ids is None or not is_concrete(ids):
        return
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, got dtype {ids.dtype}")
    if ids.size == 0:
        return
    ids = np.asarray(ids)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains {bad}, outside [0, {upper}) ({what}={upper})")


def embed(p: Embedding, ids: jax.Array, padding_idx: int | None = None) -> jax.Array:
    """Row lookup: [...] int -> [..., D]. `padding_idx`: as HF `nn.Embedding(padding_idx=i)`."""
    return no_grad_at_padding(jnp.take(p.table, ids, axis=0), ids, padding_idx)


def no_grad_at_padding(rows: jax.Array, ids: jax.Array, padding_idx: int | None) -> jax.Array:
    """torch's `nn.Embedding(padding_idx=i)`: row i is looked up as stored but its lookups
    send no gradient to the table (other uses of the table, e.g. a tied LM head, still do)."""
    if padding_idx is None:
        return rows
    return jnp.where((ids == padding_idx)[..., None], jax.lax.stop_gradient(rows), rows)


# ---------------------------------------------------------------------------------------
# Activations: HF `transformers.activations.ACT2FN`, by the names config.json uses.
# ---------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_erf(x):
    """"gelu": exact GELU, x * Phi(x) (torch.nn.functional.gelu)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    """"gelu_new" (GPT-2's NewGELU; also gelu_pytorch_tanh, gelu_accurate): tanh approximation
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def gelu_fast(x):
    """"gelu_fast": the same tanh approximation with sqrt(2/pi) rounded to 0.7978845608."""
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def laplace(x, mu=0.707107, sigma=0.282095):
    """"laplace" (MEGA's attention activation): 0.5 (1 + erf((x - mu) / (sigma sqrt 2)))."""
    return 0.5 * (1.0 + jax.lax.erf((x - mu) / (sigma * math.sqrt(2.0))))


ACT2FN: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,
    "gelu_python": gelu_erf,
    "gelu_10": lambda x: jnp.clip(gelu_erf(x), -10.0, 10.0),
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "gelu_accurate": gelu_tanh,
    "gelu_fast": gelu_fast,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "laplace": laplace,
    "leaky_relu": lambda x: jnp.where(x >= 0, x, 0.01 * x),
    "linear": lambda x: x,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": lambda x: jnp.clip(x, 0.0, 6.0),
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

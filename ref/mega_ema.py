"""MEGA's multi-dimensional damped EMA (Ma et al. 2022, eqs. 3-5), as HF 4.57.6 runs it.

Mirrors `MegaMultiDimensionDampedEma` in `transformers/models/deprecated/mega/modeling_mega.py`.
Per kernel row d and EMA dimension n, with delta = sigmoid(damping_factor),
alpha = sigmoid(decay_factor) and q = 1 - delta * alpha:

    state_t = delta * beta * u_t + q * state_{t-1}          [B, D, N]
    y_t     = sum_n gamma * sqrt(1/N) * state_t

Unrolled over a sequence this is a causal convolution with the kernel
    k[d, l] = sum_n gamma[d, n] sqrt(1/N) delta[d, n] beta[d, n] q[d, n]^l,
which HF applies with an FFT (`full`); with a cache HF runs the convolution over the new
tokens plus the decayed past state (`steps`), or one step of the recurrence (`one_step`).

Shapes: B batch, D hidden_size, T tokens, N ema_projection_size, K kernel rows (2D when
bidirectional: rows [:D] run forward in time, rows [D:] backward; else D). The EMA works
channels-first, u [B, D, T], as HF does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from refjax.params.mega import MegaConfig, MegaEma


def coefficients(p: MegaEma) -> tuple[Float[Array, "K N 1"], Float[Array, "K N 1"]]:
    """(delta, q): the input weight and the previous-step weight."""
    delta = jax.nn.sigmoid(p.damping_factor)
    alpha = jax.nn.sigmoid(p.decay_factor)
    return delta, 1.0 - delta * alpha


def projection(p: MegaEma) -> Float[Array, "K N"]:
    """gamma * sqrt(1/N): how the N EMA dimensions mix into one output per row."""
    return p.kernel_projection_matrix * math.sqrt(1.0 / p.kernel_projection_matrix.shape[-1])


def kernel(p: MegaEma, length: int) -> Float[Array, "K length"]:
    """The convolution kernel k[d, l], l < length (HF `_compute_efficient_ema_kernel`)."""
    delta, q = coefficients(p)
    vander = jnp.arange(length, dtype=q.dtype).reshape(1, 1, length) * jnp.log(q)  # [K, N, L]
    return jnp.einsum("dnl,dn->dl", (delta * p.ema_expansion_matrix) * jnp.exp(vander), projection(p))


def fft_convolution(inputs: Float[Array, "B D T"], kernel: Float[Array, "D S"], length: int,
                    fft_dtype=jnp.float32) -> jax.Array:
    """HF `fft_convolution`: irfft(rfft(u, 2n) * rfft(k, 2n), 2n) over the last axis, n = length
    (-> [B, D, 2n], in `fft_dtype`; callers keep the part they need).

    HF casts both operands to float32 (`.float()`) whatever the model dtype, so a float64
    model's EMA is float32-accurate; refjax does the same (see refjax.tooling.verify).
    `fft_dtype` exists for the tests (float64 shows the convolution is the recurrence to 1e-12)."""
    n = 2 * length
    u = jnp.fft.rfft(inputs.astype(fft_dtype), n=n)
    k = jnp.fft.rfft(kernel.astype(fft_dtype), n=n)
    return jnp.fft.irfft(u * k, n=n)


def full(p: MegaEma, config: MegaConfig, u: Float[Array, "B D T"], fft_dtype=jnp.float32) -> Float[Array, "B D T"]:
    """The EMA over a whole (already masked) sequence: HF's forward without a cache. The
    kernel is `truncation` long when set. Bidirectional: the forward and the backward half of
    the kernel are laid out around one centre and convolved at once."""
    T, D = u.shape[-1], config.hidden_size
    size = T if config.truncation is None else min(config.truncation, T)
    k = kernel(p, size)  # [K, size]
    if not config.bidirectional:
        out = fft_convolution(u, k, T, fft_dtype)[..., :T]
    else:
        k = jnp.pad(k[:D], ((0, 0), (size - 1, 0))) + jnp.pad(k[D:, ::-1], ((0, 0), (0, size - 1)))  # [D, 2s-1]
        u = jnp.pad(u, ((0, 0), (0, 0), (size - 1, 0)))
        start = 2 * size - 2
        out = fft_convolution(u, k, T + size - 1, fft_dtype)[..., start:start + T]
    return out.astype(u.dtype)


def steps(p: MegaEma, u: Float[Array, "B D T"], state: Float[Array, "B D N"]):
    """HF `ema_step` for T tokens after `state` (zeros: no past): the FFT convolution over the
    new tokens (never truncated) plus the decayed past state. -> (y [B, D, T], state [B, D, N])"""
    T = u.shape[-1]
    delta, q = coefficients(p)
    gamma = projection(p)  # [D, N]
    vander = jnp.exp(jnp.arange(T + 1, dtype=q.dtype).reshape(1, 1, T + 1) * jnp.log(q))  # [D, N, T+1]
    past_out = jnp.einsum("bdn,dnl->bdl", state, vander[:, :, 1:] * gamma[..., None])  # the past, decayed
    past_decay = vander[:, :, -1] * state  # [B, D, N]
    k = (delta * p.ema_expansion_matrix) * vander[:, :, :-1]  # [D, N, T]
    out = fft_convolution(u, jnp.einsum("dnl,dn->dl", k, gamma), T)[..., :T].astype(u.dtype) + past_out
    return out, jnp.einsum("bdl,dnl->bdn", u, k[:, :, ::-1]) + past_decay


def one_step(p: MegaEma, u: Float[Array, "B D 1"], state: Float[Array, "B D N"]):
    """HF `one_ema_step`: the recurrence for one token. -> (y [B, D, 1], state [B, D, N])"""
    delta, q = coefficients(p)
    state = (delta * p.ema_expansion_matrix)[..., 0] * u + q[..., 0] * state  # [B, D, N]
    return jnp.einsum("bdn,dn->bd", state, projection(p))[..., None], state


def gate(p: MegaEma, config: MegaConfig, x: Float[Array, "B T D"], mask, state: Float[Array, "B D N"] | None = None):
    """HF `MegaMultiDimensionDampedEma.forward`: silu(EMA(x * mask) + omega * x), mask [B, T]
    or None. With a cache `state` is read and the new one returned. -> ([B, T, D], state)"""
    residual = x * p.residual_weight
    u = jnp.swapaxes(x, 1, 2)  # [B, D, T]
    if mask is not None:
        u = u * mask[:, None, :].astype(u.dtype)
    if state is None:
        y = full(p, config, u)
    elif x.shape[1] == 1:
        y, state = one_step(p, u, state)
    else:
        y, state = steps(p, u, state)
    return jax.nn.silu(jnp.swapaxes(y, 1, 2) + residual), state

"""Rotary position embeddings (Su et al., 2021, "RoFormer") and HF's rope_scaling types.

One function per HF 4.57.6 `rope_type` (transformers/modeling_rope_utils.py), each
returning `(inv_freq [rotary_dim / 2], attention_scaling)`:
  default  inv_freq_i = 1 / theta^(2i / d)
  linear   default / factor                                   (position interpolation)
  dynamic  NTK-aware: theta grows with the sequence length once it passes the table
  yarn     per-frequency blend of interpolation and extrapolation + attention factor
  longrope per-frequency short/long rescale factors + attention factor
  llama3   Llama-3.1 smooth low/high-frequency rescaling

Numerics: HF computes these in float32 with torch; we emulate its float32 chain in numpy
(`_f32_pow`: a correctly rounded float32 power, then float32 divisions), which reproduces
torch's inv_freq bit for bit in ~99% of entries and within 1 ulp otherwise. Angles and
cos/sin are float32 (HF's "force float32") unless the model runs in float64, where they
are float64 (HF downcasts there; see docs/design.md).

Layout: Llama/Arcee rotate *halves* (`rotate_half`: [x1, x2] -> [-x2, x1], cos/sin
repeated as [f, f]); RoFormer rotates interleaved *pairs* — a different function.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from refjax.params.arcee import ArceeConfig, RopeScaling


def _f32_pow(base, exponent) -> np.ndarray:
    """float32(base) ** float32(exponent), correctly rounded to float32 (as torch's powf)."""
    base32 = np.asarray(base, np.float32).astype(np.float64)
    exponent32 = np.asarray(exponent, np.float32).astype(np.float64)
    return (base32 ** exponent32).astype(np.float32)


def _exponents(dim: int) -> np.ndarray:
    """torch.arange(0, dim, 2).float() / dim, in float32. [dim / 2]"""
    return (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)).astype(np.float32)


def default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """1 / theta^(2i/dim), float32. [dim / 2]"""
    return (np.float32(1.0) / _f32_pow(theta, _exponents(dim))).astype(np.float32)


def linear_inv_freq(theta: float, dim: int, s: RopeScaling) -> tuple[np.ndarray, float]:
    return (default_inv_freq(theta, dim) / np.float32(s.factor)).astype(np.float32), 1.0


def dynamic_inv_freq(theta: float, dim: int, factor: float, max_positions: int, seq_len) -> np.ndarray:
    """HF `_compute_dynamic_ntk_parameters` for one call's length L = max(seq_len, P):
    NTK-aware base theta * (factor * L / P - (factor - 1))^(d / (d - 2)), then default
    frequencies from it. Each step in float32, as torch does it. [dim / 2] float32"""
    f32 = np.float32
    length = f32(max(int(seq_len), max_positions))
    growth = f32(f32(f32(factor) * length) / f32(max_positions)) - f32(factor - 1)
    base = f32(theta) * _f32_pow(growth, dim / (dim - 2))
    return (f32(1.0) / _f32_pow(base, _exponents(dim))).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(theta: float, dim: int, s: RopeScaling, max_positions: int) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al., 2023): extrapolate high frequencies, interpolate low ones, ramp
    between the dims that rotate beta_fast and beta_slow times over the original context."""
    factor = s.factor
    original = s.original_max_position_embeddings or max_positions
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: prevent a singular ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = (np.float32(1) - ramp.astype(np.float32)).astype(np.float32)
    pos_freqs = _f32_pow(theta, _exponents(dim))
    extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
    interpolation = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_freq = interpolation * (np.float32(1) - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def longrope_inv_freqs(theta: float, dim: int, s: RopeScaling, config: ArceeConfig) -> tuple[np.ndarray, np.ndarray,
                                                                                              int, float]:
    """LongRoPE: (short inv_freq, long inv_freq, switch length, attention factor). HF reads
    `original_max_position_embeddings` from the *top level* of the config (not from
    rope_scaling); when present, factor = max_position_embeddings / original."""
    factor = s.factor
    original = config.original_max_position_embeddings
    if original:
        factor = config.max_position_embeddings / original
    else:
        original = config.max_position_embeddings
    attention_factor = s.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor is None or factor <= 1.0 else \
            math.sqrt(1 + math.log(factor) / math.log(original))
    base_powers = _f32_pow(theta, _exponents(dim))

    def scaled(ext):
        return (np.float32(1.0) / (np.asarray(ext, np.float32) * base_powers)).astype(np.float32)

    return scaled(s.short_factor), scaled(s.long_factor), original, float(attention_factor)


def llama3_inv_freq(theta: float, dim: int, s: RopeScaling) -> tuple[np.ndarray, float]:
    """Llama 3.1: divide low frequencies by factor, keep high ones, blend in between."""
    inv_freq = default_inv_freq(theta, dim)
    factor, low_ff, high_ff = np.float32(s.factor), s.low_freq_factor, s.high_freq_factor
    old_context = s.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context / low_ff, old_context / high_ff
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((np.float32(old_context) / wavelen - np.float32(low_ff)) / np.float32(high_ff - low_ff)).astype(np.float32)
    smoothed = ((np.float32(1) - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32), 1.0


def rope_frequencies(config: ArceeConfig, position_ids: jax.Array) -> tuple[jax.Array, float]:
    """(inv_freq [rotary_dim / 2], attention_scaling) for this call's positions.

    dynamic and longrope depend on the call's length L = max(position_ids) + 1, as HF's
    `dynamic_rope_update` does for a freshly built model (HF caches the grown table
    across calls; refjax is pure, so every call recomputes it from its own positions).
    """
    s, theta, dim = config.rope_scaling, config.rope_theta, config.rotary_dim
    if s.rope_type == "default":
        return jnp.asarray(default_inv_freq(theta, dim)), 1.0
    if s.rope_type == "linear":
        inv_freq, scaling = linear_inv_freq(theta, dim, s)
    elif s.rope_type == "yarn":
        inv_freq, scaling = yarn_inv_freq(theta, dim, s, config.max_position_embeddings)
    elif s.rope_type == "llama3":
        inv_freq, scaling = llama3_inv_freq(theta, dim, s)
    elif s.rope_type == "dynamic":
        # The length is only known at run time (traced under jit); a host callback runs the
        # same numpy float32 chain in eager and jitted calls, so both give HF's exact bits
        # (XLA would otherwise reassociate a traced float32 chain differently under jit).
        seq_len = jnp.max(position_ids) + 1
        grown = jax.pure_callback(
            functools.partial(dynamic_inv_freq, theta, dim, s.factor, config.max_position_embeddings),
            jax.ShapeDtypeStruct((dim // 2,), jnp.float32), seq_len)
        original = jnp.asarray(default_inv_freq(theta, dim))
        return jnp.where(seq_len > config.max_position_embeddings, grown, original), 1.0
    elif s.rope_type == "longrope":
        short, long, switch, scaling = longrope_inv_freqs(theta, dim, s, config)
        seq_len = jnp.max(position_ids) + 1
        return jnp.where(seq_len > switch, jnp.asarray(long), jnp.asarray(short)), scaling
    else:  # the config parser only admits ROPE_TYPES
        raise ValueError(f"unknown rope_type {s.rope_type!r}")
    return jnp.asarray(inv_freq), scaling


def rope_cos_sin(inv_freq: jax.Array, attention_scaling: float, position_ids: jax.Array, dtype) -> tuple[jax.Array,
                                                                                                         jax.Array]:
    """cos, sin [B, T, rotary_dim] in the rotate-half layout ([f, f]), scaled by the
    attention factor; angles in float32 (float64 for float64 models), then cast to dtype."""
    angle_dtype = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
    angles = position_ids.astype(angle_dtype)[..., None] * inv_freq.astype(angle_dtype)  # [B, T, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, d]
    scaling = jnp.asarray(attention_scaling, angle_dtype)
    return (jnp.cos(angles) * scaling).astype(dtype), (jnp.sin(angles) * scaling).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] over the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H] rotated by cos/sin [B, T, H] (rotate-half layout, HF Llama)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin

"""I-BERT integer kernels (ref/quant.py): each against its float function within the
paper's approximation error plus one quantization step, over hypothesis-drawn inputs;
integer values stay in int32; the int8/int32 path equals the fake-quant path on a golden."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import GOLDEN
from ibert_helpers import int_softmax
from refjax.params.checkpoint import load_checkpoint
from refjax.params.io import read_safetensors
from refjax import nn, quant

INT32 = 2 ** 31


def quantized(rng, shape, bits, spread):
    """x = q * s with q integers in [-2^(bits-1), 2^(bits-1)), as a QuantAct leaves it."""
    x = (spread * rng.standard_normal(shape)).astype(np.float32)
    s = quant.symmetric_scale(bits, jnp.asarray([x.min()], jnp.float32), jnp.asarray([x.max()], jnp.float32))
    q = quant.symmetric_quantize(jnp.asarray(x), bits, s)
    return q * s, s, q


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2 ** 31), st.floats(0.5, 6.0))
def test_int_gelu_within_bound(seed, spread):
    """i-GELU vs exact GELU: |err| <= 0.02 * max(1, |x|) (the erf polynomial's error, measured
    max 1.03e-2 relative) plus one output step. Its output integers fit int32 for inputs of
    up to 16 bits (measured 2^27.3); HF feeds it QuantLinear's raw 32-bit accumulator, whose
    products need up to ~2^75 (measured) -- HF's float simulation hides that (docs/design.md)."""
    x, s, q = quantized(np.random.default_rng(seed), (64,), 16, spread)
    y, ys = quant.int_gelu(x, s)
    exact = nn.gelu_erf(x)
    step = float(ys[0]) if np.ndim(ys) else float(ys)
    assert np.all(np.abs(np.asarray(y - exact)) <= 0.02 * np.maximum(1.0, np.abs(np.asarray(x))) + abs(step))
    assert np.all(np.abs(np.asarray(y / ys)) < 2.0 ** 40)  # measured up to 2^32: int64, not int32


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2 ** 31), st.integers(500, 20000), st.integers(2, 16), st.sampled_from([1e-4, 3e-4, 1e-3]))
def test_int_softmax_within_bound(seed, spread, S, scale):
    """i-exp softmax vs softmax on attention-like scores (integer sums of 8-bit products
    times a scale), with the 16-bit QuantAct calibrated on the row maxima: |err| <= 1/256
    (the 8-bit output step) + 5e-3 (i-exp's polynomial and the floors). HF's exp_int is not int32:
    c_int = floor(c / s^2) times 2^30 reaches ~2^55 at s = 3e-4 (measured), so only int64 holds it."""
    rng = np.random.default_rng(seed)
    s = jnp.asarray([scale], jnp.float32)
    x = jnp.asarray(rng.integers(-spread, spread, (1, 3, S)), jnp.float32) * s
    x_int = quant.div(x, s)
    exp_int, _ = quant.int_exp(x_int - x_int.max(-1, keepdims=True), s)
    probs, ps = int_softmax(x, s, jnp.zeros((1,), jnp.float32), exp_int.max().reshape(1))
    assert np.max(np.abs(np.asarray(probs - jax.nn.softmax(x, axis=-1)))) <= 1 / 256 + 5e-3
    ints = np.asarray(quant.div(probs, ps))
    assert np.all(ints >= 0) and np.all(ints <= 256) and float(exp_int.max()) < 2.0 ** 63


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2 ** 31), st.floats(0.1, 4.0), st.sampled_from([8, 16, 64]))
def test_int_layer_norm_within_bound_and_int32(seed, spread, D):
    """Integer LayerNorm (Newton-free sqrt via floor(sqrt), 31-bit factor) vs float LayerNorm:
    |err| <= 1e-2 * |weight| + one step (the overflow shift floors y by 2^shift: measured up to 7.6e-3 at D=8;
    bound 1e-2); with the calibrated shift var_int < 2^32 and the
    output integers fit int32."""
    rng = np.random.default_rng(seed)
    x, s, _ = quantized(rng, (4, D), 22, spread)
    w = jnp.asarray(1.0 + 0.2 * rng.standard_normal(D), jnp.float32)
    b = jnp.asarray(0.2 * rng.standard_normal(D), jnp.float32)
    _, _, shift = quant.int_layer_norm(x, s, w, b, jnp.zeros((1,), jnp.float32), training=True)
    y, ys, _ = quant.int_layer_norm(x, s, w, b, shift)
    mean = x.mean(-1, keepdims=True)
    exact = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True)) * w + b
    assert np.max(np.abs(np.asarray(y - exact))) <= 1e-2 * float(jnp.max(jnp.abs(w))) + float(jnp.max(jnp.abs(ys)))
    x_int = quant.div(x, s)
    y_int = x_int - jnp.round(quant.div(x_int.sum(-1, keepdims=True), float(D)))
    assert float(quant.int_layer_norm_var(y_int, shift).max()) < 2.0 ** 32
    assert np.all(np.abs(np.asarray(y / ys)) < INT32)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2 ** 62))
def test_int_sqrt_is_floor_sqrt(n):
    got = int(quant.int_sqrt(jnp.asarray([n], jnp.int64))[0])
    assert got * got <= n < (got + 1) * (got + 1)


@settings(max_examples=20, deadline=None)
@given(st.integers(-(2 ** 40), 2 ** 40), st.integers(0, 20))
def test_rounding_shift_is_round_half_even(v, e):
    assert int(quant.rounding_shift(jnp.asarray([v], jnp.int64), jnp.asarray([e], jnp.int64))[0]) == round(v / 2 ** e)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pow2_is_ldexp_for_every_exponent(dtype):
    """quant._pow2 (exponent bits) equals 2^k as numpy's ldexp gives it, bit for bit, for every
    k whose power is a normal number, and jit(jnp.ldexp), the kernel it replaced, for every k
    from below the subnormals to beyond overflow (XLA:CPU flushes subnormals to 0 in both)."""
    info = np.finfo(dtype)
    k = np.arange(info.minexp - info.nmant - 40, info.maxexp + 40)  # past both ends
    got = np.asarray(jax.jit(lambda k: quant._pow2(k, dtype))(jnp.asarray(k, dtype)))
    replaced = np.asarray(jax.jit(lambda k: jnp.ldexp(jnp.ones_like(k), k.astype(jnp.int32)))(jnp.asarray(k, dtype)))
    with np.errstate(over="ignore"):
        exact = np.ldexp(np.ones(k.shape, dtype), k)
    normal = (k >= info.minexp) & (k < info.maxexp)
    assert got.dtype == dtype
    assert np.array_equal(got[normal], exact[normal])
    assert np.array_equal(got, replaced)
    assert np.all(got[k >= info.maxexp] == np.inf) and np.all(got[k < info.minexp - info.nmant - 1] == 0)


def test_integer_path_equals_fake_quant_on_golden():
    """The int8 x int8 -> int32 QuantLinear and the int64 dyadic requantizer give exactly the
    integers of HF's float fake-quant QuantLinear + QuantAct (query, key, value of layer 0)."""
    case = os.path.join(GOLDEN, "ibert", "quant-seqcls")
    golden, _ = read_safetensors(os.path.join(case, "golden.safetensors"))
    ck = load_checkpoint(case, dtype=jnp.float32)
    st_ = ck.params.state
    x = jnp.asarray(golden["float32/hidden_states.0"])  # embedding output: 8-bit integers * s
    s = quant.symmetric_scale(8, st_.embeddings["output_activation.x_min"], st_.embeddings["output_activation.x_max"])
    x_int = jnp.round(quant.div(x, s)).astype(jnp.int32)
    assert int(jnp.abs(x_int).max()) <= 128
    layer0 = jax.tree.map(lambda a: a[0], ck.params.ibert.layer.attention_self)
    for name in ("query", "key", "value"):
        p = getattr(layer0, name)
        lo, hi = (st_.layer[f"attention.self.{name}_activation.{b}"][0] for b in ("x_min", "x_max"))
        y, y_scale = quant.quant_linear(p.kernel, p.bias, x, s)
        fake, fake_scale = quant.quant_act(y, 8, lo, hi, pre_scale=y_scale)
        acc, bias_scale = quant.quant_linear_int(p.kernel, p.bias, x_int, s)
        assert acc.dtype == jnp.int64  # int32 accumulation, int64 after the 32-bit bias
        ints = quant.requantize_int(acc, bias_scale, 8, quant.symmetric_scale(8, lo, hi))
        np.testing.assert_array_equal(np.asarray(ints), np.asarray(jnp.round(quant.div(fake, fake_scale))))


def test_rounding_shift_is_exact_for_every_shift():
    """round(v / 2^e) half to even for every e in [-3, 70] (e < 0: v * 2^-e, wrapping as
    int64 shifts do; e >= 64: 0) and int64 v at the edges (0, +-1, odd and even halves,
    +-2^62, the int64 extremes) and at random: exact, against Python's rational rounding."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    edges = [0, 1, -1, 2, -2, 3, -3, 5, -5, 2 ** 62, -(2 ** 62), 2 ** 63 - 1, -(2 ** 63), 2 ** 40 + 2 ** 39,
             -(2 ** 40 + 2 ** 39), 3 * 2 ** 39, -(3 * 2 ** 39)]
    values = np.array(edges + rng.integers(-(2 ** 63), 2 ** 63 - 1, 200, dtype=np.int64).tolist()
                      + rng.integers(-(2 ** 20), 2 ** 20, 200).tolist(), np.int64)
    shifts = np.arange(-3, 71)
    v, e = np.meshgrid(values, shifts, indexing="ij")
    got = np.asarray(quant.rounding_shift(jnp.asarray(v), jnp.asarray(e)))
    for (i, j), out in np.ndenumerate(got):
        x, k = int(v[i, j]), int(e[i, j])
        if k < 0:
            want = ((x << -k) + 2 ** 63) % 2 ** 64 - 2 ** 63  # int64 wrap
        else:
            want = round(Fraction(x, 2 ** k)) if k < 64 else 0
        assert int(out) == want, (x, k)

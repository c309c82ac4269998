"""I-BERT's integer-only kernels (Kim et al., 2021), as HF `models/ibert/quant_modules.py`
computes them.

HF simulates integer arithmetic with float32 tensors ("fake quantization"): a quantized
activation is a float `q * s` with q an integer and s a float32 scaling factor. The
functions here repeat HF's float32 operations in HF's order, so that they produce the
same integers and the same scaling factors bit for bit. Two torch idioms matter:
  * `c / t` with a Python number c is `t.reciprocal() * c` in torch (two roundings), and
    `1.0 / s * x` is `reciprocal(s) * x`, not `x / s`: written out below as `_rdiv`.
  * Python floats meet float32 tensors as float32 (weak types, like JAX's).
`FixedPointMul` (requantization to a new scale) computes in float64 with a 31-bit integer
mantissa (`batch_frexp`): those lines need `jax_enable_x64` (refjax's tests and CLI set it).

The modules (`act` = QuantAct, `linear`, `gelu`, `layer_norm`) put each kernel behind its
module's quant-mode switch, as quant_modules.py's nn.Modules do, with the activation
ranges passed as a value (`Quant`: state in, state out) instead of module buffers.

`integer=True` variants (`*_int`) compute the same integers with jnp.int32 / int8 / int64
arithmetic instead of float tensors: the integer-only inference the paper describes.

Shapes: scaling factors are [1] (per tensor) or [C] (per channel); x [..., C].
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from refjax import nn
from refjax.params.common import LayerNorm, Linear

F32 = jnp.float32


class Act(NamedTuple):
    """An activation with its scaling factor, the pair HF's quantized modules hand each
    other: x = q * s, q integers (x a float tensor here; in ref/ibert_int.py x is q itself,
    an integer tensor). s is [1] (per tensor) or [C] (per channel), None in float mode."""

    x: jax.Array
    s: jax.Array | None = None


def _pow2(k, dtype):
    """2^k for integral k, exactly (torch's `2 ** t` is exact; exp2 need not be): the
    product of two powers of two written into exponent bits (k // 2 and the rest, clipped
    to the normal exponents, so k beyond them still gives inf or 0). Equal to jit(jnp.ldexp)
    for every k (XLA:CPU flushes subnormal results to 0 in both), without its float `pow`,
    which made the I-BERT quant forward ~1.5 s slower to compile (26 calls)."""
    info = jnp.finfo(dtype)
    bits = jnp.int64 if info.bits == 64 else jnp.int32
    k = k.astype(bits)

    def power(j):  # 2^j for minexp <= j <= maxexp - 1: biased exponent j - minexp + 1, zero mantissa
        j = jnp.clip(j, info.minexp, info.maxexp - 1)
        return jax.lax.bitcast_convert_type((j - (info.minexp - 1)) << info.nmant, dtype)

    half = k // 2
    return power(half) * power(k - half)


def div(a, b):
    """a / b correctly rounded, as torch divides. XLA:CPU's float32 division is not (it
    differs from IEEE division in the last bit for ~5-40% of inputs, measured), so float32
    quotients are taken in float64 and rounded once to float32, which gives the correctly
    rounded float32 quotient (53 >= 2 * 24 + 2 bits). Python numbers take the other's dtype."""
    if not hasattr(a, "dtype"):
        a = jnp.asarray(a, b.dtype)
    if not hasattr(b, "dtype"):
        b = jnp.asarray(b, a.dtype)
    if a.dtype == jnp.float32 and b.dtype == jnp.float32:
        return (a.astype(jnp.float64) / b.astype(jnp.float64)).astype(jnp.float32)
    return a / b


def fence(x):
    """x, materialized as float32 before any use: XLA:CPU contracts a * b + c into one
    fused multiply-add (one rounding instead of torch's two; measured on ~23% of random
    inputs, and no flag turns it off). A select between the product and the add stops the
    contraction; its condition is true for every value (NaN maps to NaN)."""
    return jnp.where(x == x, x, jnp.asarray(jnp.nan, x.dtype))


def _rdiv(c, t):
    """torch's `c / t` for a Python number c: `t.reciprocal() * c` (two roundings)."""
    return div(1.0, t) * jnp.asarray(c, t.dtype)


def _floor_divide(a, b):
    """torch.floor_divide for floats (c10 `div_floor_floating`): fmod, exact quotient of
    a - fmod, floor, corrected by one when the quotient sits above floor + 1/2."""
    f64 = jnp.float64
    mod = jnp.fmod(a.astype(f64), b.astype(f64)).astype(a.dtype)  # exact
    quot = div((a.astype(f64) - mod.astype(f64)).astype(a.dtype), b)
    quot = jnp.where((mod != 0) & ((b < 0) != (mod < 0)), quot - 1, quot)
    floordiv = jnp.floor(quot)
    floordiv = jnp.where(quot - floordiv > 0.5, floordiv + 1, floordiv)
    return jnp.where(quot != 0, floordiv, jnp.copysign(jnp.zeros_like(quot), div(a, b)))


# --------------------------------------------------------------------------------------
# Scaling factors and symmetric quantization (quant_modules.py helpers)
# --------------------------------------------------------------------------------------


def symmetric_scale(num_bits: int, x_min, x_max):
    """`symmetric_linear_quantization_params`: max(|x_min|, |x_max|) clamped at 1e-8,
    divided by 2^(bits-1) - 1. Elementwise, so per-channel and per-tensor alike."""
    n = 2 ** (num_bits - 1) - 1
    scale = jnp.maximum(jnp.abs(x_min), jnp.abs(x_max))
    return div(jnp.maximum(scale, jnp.asarray(1e-8, scale.dtype)), jnp.asarray(n, scale.dtype))


def symmetric_quantize(x, num_bits: int, scale):
    """`SymmetricQuantFunction`: clamp(round(reciprocal(scale) * x), -n, n - 1), n = 2^(bits-1) - 1
    (HF's clamp leaves out +n: a weight at the top of the range becomes n - 1).
    scale broadcasts against x's leading axis for 2-d x (per output channel), else the last."""
    n = 2 ** (num_bits - 1) - 1
    if x.ndim == 2:
        scale = scale.reshape(-1, 1)
    q = jnp.round(_rdiv(1.0, scale) * x + jnp.asarray(0.0, x.dtype))
    return jnp.clip(q, -n, n - 1)


def weight_scale(w, num_bits: int, per_channel: bool):
    """Scaling factor of a weight [out, in] (HF layout): per output row or per tensor."""
    if per_channel:
        return symmetric_scale(num_bits, w.min(axis=1), w.max(axis=1))
    return symmetric_scale(num_bits, w.min().reshape(1), w.max().reshape(1))


# --------------------------------------------------------------------------------------
# FixedPointMul: requantize to a new scale with an integer multiplier and a shift
# --------------------------------------------------------------------------------------


def frexp_multiplier(scale_ratio, max_bit: int = 31):
    """`batch_frexp`: ratio = m * 2^-e with m a (max_bit)-bit integer, rounded half up.
    ratio float64 -> (m, e) float64 (both integral)."""
    mant, exp = jnp.frexp(scale_ratio)
    m = jnp.floor(mant * (2.0 ** max_bit) + 0.5)  # exact: mant * 2^31 has <= 53 significant bits
    return m, float(max_bit) - exp.astype(scale_ratio.dtype)


def fixed_point_mul(pre_act, pre_scale, num_bits: int, z_scale, identity=None, identity_scale=None):
    """`FixedPointMul.forward`: the integers of pre_act (+ identity) at scale z_scale.

    z = round(pre_act / pre_scale); out = round(z * m / 2^e) with m 2^-e = pre_scale / z_scale
    in float64; the identity branch likewise; clamp to [-2^(bits-1), 2^(bits-1) - 1]."""
    n = 2 ** (num_bits - 1) - 1
    f64 = jnp.float64
    z_f32 = z_scale.astype(F32).astype(f64)

    def branch(x, s):
        s = s if s.ndim == 3 else s.reshape(1, 1, -1)
        z_int = jnp.round(div(x, s))
        m, e = frexp_multiplier(s.astype(f64) / z_f32)
        return jnp.round(z_int.astype(f64) * m / _pow2(e, f64))

    out = branch(pre_act, pre_scale)
    if identity is not None:
        out = branch(identity, identity_scale) + out
    return jnp.clip(out.astype(F32), -n - 1, n).astype(pre_act.dtype)


# --------------------------------------------------------------------------------------
# QuantAct: activation ranges (state) and requantization
# --------------------------------------------------------------------------------------


def update_range(x_min, x_max, x_act, momentum: float = 0.95):
    """QuantAct's train-mode range update: the first batch sets the range (added to the
    initial +-1e-5), later batches move it by an exponential moving average."""
    b_min, b_max = x_act.min(), x_act.max()
    first = (x_min.min() > -1.1e-5) & (x_max.max() < 1.1e-5)
    mom = jnp.asarray(momentum, x_min.dtype)
    rest = jnp.asarray(1 - momentum, x_min.dtype)
    new_min = jnp.where(first, x_min + b_min, fence(x_min * mom) + fence(b_min * rest))
    new_max = jnp.where(first, x_max + b_max, fence(x_max * mom) + fence(b_max * rest))
    return new_min, new_max


def quant_act(x, num_bits: int, x_min, x_max, pre_scale=None, identity=None, identity_scale=None):
    """`QuantAct.forward` in quant mode (eval): -> (q * s, s) with s [1] from the range.

    Without pre_scale, x itself is quantized (HF then drops `identity` from the output,
    though the range saw identity + x)."""
    scale = symmetric_scale(num_bits, x_min, x_max)
    if pre_scale is None:
        q = symmetric_quantize(x, num_bits, scale)
    else:
        q = fixed_point_mul(x, pre_scale, num_bits, scale, identity, identity_scale)
    return q * scale.reshape(-1), scale


# --------------------------------------------------------------------------------------
# QuantEmbedding and QuantLinear
# --------------------------------------------------------------------------------------


def embedding_table_int(table, weight_bit: int = 8):
    """QuantEmbedding's integers: the table quantized per tensor -> (w_int (float), scale [1])."""
    scale = weight_scale(table, weight_bit, per_channel=False)
    return symmetric_quantize(table, weight_bit, scale), scale


def quant_embedding(table, ids, weight_bit: int = 8):
    """`QuantEmbedding` in quant mode: per-tensor 8-bit table, rows looked up, -> (q * s, s)."""
    w_int, scale = embedding_table_int(table, weight_bit)
    return jnp.take(w_int, ids, axis=0) * scale, scale


def quant_linear_weights(kernel, bias, prev_scale, weight_bit: int = 8, bias_bit: int = 32):
    """QuantLinear's integers: per-output-channel 8-bit weights, 32-bit bias at scale
    fc_scale * prev_scale. kernel [in, out] (ours) -> (w_int [out, in], b_int [out],
    bias_scale [out])."""
    w = kernel.T  # HF layout [out, in]
    fc_scale = weight_scale(w, weight_bit, per_channel=True)
    w_int = symmetric_quantize(w, weight_bit, fc_scale)
    bias_scale = fc_scale * prev_scale
    b_int = symmetric_quantize(bias, bias_bit, bias_scale)
    return w_int, b_int, bias_scale


def quant_linear(kernel, bias, x, prev_scale):
    """`QuantLinear.forward` in quant mode: (x / s_in) @ w_int^T + b_int, times s_w * s_in."""
    w_int, b_int, bias_scale = quant_linear_weights(kernel, bias, prev_scale)
    x_int = div(x, prev_scale.reshape(1, -1))
    # torch's F.linear: fused multiply-adds over `in` in order, then + bias (measured); x_int
    # is not always an integer (HF passes layers > 0 the embedding's scale), so order matters
    y = sequential_dot(x_int, w_int) + b_int
    return y * bias_scale, bias_scale


def sequential_dot(a, b, fused: bool = True):
    """a [..., T, H] . b [..., S, H] -> [..., T, S] in float32, accumulated over H in order
    with one rounding per step (fused multiply-add), which is what torch's CPU sgemm does
    for q k^T and F.linear at these sizes (measured; XLA's dot sums in another order).
    The product is exact in float64; acc + product is rounded to float64 then float32 (a
    double rounding that differs from a true FMA with probability ~2^-29).
    `fused=False`: product rounded to float32 first (torch's probs @ v, measured).

    Needed for I-BERT: IntSoftmax floors scores / scale without rounding them to integers
    first, and calibration reads raw min/max, so the last bit of every sum matters."""
    f64 = jnp.float64
    a64 = jnp.moveaxis(a.astype(f64), -1, 0)[..., :, None]  # [H, ..., T, 1]
    b64 = jnp.moveaxis(b.astype(f64), -1, 0)[..., None, :]  # [H, ..., 1, S]

    def step(acc, ab):
        product = ab[0] * ab[1]  # exact in float64
        if not fused:
            product = product.astype(a.dtype).astype(f64)
        return (acc.astype(f64) + product).astype(a.dtype), None

    acc0 = jnp.zeros(a.shape[:-1] + (b.shape[-2],), a.dtype)
    return jax.lax.scan(step, acc0, (a64, b64))[0]


# --------------------------------------------------------------------------------------
# Integer-only nonlinearities: i-GELU, i-exp softmax, integer LayerNorm
# --------------------------------------------------------------------------------------

GELU_K = 1.4142
GELU_CONST = 14
GELU_COEFF = (-0.2888, -1.769, 1.0 / -0.2888)  # a (x + b)^2 + c, c = 1 / a (HF divides)


def int_gelu(x, scale):
    """`IntGELU` (i-GELU, paper Alg. 2): x * (1 + erf(x / sqrt 2)) / 2 with erf from a
    second-order polynomial on the integers. x = q * scale -> (out, out_scale)."""
    x_int = div(x, scale)
    s = div(scale, jnp.asarray(GELU_K, scale.dtype))
    a, b, c = GELU_COEFF
    b_int = jnp.floor(_rdiv(b, s))
    c_int = jnp.floor(_rdiv(c, s * s))
    sign = jnp.sign(x_int)
    abs_int = jnp.minimum(jnp.abs(x_int), -b_int)
    y_int = sign * (fence(jnp.square(abs_int + b_int)) + c_int)
    erf_scale = s * s * jnp.asarray(a, s.dtype)
    y_int = jnp.floor(div(y_int, 2.0 ** GELU_CONST))  # avoid overflow
    erf_scale = erf_scale * 2.0 ** GELU_CONST
    shift_int = _floor_divide(jnp.ones_like(erf_scale), erf_scale)
    x_int = x_int * (y_int + shift_int)
    out_scale = div(scale * erf_scale, 2.0)
    return x_int * out_scale, out_scale


SOFTMAX_X0 = -0.6931  # -ln 2
SOFTMAX_CONST = 30
SOFTMAX_COEF = (0.35815147, 0.96963238 / 0.35815147, 1.0 / 0.35815147)  # a x^2 + b x + c, b, c divided by a


def int_exp(x_int, scale):
    """`IntSoftmax.int_exp` (i-exp, paper Alg. 3): exp(x) = 2^-q exp(r), r in (-ln 2, 0],
    exp(r) by a second-order polynomial. x_int <= 0 -> (exp_int, exp_scale)."""
    x0_int = jnp.floor(_rdiv(SOFTMAX_X0, scale))
    x_int = jnp.maximum(x_int, SOFTMAX_CONST * x0_int)
    q = jnp.floor(div(x_int, x0_int))
    r = x_int - fence(x0_int * q)
    a, b, c = SOFTMAX_COEF
    b_int = jnp.floor(_rdiv(b, scale))
    c_int = jnp.floor(_rdiv(c, scale * scale))
    z = fence((r + b_int) * r) + c_int
    poly_scale = jnp.asarray(a, scale.dtype) * (scale * scale)
    exp_int = jnp.maximum(jnp.floor(z * _pow2(SOFTMAX_CONST - q, z.dtype)), 0.0)
    return exp_int, div(poly_scale, 2.0 ** SOFTMAX_CONST)


def int_softmax_exp(x, scale):
    """`IntSoftmax.forward` up to its 16-bit QuantAct: x [..., S] (masked scores) at scale
    [1] -> (exp_int, exp_scale), i-exp of x_int - max. HF then hands exp_int (not
    exp_int * exp_scale) with exp_scale to that QuantAct; `int_softmax_normalize` follows."""
    x_int = div(x, scale)
    x_int = x_int - x_int.max(axis=-1, keepdims=True)
    return int_exp(x_int, scale)


def int_softmax_normalize(exp, exp_scale, output_bit: int = 8, max_bit: int = 32):
    """`IntSoftmax.forward` after its QuantAct: the requantized exps (exp [..., S] = integers
    * exp_scale) over their sum with a `max_bit` fixed-point reciprocal, floored to
    `output_bit` bits -> (probs q * 2^-output_bit, scale [1])."""
    exp_int = div(exp, exp_scale)
    exp_sum = exp_int.sum(axis=-1, keepdims=True)
    factor = jnp.floor(_rdiv(2 ** max_bit, exp_sum))
    exp_int = jnp.floor(div(exp_int * factor, 2.0 ** (max_bit - output_bit)))
    out_scale = 1.0 / 2 ** output_bit
    return exp_int * jnp.asarray(out_scale, exp.dtype), jnp.full((1,), out_scale, exp_scale.dtype)


def int_layer_norm_var(y_int, shift):
    """sum((floor(y / 2^shift))^2) over the last axis."""
    shifted = jnp.floor(div(y_int, _pow2(shift, y_int.dtype)))
    return fence(jnp.square(shifted)).sum(axis=-1, keepdims=True)


def layer_norm_shift(y_int, shift, max_bit: int = 32):
    """`IntLayerNorm.set_shift` (the train-mode overflow fallback): the smallest shift with
    sum(y^2) / 4^shift < 2^max_bit over the batch, never below the current one."""
    var_int = fence(jnp.square(y_int)).sum(axis=-1, keepdims=True)
    ratio = jnp.sqrt(div(var_int, 2.0 ** max_bit))
    new = jnp.ceil(jnp.log2(ratio.astype(jnp.float64)).astype(ratio.dtype)).max()  # XLA's f32 log2 is inexact
    return jnp.maximum(shift, new)


def int_layer_norm(x, scale, weight, bias, shift, training: bool = False, max_bit: int = 32):
    """`IntLayerNorm.forward` in quant mode: integer mean and variance, integer sqrt,
    normalize with a 31-bit fixed-point factor; weight folded into the output scale.
    x [..., D] = q * scale; shift [1]. -> (out, out_scale [D], shift)."""
    D = x.shape[-1]
    dim_sqrt = jnp.sqrt(jnp.asarray(D, F32)).astype(x.dtype)
    x_int = div(x, scale)
    mean_int = jnp.round(div(x_int.sum(axis=-1, keepdims=True), float(D)))
    y_int = x_int - mean_int
    var_int = int_layer_norm_var(y_int, shift)
    if training:  # HF: overflow detected -> raise the shift (kept in the state) and recompute
        overflow = var_int.max() >= 2.0 ** max_bit
        new_shift = jnp.where(overflow, layer_norm_shift(y_int, shift, max_bit), shift)
        var_int = jnp.where(overflow, int_layer_norm_var(y_int, new_shift), var_int)
        shift = new_shift
    std_int = jnp.floor(jnp.sqrt(var_int)) * _pow2(shift, var_int.dtype)
    factor = jnp.floor(_rdiv(2 ** 31, std_int))
    y_int = jnp.floor(div(y_int * factor, 2.0))
    out_scale = div(dim_sqrt, 2.0 ** 30)
    bias_int = jnp.floor(div(div(bias, weight), out_scale))
    y_int = y_int + bias_int
    out_scale = out_scale * weight
    return y_int * out_scale, out_scale, shift


# --------------------------------------------------------------------------------------
# The modules (quant_modules.py's nn.Modules): each kernel above behind its module's
# quant-mode switch, float path included, with the range state passed as a value
# --------------------------------------------------------------------------------------


class Quant(NamedTuple):
    """What the modules of one group (I-BERT's embeddings, or one layer) share in one call:
    the config (which modules run quantized), their state ("<QuantAct>.x_min" / ".x_max",
    "<IntLayerNorm>.shift" -> [1] arrays) and `training` (calibration, HF's train mode).
    A module that may move the state takes a `Quant` and returns the next one."""

    config: Any  # IBertConfig: quant_mode, quantized(module), layer_norm_eps
    state: dict
    training: bool = False

    def set(self, **entries) -> Quant:
        return self._replace(state={**self.state, **entries})


def act(q: Quant, name: str, bits: int, a: Act, identity: Act | None = None) -> tuple[Quant, Act]:
    """`QuantAct.forward` of the module `name`: in training, first move its range to cover
    identity + x; then, in quant mode, requantize to `bits` with that range (float mode:
    identity + x as it is)."""
    lo, hi = q.state[f"{name}.x_min"], q.state[f"{name}.x_max"]
    total = a.x if identity is None else fence(identity.x) + fence(a.x)
    if q.training:
        lo, hi = update_range(lo, hi, total)
        q = q.set(**{f"{name}.x_min": lo, f"{name}.x_max": hi})
    if not q.config.quant_mode:
        return q, Act(total)
    ident, ident_s = (None, None) if identity is None else identity
    return q, Act(*quant_act(a.x, bits, lo, hi, a.s, ident, ident_s))


def linear(p: Linear, q: Quant, a: Act) -> Act:
    """`QuantLinear.forward`: nn.Linear in float mode. [..., in] -> [..., out]."""
    if not q.config.quant_mode:
        return Act(nn.linear(p, a.x))
    return Act(*quant_linear(p.kernel, p.bias, a.x, a.s))


def gelu(q: Quant, a: Act) -> Act:
    """`IntGELU.forward`: i-GELU, or exact GELU (nn.GELU) where not quantized."""
    if q.config.quantized("gelu"):
        return Act(*int_gelu(a.x, a.s))
    return Act(nn.gelu_erf(a.x))


def layer_norm(p: LayerNorm, q: Quant, name: str, a: Act) -> tuple[Quant, Act]:
    """`IntLayerNorm.forward` (in training it may raise its shift); where not quantized,
    y / sqrt(eps + var) * weight + bias."""
    if q.config.quantized("layernorm"):
        x, s, shift = int_layer_norm(a.x, a.s, p.scale, p.bias, q.state[f"{name}.shift"], training=q.training)
        return q.set(**{f"{name}.shift": shift}), Act(x, s)
    y = a.x - a.x.mean(axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(y), axis=-1, keepdims=True)
    y = y / jnp.sqrt(jnp.asarray(q.config.layer_norm_eps, y.dtype) + var)
    return q, Act(y * p.scale + p.bias)


# --------------------------------------------------------------------------------------
# Integer-only variants: the same integers computed with int8 / int32 / int64 arithmetic
# --------------------------------------------------------------------------------------


def int_matmul(subscripts: str, a, b):
    """An integer einsum: int32 operands (holding 8/9-bit values), int32 accumulation.
    Not int8 operands: XLA:GPU (jax 0.11.2, H200) computed an int8 x int8 -> int32 dot of
    the goldens wrongly (one QuantLinear, every element; measured), int32 operands gave the
    right integers there and on CPU."""
    return jnp.einsum(subscripts, a.astype(jnp.int32), b.astype(jnp.int32), preferred_element_type=jnp.int32)


def quant_linear_int(kernel, bias, x_int, prev_scale):
    """QuantLinear on integers: x_int [..., in] (8-bit values) times the 8-bit weights,
    int32 accumulation, plus the 32-bit bias in int64 (the sum can pass 2^31 where the bias
    is near its clamp) -> (acc + bias int64 [..., out], bias_scale)."""
    w_int, b_int, bias_scale = quant_linear_weights(kernel, bias, prev_scale)
    w8 = w_int.astype(jnp.int8)  # the weights as an integer accelerator stores them
    acc = int_matmul("...i,oi->...o", x_int, w8)
    return acc.astype(jnp.int64) + b_int.astype(jnp.int64), bias_scale


def requantize_int(z_int, pre_scale, num_bits: int, z_scale, identity_int=None, identity_scale=None):
    """FixedPointMul on integers: round(z * m / 2^e) as a dyadic multiplier m 2^-e =
    pre_scale / z_scale (a hardware integer requantizer), in int64. HF forms z * m in
    float64, so products above 2^53 are rounded to 53 significant bits first (`round_f64`);
    then a round-half-to-even shift, as torch.round. z_int [..., C], scales [1] or [C]."""
    n = 2 ** (num_bits - 1) - 1
    z_f32 = z_scale.astype(F32).astype(jnp.float64)

    def branch(z, s):
        s = s.reshape(-1)
        m, e = _frexp_int(s.astype(jnp.float64) / z_f32)  # m in [2^30, 2^31]
        # z beyond 32 bits (i-GELU's int64 output, float32-rounded: <= 24 significant bits)
        # drops trailing zeros so that z m < 2^63; a net left shift saturates (z m >= 2^30)
        z = z.astype(I64)
        drop = jnp.maximum(_bits(jnp.abs(z)) - 32, 0)
        shift = e - drop
        out = rounding_shift(round_f64((z >> drop) * m), jnp.maximum(shift, 0))
        return jnp.where(shift < 0, jnp.sign(z) << 40, out)

    out = branch(z_int, pre_scale)
    if identity_int is not None:
        out = branch(identity_int, identity_scale) + out
    return jnp.clip(out, -n - 1, n).astype(jnp.int32)


def rounding_shift(v, e):
    """round(v / 2^e), ties to even (torch.round), for int64 v; e < 0 shifts left. Shifts of
    64 and more give 0 (|v| / 2^64 < 1/2); XLA's shifts by >= 64 bits would not."""
    e = jnp.broadcast_to(e, v.shape)
    left = v << jnp.clip(-e, 0, 63)
    big = e > 63
    e = jnp.clip(e, 0, 63)
    floor = v >> e
    low = (jnp.int64(1) << e) - 1  # 2^e - 1 (e = 63: wraps to 2^63 - 1)
    rem = v & low  # in [0, 2^e)
    # round up past half, or at half when floor is odd: rem > 2^(e-1) - odd (no up for e = 0);
    # (low >> 1) + 1 is 2^(e-1) for e > 0 and 1 for e = 0, and never overflows
    up = rem > (low >> 1) + 1 - (floor & 1)
    shifted = jnp.where(e > 0, floor + up.astype(jnp.int64), left)
    return jnp.where(big, jnp.zeros_like(v), shifted)


def int_sqrt(n):
    """floor(sqrt(n)) of non-negative int64 by Newton's iteration (paper Alg. 4)."""
    n = n.astype(jnp.int64)
    x = jnp.where(n > 0, jnp.int64(1) << ((64 - jax.lax.clz(jnp.maximum(n, 1))) // 2 + 1), 0)

    def body(_, x):
        y = jnp.where(x > 0, (x + n // jnp.maximum(x, 1)) // 2, 0)
        return jnp.minimum(x, y)

    return jax.lax.fori_loop(0, 40, body, x)


# --------------------------------------------------------------------------------------
# Integer-only i-GELU, i-exp / softmax and LayerNorm (beyond HF)
#
# Each `*_int` kernel below takes the integers q of an activation (x = q * scale) and
# returns the integers the fake-quant kernel above leaves in its float32 tensors, in int64
# (values and ranges in docs/design.md). Everything that depends only on the scale or the
# weights (b_int, c_int, x0_int, shift_int, requantization multipliers, bias_int) is a
# constant an integer accelerator gets offline: it is computed by the float code above, so
# it is HF's constant bit for bit. Everything that touches activations is integer
# arithmetic. Where HF's float32 tensors round an integer above 2^24, the kernels round
# too, with `round_f32` (an integer rounding to 24 significant bits, ties to even): that
# is what makes them equal to HF's, not approximately equal.
# --------------------------------------------------------------------------------------

I64 = jnp.int64


def _bits(a):
    """Bit length of non-negative int64 a (0 for 0)."""
    return 64 - jax.lax.clz(a)


def round_sig(a, bits: int):
    """Non-negative int64 a rounded to `bits` significant bits, ties to even (integer ops)."""
    sh = jnp.maximum(_bits(a) - bits, 0)
    return rounding_shift(a, sh) << sh


def round_f32(v):
    """The float32 nearest to int64 v, as an int64 (torch rounding an integer-valued float32
    result): sign-magnitude round to 24 significant bits, ties to even. |v| < 2^62."""
    return jnp.sign(v) * round_sig(jnp.abs(v), 24)


def round_f64(v):
    """The float64 nearest to int64 v, as an int64: v rounded to 53 significant bits."""
    return jnp.sign(v) * round_sig(jnp.abs(v), 53)


def _f32_quotient(a, b, bits: int = 24):
    """a / b (a >= 0, b > 0, int64) correctly rounded to `bits` significant bits -> (R, k)
    with the rounded quotient = R * 2^-k exactly. The floor quotient carries >= 26 bits and
    a sticky bit for the remainder, so one rounding of it is the correct rounding."""
    j = jnp.maximum(61 - _bits(a), 0)  # a << j < 2^62
    num = a << j
    t = num // b
    t2 = 2 * t + (num - t * b != 0).astype(I64)  # value * 2^(j+1), low bit sticky
    return round_sig(t2, bits), j + 1


def _floor_f32_quotient(a, b):
    """floor(float32(a / b)) for int64 a >= 0, b > 0 (torch's floor(c / t) on integers)."""
    r, k = _f32_quotient(a, b)
    return r >> k


def _const_int(x):
    """A float32 constant that holds an integer (HF's b_int, c_int, ...) as int64."""
    return jnp.asarray(x).astype(I64)


def int_gelu_int(q, scale):
    """i-GELU on integers (`IntGELU.forward`): q [..., C] int32/int64, the integers of the
    QuantLinear output at scale [C] or [1] -> (out int64, out_scale), out = HF's x_int *
    (erf_int + shift_int). Constants b_int, c_int, shift_int from the scale as HF computes
    them; (|q| + b)^2 + c in int64 with HF's float32 roundings."""
    s = div(scale, jnp.asarray(GELU_K, scale.dtype))
    a, b, c = GELU_COEFF
    b_int = _const_int(jnp.floor(_rdiv(b, s)))
    c_int = _const_int(jnp.floor(_rdiv(c, s * s)))
    erf_scale = s * s * jnp.asarray(a, s.dtype) * 2.0 ** GELU_CONST
    shift_int = _const_int(_floor_divide(jnp.ones_like(erf_scale), erf_scale))
    q = q.astype(I64)
    sign = jnp.sign(q)
    t = round_f32(jnp.minimum(jnp.abs(q), -b_int) + b_int)  # in [b_int, 0]
    y = sign * round_f32(round_f32(t * t) + c_int)
    y = y >> GELU_CONST  # floor(y / 2^14): arithmetic shift floors negatives too
    out = round_f32(q * round_f32(y + shift_int))
    return out, div(scale * erf_scale, 2.0)


def int_exp_parts(x_int, scale):
    """i-exp on integers (`IntSoftmax.int_exp`) as a pair: x_int <= 0 int32/int64 ->
    (z, t, exp_scale) with HF's exp_int = z * 2^t, z >= 0 and t = 30 - q in [0, 30].
    q = floor(float32(x / x0)) from the correctly rounded quotient (HF's floor of its
    float32 division); the polynomial (r + b) r + c in int64 with HF's float32 roundings.
    Intermediates reach ~2.8 / scale^2, so int64 holds them for scale >= 2^-30."""
    x0_int = _const_int(jnp.floor(_rdiv(SOFTMAX_X0, scale)))  # < 0
    a, b, c = SOFTMAX_COEF
    b_int = _const_int(jnp.floor(_rdiv(b, scale)))
    c_int = _const_int(jnp.floor(_rdiv(c, scale * scale)))
    x = jnp.maximum(x_int.astype(I64), round_f32(SOFTMAX_CONST * x0_int))
    q = _floor_f32_quotient(-x, -x0_int)  # both >= 0 (x0 < 0): q in [0, 30]
    r = round_f32(x - round_f32(x0_int * q))  # in (x0_int, 0]
    z = round_f32(round_f32(round_f32(r + b_int) * r) + c_int)
    poly_scale = jnp.asarray(a, scale.dtype) * (scale * scale)
    return jnp.maximum(z, 0), SOFTMAX_CONST - q, div(poly_scale, 2.0 ** SOFTMAX_CONST)


def int_exp_int(x_int, scale):
    """i-exp on integers, exp_int materialized: (z << t, exp_scale) from `int_exp_parts`.
    exp_int reaches ~2.8 / scale^2 * 2^30, so this needs scale >= 2^-15 (int64); the
    softmax keeps the pair instead."""
    z, t, exp_scale = int_exp_parts(x_int, scale)
    return z << t, exp_scale


def _frexp_int(ratio):
    """frexp_multiplier as int64 (m, e): ratio = m * 2^-e, m a 31-bit integer."""
    m, e = frexp_multiplier(ratio)
    return m.astype(I64), e.astype(I64)


def softmax_requantize_int(exp_int, exp_scale, z_scale, num_bits: int = 16, exp_shift=0):
    """IntSoftmax's 16-bit QuantAct on integers. HF hands it exp_int as the *value* with
    exp_scale as its scale, so FixedPointMul computes round(round(exp_int / exp_scale) * m
    / 2^e), m 2^-e = exp_scale / z_scale, with exp_int / exp_scale a float32 (~2^110) and
    the product a float64: reproduced with a 24-bit integer quotient (mantissa Z, exponent
    k), the 55-bit product Z m rounded to 53 bits, and a round-half-even shift.
    The value is exp_int * 2^exp_shift (i-exp's pair from `int_exp_parts`)."""
    n = 2 ** (num_bits - 1) - 1
    exp_scale = exp_scale.reshape(-1)
    mant, ex = jnp.frexp(exp_scale.astype(jnp.float64))  # exp_scale = M 2^E, M a 24-bit integer
    M = jnp.floor(mant * 2.0 ** 24).astype(I64)
    E = ex.astype(I64) - 24
    m, e = _frexp_int(exp_scale.astype(jnp.float64) / z_scale.astype(F32).astype(jnp.float64))
    a = exp_int.astype(I64)
    R, j = _f32_quotient(a, M)  # a / M = R 2^-j (float32-rounded)
    sh = jnp.maximum(_bits(R) - 24, 0)
    Z, k = R >> sh, sh - j - E + exp_shift  # exact: R has <= 24 significant bits; value / exp_scale = Z 2^k
    inf = (Z > 0) & (_bits(Z) + k > 128)  # HF's float32 quotient overflows (tiny scales): inf -> n
    Z = jnp.where(k < 0, rounding_shift(Z, -k), Z)  # torch.round of a small quotient
    k = jnp.maximum(k, 0)
    out = rounding_shift(round_f64(Z * m), jnp.maximum(e - k, 0))
    out = jnp.where(((e < k) & (Z > 0)) | inf, n, out)  # a left shift: >= 2^53, saturates (no wraparound)
    return jnp.clip(out, -n - 1, n)


def int_softmax_int(x_int, scale, act_min, act_max, output_bit: int = 8, max_bit: int = 32):
    """IntSoftmax on integers: x_int [..., S] int32/int64 scores (masked keys: any value
    <= max - 30 |x0_int|, e.g. jnp.iinfo(int32).min / 2, which the clamp maps to HF's) ->
    (probs int64 in [0, 2^output_bit], scale). act_min/act_max: the 16-bit QuantAct range."""
    x = x_int.astype(I64)
    x = round_f32(x - x.max(axis=-1, keepdims=True))
    z, t, exp_scale = int_exp_parts(x, scale)
    z_scale = symmetric_scale(16, act_min, act_max)
    e16 = softmax_requantize_int(z, exp_scale, z_scale, exp_shift=t)
    total = e16.sum(axis=-1, keepdims=True)  # exact in int64 (HF's float32 sum: exact below 2^24)
    R, k = _f32_quotient(jnp.broadcast_to(jnp.asarray(1, I64), total.shape), total)  # float32(1 / sum)
    factor = R >> (k - max_bit)  # floor(float32(1 / sum) * 2^32): HF's reciprocal, then * 2^32 (k = 61)
    out = round_f32(e16 * factor) >> (max_bit - output_bit)
    return out, jnp.full((1,), 1.0 / 2 ** output_bit, scale.dtype)


def _floor_f32_sqrt(v):
    """floor(float32(sqrt(v))) for int64 v >= 0 (torch: sqrt of a float32, then floor):
    the square root to ~31 bits by int_sqrt of v 4^j, a sticky bit, one rounding to 24 bits."""
    j = jnp.maximum((62 - _bits(v)) // 2, 0)
    w = v << (2 * j)
    s = int_sqrt(w)
    t2 = 2 * s + (s * s != w).astype(I64)  # sqrt(v) 2^(j+1), low bit sticky
    return round_sig(t2, 24) >> (j + 1)


def int_layer_norm_int(q, scale, weight, bias, shift):
    """IntLayerNorm (eval) on integers: q [..., D] int32/int64 (22-bit QuantAct output at
    scale [1]), shift [1] (the calibrated state) -> (out int64, out_scale [D]).

    mean = round(float32(sum / D)) with the correctly rounded quotient; y = q - mean;
    var = sum of float32-rounded (y >> shift)^2; std = floor(float32(sqrt(var))) << shift;
    factor = floor(float32(2^31 / std)); out = floor(float32(y factor) / 2) + bias_int, with
    HF's float32 roundings. The sums are exact int64 sums: equal to HF's float32 sums
    while those are exact (partial sums below 2^24); above that HF's sum depends on
    torch's order and the kernel keeps the exact one."""
    D = q.shape[-1]
    q = q.astype(I64)
    total = q.sum(axis=-1, keepdims=True)
    R, k = _f32_quotient(jnp.abs(total), jnp.asarray(D, I64))
    mean = jnp.sign(total) * rounding_shift(R, k)  # torch.round: half to even, symmetric
    y = round_f32(q - mean)
    shift_i = shift.astype(I64)
    ys = y >> shift_i  # floor(y / 2^shift)
    var = round_f32(round_f32(ys * ys).sum(axis=-1, keepdims=True))
    std = _floor_f32_sqrt(var) << shift_i
    factor = _floor_f32_quotient(jnp.broadcast_to(jnp.asarray(2 ** 31, I64), std.shape), std)
    out = round_f32(y * factor) >> 1
    dim_sqrt = jnp.sqrt(jnp.asarray(D, F32)).astype(scale.dtype)
    out_scale = div(dim_sqrt, 2.0 ** 30)
    bias_int = _const_int(jnp.floor(div(div(bias, weight), out_scale)))
    return round_f32(out + bias_int), out_scale * weight


__all__ = [name for name in dir() if not name.startswith("_") and name not in ("jax", "jnp", "annotations", "Any", "NamedTuple", "nn", "LayerNorm", "Linear")]

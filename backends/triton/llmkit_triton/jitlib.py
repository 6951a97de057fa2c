"""Device functions shared by the kernels: rounding to a storage dtype, a precise tanh, the MLP
activations and their derivatives, and the dot-product rule of `runtime.upcast_dots`.

Activation codes (constexpr): 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu — mlp@1's names.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
"""mlp@1's activation names -> the constexpr code the kernels take."""


@triton.jit
def tanh(x):
    """tanh in float32 without libdevice (which the interpreter lacks), accurate to a few ulps.

    |x| < 0.4: the odd Taylor series to x^13 (the next term is below 2^-28 relative there);
    otherwise (1 - e) / (1 + e), e = exp(-2|x|) <= 0.45, with the sign restored: free of
    cancellation there, and e underflows to 0 (tanh = +-1) instead of overflowing.
    """
    a = tl.abs(x)
    x2 = x * x
    poly = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * (
            -0.008863235529902197 + x2 * 0.003592128036572481))))))
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return tl.where(a < 0.4, poly, big)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x rounded to DTYPE, to nearest with ties to even, the rounding of torch's casts.

    bfloat16 by integer arithmetic on the float32 bits (add 0x7FFF plus the lowest kept bit, keep the
    high half): Triton's interpreter casts float32 to bfloat16 by truncation, and the same code on a
    GPU yields the same bits as a hardware RTNE conversion. Other dtypes use the ordinary cast."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) from z = exp(-|x|) <= 1: no overflow, and relative accuracy for x << 0."""
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def activation(x, ACT: tl.constexpr):
    """act(x) in float32. silu = x sigmoid(x); gelu = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2));
    gelu_tanh = 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3) (the
    sigmoid form is the same function without the cancellation of 1 + tanh(u) for u << 0); relu."""
    if ACT == 0:
        y = x * sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * sigmoid(2.0 * u)
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def activation_grad(x, ACT: tl.constexpr):
    """d act / dx in float32 (formulas of `activation` differentiated)."""
    if ACT == 0:
        s = sigmoid(x)
        g = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        g = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        g = s + x * 2.0 * s * (1.0 - s) * du
    else:
        g = tl.where(x > 0, 1.0, 0.0)
    return g


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation; operands upcast to float32 with IEEE precision when
    UPCAST (see runtime.upcast_dots), else fed in their storage dtype."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out

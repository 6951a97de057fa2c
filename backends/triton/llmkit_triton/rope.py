"""Rotary position embedding applied by a Triton kernel (forward and backward), rope@1's semantics
(llmkit_blocks.positional).

For each channel pair (a, b) of the first d = rotary_dim channels and frequency w_i:
    a' = a cos(p w_i) - b sin(p w_i),   b' = b cos(p w_i) + a sin(p w_i)
`half` layout pairs channel i with i + d/2 (rotate_half: Llama, NeoX); `interleaved` pairs 2i with
2i+1 (GPT-J, DeepSeek's rope key). Channels d..head_dim pass through (partial rotary).

cos and sin are passed in as float32 tables [B, T, d/2] (`rope_tables`): angles p * w_i are formed
in float32 from the catalogue's float64 inverse frequencies (every scaling: linear, dynamic NTK,
YaRN with its attention factor, llama3), exactly as the reference forms them, by torch — so the
tables do not depend on a device's sin/cos approximation at large arguments. The rotation itself
is float32, rounded once to the storage dtype (the reference rounds each product).

The rotation is orthogonal, so the backward is the same kernel with sin negated: dx = R(-theta) dy.
One program per (batch, token, block of heads), cos/sin loaded once for all its heads.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from llmkit_blocks import positional as _rope

from . import jitlib
from .runtime import check_dtype


@triton.jit
def _rope_kernel(X, COS, SIN, Y, sxb, sxh, sxt, syb, syh, syt, scb, sct, H, T, HALF, HEAD_DIM,
                 BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                 INTERLEAVED: tl.constexpr, HAS_PASS: tl.constexpr, INVERSE: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)  # int64: b * sxb may pass 2^31
    b = bt // T
    t = bt % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_R)
    h_ok = heads < H
    i_ok = i < HALF
    cos = tl.load(COS + b * scb + t * sct + i, mask=i_ok, other=1.0)
    sin = tl.load(SIN + b * scb + t * sct + i, mask=i_ok, other=0.0)
    if INVERSE:
        sin = -sin
    if INTERLEAVED:
        ia = 2 * i
        ib = 2 * i + 1
    else:
        ia = i
        ib = i + HALF
    x_row = X + b * sxb + t * sxt + heads[:, None] * sxh
    y_row = Y + b * syb + t * syt + heads[:, None] * syh
    ok = h_ok[:, None] & i_ok[None, :]
    xa = tl.load(x_row + ia[None, :], mask=ok, other=0.0)
    xb = tl.load(x_row + ib[None, :], mask=ok, other=0.0)
    a = xa.to(tl.float32)
    bb = xb.to(tl.float32)
    ya = a * cos[None, :] - bb * sin[None, :]
    yb = bb * cos[None, :] + a * sin[None, :]
    tl.store(y_row + ia[None, :], jitlib.round_to(ya, Y.dtype.element_ty), mask=ok)
    tl.store(y_row + ib[None, :], jitlib.round_to(yb, Y.dtype.element_ty), mask=ok)
    if HAS_PASS:
        j = 2 * HALF + tl.arange(0, BLOCK_P)
        pass_ok = h_ok[:, None] & (j < HEAD_DIM)[None, :]
        tl.store(y_row + j[None, :], tl.load(x_row + j[None, :], mask=pass_ok), mask=pass_ok)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, inverse: bool) -> torch.Tensor:
    b, h, t, head_dim = x.shape
    half = cos.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((b, h, t, head_dim), dtype=x.dtype, device=x.device)
    cos = cos.expand(b, t, half)
    sin = sin.expand(b, t, half)
    rest = head_dim - 2 * half
    block_h = min(triton.next_power_of_2(h), 16)
    if b * t and h:
        _rope_kernel[(b * t, triton.cdiv(h, block_h))](
            x, cos, sin, y, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
            cos.stride(0), cos.stride(1), h, t, half, head_dim,
            BLOCK_H=block_h, BLOCK_R=triton.next_power_of_2(half), BLOCK_P=triton.next_power_of_2(max(rest, 1)),
            INTERLEAVED=interleaved, HAS_PASS=rest > 0, INVERSE=inverse)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _apply(x, cos, sin, interleaved, inverse=False)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Any:
        cos, sin = ctx.saved_tensors
        return _apply(dy, cos, sin, ctx.interleaved, inverse=True), None, None, None


def rope_tables(config: _rope.RopeConfig, positions: torch.Tensor,
                inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin [B, T, rotary_dim / 2] for positions [B, T], attention factor included.

    `inv_freq` (float64, from `llmkit_blocks.positional.inv_freq`) may be precomputed once per block;
    dynamic NTK scaling depends on the largest position, so it is recomputed here for that scaling.
    """
    dynamic = isinstance(config.scaling, _rope.DynamicScaling)
    if inv_freq is None or dynamic:
        inv_freq = _rope.inv_freq(config, int(positions.max()) + 1 if dynamic else None)
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    scale = _rope.attention_factor(config)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [B, H, T, head_dim] (any strides, last dim contiguous) by float32 cos/sin
    [B or 1, T, d/2]; channels beyond d = 2 * cos.shape[-1] pass through. Differentiable in x."""
    check_dtype("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, T, head_dim], got shape {tuple(x.shape)}")
    half = cos.shape[-1]
    if 2 * half > x.shape[-1] or cos.shape != sin.shape or cos.shape[-2] != x.shape[2]:
        raise ValueError(f"cos/sin of shape {tuple(cos.shape)} do not fit x of shape {tuple(x.shape)}")
    return _Rope.apply(x, cos.to(torch.float32), sin.to(torch.float32), interleaved)

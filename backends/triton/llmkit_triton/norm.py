"""RMSNorm / LayerNorm over the last dimension, with an optional fused residual add (forward and
backward), in the semantics of norm@1 (llmkit_blocks.norm).

Per row h (D values; with a residual r: h = round(x + r), the new residual stream, which is
returned too — vLLM's fused_add_rms_norm):
    RMSNorm    xhat = h / sqrt(mean(h^2) + eps)
    LayerNorm  xhat = (h - mean(h)) / sqrt(var(h) + eps)        (biased variance)
    w' = w + 1 with unit_offset (Gemma), else w
    cast before_weight:  y = round(round(xhat) * w') [+ b]   (LlamaRMSNorm: weight * hidden.to(dtype))
    cast after_weight:   y = round(xhat * w' [+ b])          (GemmaRMSNorm, Grok-1, nn.LayerNorm)
Statistics are float32 whatever the storage dtype; round() is a cast to the storage dtype.

Backward (the exact derivative of the unrounded formula), with g = dy * w':
    RMSNorm    dh = rstd * (g - xhat * mean(g * xhat))
    LayerNorm  dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dw = sum_rows dy * xhat,  db = sum_rows dy,  and with a residual dx = dr = dh + d(new residual).
One program per row in the forward (the Triton tutorial's layer norm); the backward's programs
each take every P-th row and write float32 partial sums of dw and db, reduced on the host.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from . import jitlib
from .runtime import block_size, check_dtype, row_warps

MAX_DIM = 32768
"""Largest row a program holds at once (fp32 registers/shared memory on current GPUs)."""


@triton.jit
def _norm_fwd(X, R, W, B, Y, RES, RSTD, MEAN, stride_x, stride_r, stride_y, stride_res, D, eps,
              BLOCK_D: tl.constexpr, HAS_RES: tl.constexpr, LAYER: tl.constexpr, CAST_BEFORE: tl.constexpr,
              UNIT_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2^31
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    h = x.to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        summed = jitlib.round_to(h + r.to(tl.float32), x.dtype)
        tl.store(RES + row * stride_res + cols, summed, mask=ok)
        h = summed.to(tl.float32)
    if LAYER:
        mean = tl.sum(h, axis=0) / D
        h = tl.where(ok, h - mean, 0.0)
        tl.store(MEAN + row, mean)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(h * h, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    xhat = h * rstd
    w = tl.load(W + cols, mask=ok, other=0.0)
    if CAST_BEFORE:
        if UNIT_OFFSET:
            wf = jitlib.round_to(w.to(tl.float32) + 1.0, w.dtype).to(tl.float32)
        else:
            wf = w.to(tl.float32)
        y = jitlib.round_to(xhat, x.dtype).to(tl.float32) * wf
        if HAS_BIAS:
            b = tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
            y = jitlib.round_to(y, Y.dtype.element_ty).to(tl.float32) + b
    else:
        wf = w.to(tl.float32)
        if UNIT_OFFSET:
            wf = wf + 1.0
        y = xhat * wf
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, jitlib.round_to(y, Y.dtype.element_ty), mask=ok)


@triton.jit
def _norm_bwd(DY, H, W, RSTD, MEAN, DRES, DX, DW, DB, N, D, stride_dy, stride_h, stride_dres, stride_dx,
              BLOCK_D: tl.constexpr, HAS_DRES: tl.constexpr, LAYER: tl.constexpr, CAST_BEFORE: tl.constexpr,
              UNIT_OFFSET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # the loop's rows are int64 too: row * stride may pass 2^31
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    w = tl.load(W + cols, mask=ok, other=0.0)
    wf = w.to(tl.float32)
    if UNIT_OFFSET:
        wf = wf + 1.0
        if CAST_BEFORE:
            wf = jitlib.round_to(wf, w.dtype).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for row in range(pid, N, programs):
        h = tl.load(H + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if LAYER:
            h = tl.where(ok, h - tl.load(MEAN + row), 0.0)
        xhat = h * rstd
        dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        g = dy * wf
        dh = g - xhat * (tl.sum(g * xhat, axis=0) / D)
        if LAYER:
            dh = dh - tl.sum(g, axis=0) / D
        dh = dh * rstd
        if HAS_DRES:
            dh = dh + tl.load(DRES + row * stride_dres + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, jitlib.round_to(dh, DX.dtype.element_ty), mask=ok)
        dw += dy * xhat
        db += dy
    tl.store(DW + pid * D + cols, dw, mask=ok)
    tl.store(DB + pid * D + cols, db, mask=ok)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    return t.reshape(-1, d).contiguous()


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None, eps: float, layer: bool, cast_before: bool,
                unit_offset: bool) -> Any:
        d = x.shape[-1]
        xr = _rows(x, d)
        n = xr.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype) if cast_before else x.dtype
        y = torch.empty((n, d), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        mean = torch.empty(n if layer else 1, dtype=torch.float32, device=x.device)
        rr = _rows(residual, d) if residual is not None else xr
        res = torch.empty_like(xr) if residual is not None else xr
        if n:
            _norm_fwd[(n,)](xr, rr, weight, bias if bias is not None else weight, y, res, rstd, mean,
                            xr.stride(0), rr.stride(0), y.stride(0), res.stride(0), d, eps,
                            BLOCK_D=block_size(d, 1), HAS_RES=residual is not None, LAYER=layer,
                            num_warps=row_warps(block_size(d, 1)),
                            CAST_BEFORE=cast_before, UNIT_OFFSET=unit_offset, HAS_BIAS=bias is not None)
        ctx.save_for_backward(res, weight, rstd, mean)
        ctx.flags = (layer, cast_before, unit_offset, bias is not None, residual is not None, x.shape)
        y = y.view(*x.shape[:-1], d)
        if residual is None:
            return y
        return y, res.view(x.shape)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        res, weight, rstd, mean = ctx.saved_tensors
        layer, cast_before, unit_offset, has_bias, has_res, shape = ctx.flags
        n, d = res.shape
        dy = grads[0] if grads[0] is not None else torch.zeros(shape, dtype=res.dtype, device=res.device)
        dyr = _rows(dy, d)
        dres = _rows(grads[1], d) if has_res and grads[1] is not None else None
        dx = torch.empty_like(res)
        programs = max(1, min(n, 256))
        dw = torch.zeros((programs, d), dtype=torch.float32, device=res.device)
        db = torch.zeros((programs, d), dtype=torch.float32, device=res.device)
        if n:
            _norm_bwd[(programs,)](dyr, res, weight, rstd, mean, dres if dres is not None else dyr, dx, dw, db,
                                   n, d, dyr.stride(0), res.stride(0),
                                   dres.stride(0) if dres is not None else 0, dx.stride(0),
                                   BLOCK_D=block_size(d, 1), HAS_DRES=dres is not None, LAYER=layer,
                                   num_warps=row_warps(block_size(d, 1)),
                                   CAST_BEFORE=cast_before, UNIT_OFFSET=unit_offset)
        dx = dx.view(shape)
        dweight = dw.sum(0).to(weight.dtype)
        dbias = db.sum(0).to(weight.dtype) if has_bias else None
        return dx, dweight, dbias, dx if has_res else None, None, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, layer: bool = False, cast: str = "before_weight",
             unit_offset: bool = False) -> Any:
    """Normalise the last dimension of x (formulas in the module docstring); differentiable.

    Returns y, or (y, new_residual) with new_residual = round(x + residual) when `residual` is given.
    `layer=True` is LayerNorm (then `bias` may be given); `cast` is norm@1's `before_weight` or
    `after_weight`; `unit_offset` scales by 1 + w. weight (and bias) are [D].
    """
    check_dtype("x", x)
    d = x.shape[-1]
    if d > MAX_DIM:
        raise ValueError(f"row of {d} values exceeds the kernel's MAX_DIM {MAX_DIM}")
    if weight.shape != (d,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [{d}]")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {tuple(x.shape)}")
    if cast not in ("before_weight", "after_weight"):
        raise ValueError(f"cast must be 'before_weight' or 'after_weight', got {cast!r}")
    return _Norm.apply(x, weight, bias, residual, float(eps), layer, cast == "before_weight", unit_offset)

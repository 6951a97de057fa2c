"""The gated MLP activation, SwiGLU / GeGLU, fused: y = act(gate) * up (forward and backward).

act is mlp@1's: silu (SwiGLU, Llama), gelu = erf GELU, gelu_tanh (GeGLU as Gemma and Grok-1
define it), relu; formulas in `jitlib.activation`. Without `up` (an ungated MLP) y = act(gate).
Computed in float32 from the storage-dtype inputs and rounded once (the reference rounds act(gate)
and the product separately). Backward: d gate = dy * up * act'(gate), d up = dy * act(gate).
One program per BLOCK elements of the flattened tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from . import jitlib
from .runtime import check_dtype

_BLOCK = 1024


@triton.jit
def _glu_fwd(A, B, Y, n, ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: numel may pass 2^31
    ok = offs < n
    a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
    y = jitlib.activation(a, ACT)
    if GATED:
        y = y * tl.load(B + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + offs, jitlib.round_to(y, Y.dtype.element_ty), mask=ok)


@triton.jit
def _glu_bwd(A, B, DY, DA, DB, n, ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: numel may pass 2^31
    ok = offs < n
    a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    da = dy * jitlib.activation_grad(a, ACT)
    if GATED:
        up = tl.load(B + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(DB + offs, jitlib.round_to(dy * jitlib.activation(a, ACT), DB.dtype.element_ty), mask=ok)
        da = da * up
    tl.store(DA + offs, jitlib.round_to(da, DA.dtype.element_ty), mask=ok)


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor | None, act: int) -> torch.Tensor:
        gate = gate.contiguous()
        up = up.contiguous() if up is not None else None
        y = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _glu_fwd[(triton.cdiv(n, _BLOCK),)](gate, up if up is not None else gate, y, n,
                                               ACT=act, GATED=up is not None, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Any:
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate = torch.empty_like(gate)
        dup = torch.empty_like(up) if up is not None else None
        n = gate.numel()
        if n:
            _glu_bwd[(triton.cdiv(n, _BLOCK),)](gate, up if up is not None else gate, dy, dgate,
                                               dup if dup is not None else dgate, n,
                                               ACT=ctx.act, GATED=up is not None, BLOCK=_BLOCK)
        return dgate, dup, None


def gated_activation(gate: torch.Tensor, up: torch.Tensor | None, activation: str) -> torch.Tensor:
    """act(gate) * up (or act(gate) when up is None), elementwise; differentiable in both.

    `activation` is one of mlp@1's names: silu, gelu, gelu_tanh, relu."""
    check_dtype("gate", gate)
    if activation not in jitlib.ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(jitlib.ACTIVATIONS)}")
    if up is not None and (up.shape != gate.shape or up.dtype != gate.dtype):
        raise ValueError(f"up {tuple(up.shape)} {up.dtype} must match gate {tuple(gate.shape)} {gate.dtype}")
    return _GLU.apply(gate, up, jitlib.ACTIVATIONS[activation])

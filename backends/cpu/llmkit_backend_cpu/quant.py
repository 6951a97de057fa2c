"""Weight-only quantised linears for the CPU impls, on PyTorch's CPU kernels.

Selected per model with `quant="int8"` or `"int4"` (`llmkit.load/build(..., quant=...)`, CLI
`--quant`), which reaches impls as the target fact `quant`. An impl that supports it quantises its
block's linear weights once, in `prepare`, into `block._cpu_quant` (the float parameters stay: the
state dict is the same on every backend); `linear` then uses the packed weights for decode-sized
inputs (see `PACKED_MAX_ROWS`). Activations stay in the model's dtype (bfloat16 is the fast path;
float32 works but int8 runs slowly there).

- int8: symmetric per output channel, s = max|w_row| / 127, q = round(w / s) in [-127, 127];
  `torch._weight_int8pack_mm(x, q, s)`. Error per weight <= s / 2.
- int4: asymmetric per group of `GROUP` input channels, s = (max - min) / 15,
  q = round((w - min) / s) in [0, 15], w ~ (q - 8) s + z with z = min + 8 s (the kernel's
  convention); `torch._weight_int4pack_mm_for_cpu`. Error per weight <= s / 2 (plus bf16 rounding
  of s and z).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.hookspecs import Target
from llmkit_blocks import attention as _attn

MODES = ("int8", "int4")
GROUP = 32
PACKED_MAX_ROWS = 16
"""Above this many rows (prefill) a linear uses the float weight, which the block keeps anyway: a
large GEMM is compute-bound, and PyTorch's packed CPU kernels are slower there than its float
GEMM (SmolLM2 512-token prefill in bf16: 543 tok/s with int8 kernels vs 1059 with bf16 GEMMs);
at decode the packed weight's smaller reads win. Quantisation is thus a decode-time choice."""


def pack(w: torch.Tensor, mode: str, dtype: torch.dtype) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A float weight [out, in] -> (mode, packed weight, scales) for `linear`."""
    w = w.detach().float()
    if mode == "int8":
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return mode, q, scale.to(dtype)
    out_features, in_features = w.shape
    if in_features % GROUP:
        raise LlmkitError(f"int4 needs in_features divisible by {GROUP}, got {in_features}")
    g = w.view(out_features, in_features // GROUP, GROUP)
    low = g.amin(dim=-1)
    scale = ((g.amax(dim=-1) - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.view(out_features, in_features), 1)
    scales_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return mode, packed, scales_zeros


def quantize(block: Any, names: Iterable[str], target: Target) -> None:
    """`prepare` step: pack the named weights when the target asks for weight-only quantisation."""
    mode = target.fact("quant")
    block._cpu_quant = {}
    block.quantized = None
    if mode is None or target.device == "meta":
        return
    if mode not in MODES:
        raise LlmkitError(f"quant {mode!r} is not supported by the cpu backend ({', '.join(MODES)})")
    for name in names:
        block._cpu_quant[name] = pack(getattr(block, name), mode, target.dtype)
    block.quantized = mode


def matmul(entry: tuple[str, torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequant(W)^T with a packed weight."""
    mode, packed, scales = entry
    flat = x.reshape(-1, x.shape[-1])
    if mode == "int8":
        y = torch._weight_int8pack_mm(flat, packed, scales)
    else:
        y = torch._weight_int4pack_mm_for_cpu(flat, packed, GROUP, scales)
    return y.view(*x.shape[:-1], y.shape[-1])


def linear(block: Any, weight: str, bias: str | None, x: torch.Tensor) -> torch.Tensor:
    """`llmkit_blocks.attention.linear` with the block's packed weight when it has one."""
    entry = block.__dict__.get("_cpu_quant", {}).get(weight)
    if entry is None or x.numel() > PACKED_MAX_ROWS * x.shape[-1]:
        return _attn.linear(block, weight, bias, x)
    y = matmul(entry, x)
    return y + getattr(block, bias) if bias else y

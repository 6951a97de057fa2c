"""CPU impl `cpu.fused` of `norm@1`: RMSNorm and LayerNorm through PyTorch's fused kernels.

The same contract as the reference (llmkit_blocks.norm): statistics in float32 (float64 for
float64 inputs); `cast: before_weight` casts the normalised value to the storage dtype and applies
the weight there (LlamaRMSNorm), `after_weight` applies weight and bias in float32 and casts at the
end (Gemma, Grok-1, nn.LayerNorm); `unit_offset` scales by 1 + w. `F.rms_norm` / `F.layer_norm`
on the upcast input do the statistics in one kernel instead of the reference's five ops, which is
what matters at decode, where a norm's cost is its op count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def fused_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    c = block.config
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    shape = (c.dim,)
    if c.cast == "before_weight":
        h = F.rms_norm(h, shape, None, c.eps) if c.type == "rms" else F.layer_norm(h, shape, None, None, c.eps)
        w = block.weight + 1 if c.unit_offset else block.weight
        y = h.to(x.dtype) * w
        return y + block.bias if c.bias else y
    w = block.weight.to(acc) + 1 if c.unit_offset else block.weight.to(acc)
    if c.type == "rms":
        y = F.rms_norm(h, shape, w, c.eps)
    else:
        y = F.layer_norm(h, shape, w, block.bias.to(acc) if c.bias else None, c.eps)
    return y.to(x.dtype)

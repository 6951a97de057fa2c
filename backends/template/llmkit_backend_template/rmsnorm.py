"""The template's sample impl of `norm@1`: RMSNorm in plain torch, float32 accumulation.

Same contract as the reference (llmkit_blocks.norm): y = x / sqrt(mean(x^2) + eps) * w, statistics
in float32 (float64 for float64 inputs); `cast: before_weight` casts the normalised value to the
storage dtype before the weight (LlamaRMSNorm), `after_weight` applies the weight in float32 and
casts last (Gemma); `unit_offset` scales by 1 + w. The forward has the reference's signature
`(block, x)`, reads only `block.config` and `block.weight`, and keeps no state.
"""

from __future__ import annotations

from typing import Any

import torch


def forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    c = block.config
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    h = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + c.eps)
    if c.cast == "before_weight":
        return h.to(x.dtype) * (block.weight + 1 if c.unit_offset else block.weight)
    w = block.weight.to(acc)
    return (h * (w + 1 if c.unit_offset else w)).to(x.dtype)

"""CPU impls of the blocks made of linears — `mlp@1` and `head@1` — whose point is weight-only
quantisation (see quant.py): unquantised they compute exactly the reference's formula.

mlp:  y = W_down (act(W_gate x + b_gate) * (W_up x + b_up)) + b_down   (ungated: W_down act(W_up x + b_up) + b_down)
head: logits = x W^T + b, times the output multiplier, then the final soft-cap. A tied head's
      matrix is the embedding's, which the head block does not own: it is packed at the first call
      that brings it (and again if a different tensor arrives), not in `prepare`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmkit.hookspecs import Target
from llmkit_blocks import embedding as _embedding
from llmkit_blocks.mlp import activation

from . import quant
from .quant import linear, matmul, pack, quantize


def mlp_prepare(block: Any, target: Target) -> None:
    quantize(block, ["w_gate", "w_up", "w_down"] if block.config.gated else ["w_up", "w_down"], target)


def mlp_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    c = block.config
    up = linear(block, "w_up", "b_up" if c.bias else None, x)
    if c.gated:
        h = activation(c.activation, linear(block, "w_gate", "b_gate" if c.bias else None, x)) * up
    else:
        h = activation(c.activation, up)
    return linear(block, "w_down", "b_down" if c.bias else None, h)


def head_prepare(block: Any, target: Target) -> None:
    quantize(block, [] if block.config.tied else ["weight"], target)
    block._cpu_tied_mode = None if target.device == "meta" else target.fact("quant")
    block._cpu_tied = None
    if block.config.tied and block._cpu_tied_mode is not None:
        block.quantized = block._cpu_tied_mode


def head_forward(block: Any, x: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
    c = block.config
    _embedding.check_tied(c, tied_weight)
    bias = block.bias if c.bias else None
    if not c.tied:
        logits = linear(block, "weight", "bias" if c.bias else None, x)
    elif block._cpu_tied_mode is None or x.numel() > quant.PACKED_MAX_ROWS * x.shape[-1]:
        logits = F.linear(x, tied_weight, bias)
    else:
        if block._cpu_tied is None or block._cpu_tied[0] is not tied_weight:
            block._cpu_tied = (tied_weight, pack(tied_weight, block._cpu_tied_mode, x.dtype))
        logits = matmul(block._cpu_tied[1], x)
        logits = logits + bias if bias is not None else logits
    return _embedding.finish_logits(c, logits)

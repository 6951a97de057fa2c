"""CPU impls of the blocks made of linears — `mlp@1` and `head@1` — whose point is packed
(quantised or half-precision) weights (see quant.py): unpacked they compute exactly the
reference's formula. A gated MLP packs W_gate and W_up as one matrix: one GEMM at decode.

mlp:  y = W_down (act(W_gate x + b_gate) * (W_up x + b_up)) + b_down   (ungated: W_down act(W_up x + b_up) + b_down)
head: logits = x W^T + b, times the output multiplier, then the final soft-cap. A tied head's
      matrix is the embedding's, which the head block does not own: it is packed at the first call
      that brings it (and again if a different tensor arrives), not in `prepare`.
"""

from __future__ import annotations

from typing import Any

import torch

from llmkit.hookspecs import Target
from llmkit_blocks import embedding as _embedding
from llmkit_blocks.mlp import activation

from . import quant
from .quant import grouped, linear, matmul, pack, quantize


_GATE_UP = ("w_gate", "w_up")


def mlp_prepare(block: Any, target: Target) -> None:
    quantize(block, [_GATE_UP, "w_down"] if block.config.gated else ["w_up", "w_down"], target)


def mlp_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    c = block.config
    lin = grouped(block, _GATE_UP, x) if c.gated else linear
    up = lin(block, "w_up", "b_up" if c.bias else None, x)
    if c.gated:
        h = activation(c.activation, lin(block, "w_gate", "b_gate" if c.bias else None, x)) * up
    else:
        h = activation(c.activation, up)
    return linear(block, "w_down", "b_down" if c.bias else None, h)


def head_prepare(block: Any, target: Target) -> None:
    quantize(block, [] if block.config.tied else ["weight"], target)
    block._cpu_tied_mode = None if target.device == "meta" else target.fact("quant")
    block._cpu_tied = None
    if block.config.tied and block._cpu_tied_mode is not None:
        block.quantized = block._cpu_tied_mode
        # eager even inside a compiled step; wrapped here, not at import: torch.compiler.disable
        # imports dynamo (~140 MiB of RSS), which plugin discovery should not pay
        block._cpu_pack_tied = torch.compiler.disable(_pack_tied)


def head_forward(block: Any, x: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
    c = block.config
    _embedding.check_tied(c, tied_weight)
    bias = block.bias if c.bias else None
    if not c.tied:
        logits = linear(block, "weight", "bias" if c.bias else None, x)
    elif block._cpu_tied_mode is None or not quant.small(x):
        logits = quant.block_linear(block, x, tied_weight, bias)
    else:
        if block._cpu_tied is None or block._cpu_tied[0] is not tied_weight:
            block._cpu_pack_tied(block, tied_weight, x.dtype)
        logits = matmul(block._cpu_tied[1], x)
        logits = logits + bias if bias is not None else logits
    return _embedding.finish_logits(c, logits)


def _pack_tied(block: Any, tied_weight: torch.Tensor, dtype: torch.dtype) -> None:
    """Pack the tied matrix, eagerly: when the first call that brings it is a compiled decode
    step, packing (once per matrix, with fp16's data-dependent range check) is not part of the
    graph, and the step recompiles once without it."""
    block._cpu_tied = (tied_weight, pack(tied_weight, block._cpu_tied_mode, dtype))

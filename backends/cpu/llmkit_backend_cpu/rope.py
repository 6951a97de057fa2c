"""CPU impl `cpu.cached` of `rope@1`: the reference rotation with its tables computed once.

The reference evaluates the inverse frequencies (float64) and cos/sin on every call; an attention
layer calls RoPE twice per step (q and k) at the same positions. This impl computes the inverse
frequencies once at build time (`prepare`; dynamic NTK scaling depends on the length, so it is not
claimed) and keeps the cos/sin of the last positions tensor seen, so k reuses what q computed.
Angles are float32 (float64 for float64 inputs), cos/sin cast to the storage dtype, as the reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from llmkit.hookspecs import Target
from llmkit_blocks import positional as _rope


def unsupported(config: Any, target: Target) -> Iterator[str]:
    if isinstance(config.scaling, _rope.DynamicScaling):
        yield "dynamic NTK scaling recomputes frequencies from the sequence length on every call"


def prepare(block: Any, target: Target) -> None:
    block._cpu_inv_freq = _rope.inv_freq(block.config)
    block._cpu_tables = None


def _tables(block: Any, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # compared by value (cheap: [B, T] integers); identity is not enough, a caller may reuse a buffer
    # inside a compiled graph the tables are computed once per step anyway: no memo, no data check
    compiling = torch.compiler.is_compiling()
    cached = block._cpu_tables
    if not compiling and cached is not None and cached[1] == x.dtype and cached[0].shape == positions.shape \
            and torch.equal(cached[0], positions):
        return cached[2], cached[3]
    angle_dtype = torch.promote_types(x.dtype, torch.float32)
    angles = positions.to(angle_dtype)[:, None, :, None] * block._cpu_inv_freq.to(angle_dtype)
    scale = _rope.attention_factor(block.config)
    cos = (angles.cos() * scale).to(x.dtype)
    sin = (angles.sin() * scale).to(x.dtype)
    if not compiling:
        block._cpu_tables = (positions.clone(), x.dtype, cos, sin)
    return cos, sin


def cached_forward(block: Any, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = _tables(block, x, positions)
    return _rope.rotate(block.config, x, cos, sin)

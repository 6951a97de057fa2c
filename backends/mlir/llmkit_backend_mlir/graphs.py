"""What gets compiled for a block: a function of (block state, inputs), traced with the block's
parameters and buffers as inputs rather than constants.

Weights are inputs, not baked constants, so a kernel depends only on the block's config and the
input shapes: blocks of equal config share kernels, weights loaded after the first call (a
checkpoint, `load_state_dict`) are used as they are, and the compiled code never holds a copy of
them. Inside the traced function every child block (QK-norm, RoPE, a shared expert) runs its
kind's reference forward, whatever impl it is bound to in the model: a block's kernel is the
block's whole reference computation.
"""

from __future__ import annotations

import contextlib
import json
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmkit import Block

from . import engine


@dataclass(frozen=True)
class Graph:
    """One compiled function of a block kind: `fn(block, *inputs)` returns a tensor or a tuple;
    `dynamic(*inputs)` lists, per input, the dims that may change between calls."""

    name: str
    fn: Callable[..., Any]
    dynamic: Callable[..., Sequence[Sequence[int]]]


class _Bound(nn.Module):
    """The block as a submodule, so that functional_call can substitute its state."""

    def __init__(self, block: Block, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.block = block
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.fn(self.block, *inputs)


class _Traced(nn.Module):
    """What is traced: no state of its own; the block's state arrives as the leading inputs."""

    def __init__(self, block: Block, fn: Callable[..., Any], names: Sequence[str]) -> None:
        super().__init__()
        self._bound = (_Bound(block, fn),)  # a tuple hides it from nn.Module: no lifted parameters
        self.names = tuple(names)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = len(self.names)
        state = {f"block.{n}": t for n, t in zip(self.names, tensors[:k])}
        bound = self._bound[0]
        with reference_children(bound.block):
            out = torch.func.functional_call(bound, state, tuple(tensors[k:]))
        return out if isinstance(out, tuple) else (out,)


@contextlib.contextmanager
def reference_children(block: Block) -> Iterator[None]:
    """Run every Block below `block` on its kind's reference forward for the duration (a child
    with a dtype of its own casts at its boundary, as a bound block does)."""
    saved = []
    for m in block.modules():
        if m is not block and isinstance(m, Block):
            saved.append((m, m.__dict__.get("forward")))
            forward = m.kind.reference
            if m.dtype != m.outer_dtype:
                forward = _cast_at_boundary(forward, m.dtype, m.outer_dtype)
            m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m, forward in reversed(saved):
            if forward is None:
                del m.forward
            else:
                m.forward = forward


def _cast_at_boundary(forward: Callable[..., Any], inner: torch.dtype, outer: torch.dtype) -> Callable[..., Any]:
    def cast(a: Any) -> Any:
        return a.to(inner) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    def cast_forward(block: Block, *args: Any) -> Any:
        out = forward(block, *map(cast, args))
        return out.to(outer) if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    return cast_forward


def prepare(block: Block) -> None:
    """Record what keys the block's kernels (kind and config) and where its state lives."""
    config = json.dumps(block.config.model_dump(mode="json"), sort_keys=True)
    block._mlir_key = (block.kind.id, config)
    names, owners = [], []
    for prefix, m in block.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(m, kind).items():
                if t is not None:
                    names.append(f"{prefix}.{name}" if prefix else name)
                    owners.append((m, name))
    block._mlir_state = (tuple(names), tuple(owners))


def run(block: Block, graph: Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run `graph` for `block` on `inputs` through the compiled kernel (compiled on first use)."""
    names, owners = block._mlir_state
    state = [getattr(m, name) for m, name in owners]
    # kernels take contiguous inputs (identity-layout memrefs), and their guards are checked on them
    args = [a.detach().contiguous() for a in (*state, *inputs)]

    def build() -> tuple[nn.Module, list[Sequence[int]]]:
        return _Traced(block, graph.fn, names), [*([()] * len(state)), *graph.dynamic(*inputs)]

    kernel = engine.CACHE.get((graph.name, block._mlir_key, names), build, args)
    return kernel(*args)

"""`llmkit export mlir`: a whole model's prefill forward as MLIR text, for vendor compilers.

One function, `@main(ids: [1, T] int64) -> logits [1, T, vocab]`, with the weights inlined as
`dense_resource` constants (the file is self-contained), at one of two stages:
- `torch`: torch-mlir's torch backend contract (`torch.aten.*` ops on value tensors);
- `linalg`: linalg-on-tensors (upstream `linalg`, `tensor`, `arith`, `math` ops only), the input of
  MLIR-based compilers (IREE, vendor toolchains).

The sequence length is dynamic (`?`); the batch is 1: torch-mlir's linalg lowering of a view that
merges two dynamic dims ([B, T, d] -> [B*T, d], inside every linear) assumes the second is 1, so
only one of them is left dynamic.

What is exported is the reference semantics, whatever impls the model was built with: every block
runs its kind's reference forward during tracing, with two substitutions:
- MoE layers run in dense form — every expert on every token, weighted by the [tokens, experts]
  routing matrix that is zero where a token did not choose the expert. In exact arithmetic it is
  the reference's sparse dispatch (an unchosen expert adds 0), and it has no data-dependent shapes
  (the reference's `nonzero`/`index_add_` dispatch does not lower to linalg). Capacity limits drop
  tokens by their rank, which the dense form does not model: such models are refused.
- GELU is traced through PyTorch's decomposition: torch-mlir's own lowering of the tanh
  approximation uses sqrt(2/pi) = 0.797724 (it is 0.7978846).
- top-k (routers) is traced as k rounds of max-and-mask, which lowers to plain linalg; torch-mlir
  would emit its own `tm_tensor.sort`, which upstream MLIR cannot parse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .assembly import Block
from .atomic import atomic_write
from .errors import LlmkitError
from .registry import reference_impl

STAGES = ("torch", "linalg")


def _dense_moe(block: Any, x: torch.Tensor) -> torch.Tensor:
    """moe@1 without its sparse dispatch: routing as the reference, every expert on every token."""
    from llmkit_blocks import moe as _moe

    c = block.config
    h = x.reshape(-1, c.d_model)
    _, _, selected, weights = _moe.route(block, h)
    mix = _moe.routing_matrix(selected, weights, c.n_experts, x.dtype)
    out = torch.zeros_like(h)
    for e in range(c.n_experts):
        out = out + _moe.expert(block, e, h) * mix[:, e, None]
    out = _moe.add_shared(block, h, out)
    return out.reshape(x.shape)


@contextlib.contextmanager
def _reference_forwards(model: nn.Module) -> Iterator[None]:
    """Route every Block to its kind's reference forward (MoE: the dense form) for the duration."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for m in blocks:
        if m.kind.name == "moe" and m.config.capacity_factor is not None:
            raise LlmkitError(f"export mlir: {m.kind.id} with capacity_factor is not supported (capacity drops "
                              "tokens by their rank in the batch, a data-dependent dispatch)")
    saved = [(m, m.impl) for m in blocks]
    try:
        for m in blocks:
            impl = reference_impl(m.kind)
            m._route(dataclasses.replace(impl, forward=_dense_moe) if m.kind.name == "moe" else impl)
        yield
    finally:
        for m, impl in saved:
            if impl is None:
                m.__dict__.pop("forward", None)
                m.impl = None
            else:
                m._route(impl)


class _Prefill(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)


def _topk_by_max(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True,
                 sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """aten.topk as k rounds of max-and-mask (k is a router's top_k or topk_group: small).

    torch-mlir lowers topk to `tm_tensor.sort`, a dialect of its own that upstream MLIR tools and
    its Python bindings cannot parse; `max.dim` lowers to a plain linalg reduction. Ties go to
    the lowest index, as the reference's topk does on CPU."""
    work = (x if largest else -x).movedim(dim, -1)
    lanes = torch.arange(work.shape[-1], device=x.device)
    values, indices = [], []
    for _ in range(k):
        value, index = work.max(dim=-1, keepdim=True)
        values.append(value if largest else -value)
        indices.append(index)
        work = torch.where(lanes == index, torch.finfo(work.dtype).min, work) if work.is_floating_point() \
            else torch.where(lanes == index, torch.iinfo(work.dtype).min, work)
    return torch.cat(values, -1).movedim(-1, dim), torch.cat(indices, -1).movedim(-1, dim)


def _decompositions() -> dict[Any, Any]:
    from torch._decomp import get_decompositions
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    return {**get_decomposition_table(), **get_decompositions([torch.ops.aten.gelu]),
            torch.ops.aten.topk.default: _topk_by_max}


def export_mlir(model: nn.Module, out: str | Path, stage: str = "linalg", example_len: int = 8) -> Path:
    """Write `model`'s prefill forward (ids [1, T] -> logits [1, T, vocab]) as MLIR text to `out`.

    `stage`: "torch" or "linalg" (see the module docstring). `example_len` is the length of the
    example prompt traced (>= 2; the exported T is dynamic). Written atomically; returns `out`.
    """
    if stage not in STAGES:
        raise LlmkitError(f"export mlir: unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    if example_len < 2:
        raise LlmkitError(f"export mlir: example_len must be >= 2 (a length of 1 would be specialised), got {example_len}")
    try:
        from torch_mlir import fx
    except ImportError as exc:
        raise LlmkitError(f"export mlir needs torch-mlir (pip install torch-mlir): {exc}") from None
    out = Path(out)
    ids = torch.zeros(1, example_len, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _reference_forwards(model), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree APIs that torch 2.13 deprecates
            program = torch.export.export(_Prefill(model), (ids,), dynamic_shapes=({1: torch.export.Dim.AUTO},),
                                          strict=False)
            output = "torch" if stage == "torch" else "linalg-on-tensors"
            module = fx.export_and_import(program, output_type=output, func_name="main",
                                          decomposition_table=_decompositions())
    except LlmkitError:
        raise
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if "error:" in line), str(exc).splitlines()[0] if str(exc) else "")
        raise LlmkitError(f"export mlir ({stage} stage) of {getattr(model.spec, 'name', 'the model')} failed: "
                          f"{type(exc).__name__}: {first.strip()[:500]}") from exc
    finally:
        model.train(was_training)
    atomic_write(out, str(module))
    return out

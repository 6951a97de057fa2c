"""Blocks as modules, and binding impls into a module tree once, at build time.

A `Block` owns its parameters (as the kind declares them). Binding an impl sets the instance's
`forward` to the impl's function bound to the block, so calling a block costs exactly what calling a
hand-written module costs (no wrapper frame), and no registry or pluggy code runs during a forward. `assemble` resolves every block of a module tree for a target and binds all of
them, or none when any block cannot be resolved.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from .errors import FallbackWarning, LlmkitError, PluginContractError, ResolutionError
from .impls import Impl
from .kinds import BlockKind
from .plan import Plan, PlanEntry
from .registry import Registry, default_registry
from .resolve import Selection
from .target import Target


class Block(nn.Module):
    """One block of a given kind and config; `forward` is the bound impl's forward."""

    impl: Impl | None

    def __init__(
        self,
        kind: BlockKind,
        config: BaseModel | Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        """`dtypes` maps block kind names to a dtype of their own (mixed precision): such a block
        and its children keep their state in that dtype, are resolved for it, and cast their
        floating inputs to it and their output back to the input's dtype."""
        super().__init__()
        self.kind = kind
        self.config = kind.parse_config(config)
        self.impl = None
        outer = dtype or torch.get_default_dtype()
        self.dtype: torch.dtype = (dtypes or {}).get(kind.name, outer)
        self.outer_dtype = outer
        dtype = self.dtype
        for name, spec in kind.param_specs(self.config).items():
            if hasattr(self, name):
                raise PluginContractError(f"block kind {kind.id}: parameter name {name!r} is reserved")
            p_dtype = torch.float32 if spec.dtype == "float32" else dtype
            tensor = torch.empty(spec.shape, device=device, dtype=p_dtype)
            if spec.buffer:
                self.register_buffer(name, tensor)
            else:
                self.register_parameter(name, nn.Parameter(tensor))
        self.reset_parameters(generator)
        for name, (child_kind, child_config) in kind.child_specs(self.config).items():
            if hasattr(self, name):
                raise PluginContractError(f"block kind {kind.id}: child name {name!r} is taken")
            self.add_module(
                name,
                Block(child_kind, child_config, device=device, dtype=dtype, generator=generator, dtypes=dtypes),
            )

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise this block's own parameters and buffers as its kind declares (skipped on meta)."""
        with torch.no_grad():
            for name, spec in self.kind.param_specs(self.config).items():
                p = getattr(self, name)
                if p.is_meta:
                    continue
                if spec.init == "ones":
                    p.fill_(1.0)
                elif spec.init == "zeros":
                    p.zero_()
                else:
                    p.normal_(0.0, spec.std, generator=generator)

    def bind(self, impl: Impl, target: Target) -> None:
        """Run the impl's build-time `prepare`, then route `forward` to it."""
        self._prepare(impl, target)
        self._route(impl)

    def _prepare(self, impl: Impl, target: Target) -> None:
        if impl.kind != self.kind.id:
            raise LlmkitError(f"cannot bind {impl.qualname} (an impl of {impl.kind}) to a {self.kind.id} block")
        if impl.prepare is not None:
            impl.prepare(self, target)

    def _apply(self, fn: Any, recurse: bool = True) -> Block:
        # .to(dtype)/.half()/.bfloat16() all come here: float32-pinned state stays float32
        out = super()._apply(fn, recurse)
        for name, spec in self.kind.param_specs(self.config).items():
            t = getattr(self, name)
            if spec.dtype == "float32" and t.is_floating_point() and t.dtype != torch.float32:
                if spec.buffer:
                    self._buffers[name] = t.float()
                else:
                    t.data = t.data.float()
        return out

    def _route(self, impl: Impl) -> None:
        self.impl = impl
        # an instance attribute shadows the class's `forward`; nn.Module.__call__ looks it up there
        fn = impl.forward
        if self.dtype != self.outer_dtype:
            fn = _cast_at_boundary(fn, self.dtype, self.outer_dtype)
        self.forward = types.MethodType(fn, self)

    def __getstate__(self) -> dict[str, Any]:
        # the bound method points at this very block; a copy must rebind to itself
        state = super().__getstate__()
        state.pop("forward", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.impl is not None:
            self._route(self.impl)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Only reached while no impl is bound (binding replaces it on the instance)."""
        raise LlmkitError(
            f"block {self.kind.id} has no impl bound; build the model through llmkit "
            "(llmkit.assemble or llmkit.build), which resolves and binds every block"
        )

    def extra_repr(self) -> str:
        impl = self.impl.qualname if self.impl else "unbound"
        return f"{self.kind.id}, impl={impl}"


def _cast_at_boundary(forward: Any, inner: torch.dtype, outer: torch.dtype) -> Any:
    """Wrap a forward so it runs in `inner`: floating tensor inputs are cast to it and the output
    back to `outer`, the dtype of the enclosing model (ids, positions and caches pass through)."""

    def cast(a: Any) -> Any:
        return a.to(inner) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    def cast_forward(block: Block, *args: Any, **kwargs: Any) -> Any:
        out = forward(block, *map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
        return out.to(outer) if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    return cast_forward


def assemble(
    model: nn.Module,
    target: Target,
    selection: Selection | None = None,
    registry: Registry | None = None,
) -> Plan:
    """Resolve and bind every `Block` in `model` for `target`; return the dispatch plan.

    All blocks are resolved and prepared before any is routed to its new impl, so an error (an
    unhonourable pin, a strict-policy fallback, a failing prepare) leaves the forward path as it was. Fallbacks raise one `FallbackWarning`.
    """
    registry = registry or default_registry()
    selection = selection or Selection()
    registry.check_selection(selection)
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, Block)]
    if not blocks:
        raise LlmkitError(f"{type(model).__name__} contains no llmkit Block to resolve")
    # fetched once for the whole tree: the blocks share one store
    store = registry.certificates(selection.certs) if selection.uses_certificates else None
    entries = []
    for path, block in blocks:
        # a block with a dtype of its own (mixed precision) is resolved for that dtype
        block_target = target if block.dtype == target.dtype else dataclasses.replace(target, dtype=block.dtype)
        try:
            res = registry.resolve(block.kind.id, block.config, block_target, selection, store)
        except ResolutionError as exc:
            raise ResolutionError(f"{path or '<root>'}: {exc}") from None
        entries.append(PlanEntry(path, res, block.dtype))
    for entry, (path, block) in zip(entries, blocks):
        impl = entry.resolution.impl
        try:
            block._prepare(impl, target if block.dtype == target.dtype else dataclasses.replace(target, dtype=block.dtype))
        except Exception as exc:
            raise LlmkitError(
                f"{path}: prepare of {impl.qualname} failed: {type(exc).__name__}: {exc}"
            ) from exc
    for entry, (_, block) in zip(entries, blocks):
        block._route(entry.resolution.impl)
    plan = Plan(target, selection, tuple(entries))
    if plan.fallbacks:
        by_kind = sorted({(e.resolution.kind, e.resolution.impl.qualname, e.resolution.reason) for e in plan.fallbacks})
        warnings.warn(
            FallbackWarning(
                f"{len(plan.fallbacks)} of {len(entries)} blocks fall back from backend "
                f"{target.backend!r}: " + "; ".join(f"{k} -> {i} ({r})" for k, i, r in by_kind)
            ),
            stacklevel=2,
        )
    return plan

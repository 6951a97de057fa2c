"""`llmkit inspect`: parameters, active parameters, FLOPs and KV-cache bytes per token, weight bytes.

Every figure except FLOPs is computed twice, independently, and the two must agree:
- from the model built on the meta device (parameter tensors; the KV cache an attention block
  actually fills when run on meta tensors), and
- from the closed-form `cost` formula each block kind declares, summed over the block tree.

Definitions
- params_total: every parameter once (a tied head owns none).
- params_active: params_total minus the routed-expert parameters a token does not use
  ((n_experts - top_k) experts per MoE layer).
- flops_per_token: forward matrix-multiply FLOPs (2 per multiply-add) of one token at context N:
  2 x (active weights used in matmuls, including the LM head; not the embedding lookup) plus
  attention 2 x n_heads x (qk_dim + v_dim) x L per layer, L = min(N, window) keys.
- kv_cache_bytes_per_token: cached values per token x dtype size at context N (MLA: latent + rope
  key; a sliding-window layer caches min(N, W) tokens, so it adds W/N of its per-token size).
- weight_bytes: the state dict's size per storage dtype (parameters and saved buffers such as
  DeepSeek's correction bias; float32-pinned tensors stay 4 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .assembly import Block
from .cache import LayerCache
from .errors import LlmkitError
from .kinds import BlockKind, Cost
from .registry import Registry, default_registry
from .spec import Spec, load_spec
from .target import dtype_name, parse_dtype

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class _Totals:
    params: int = 0
    inactive: int = 0
    flops: int = 0
    kv_values: float = 0.0


def _closed_form(kind: BlockKind, config: Any, context: int, out: _Totals) -> None:
    if kind.cost is None:
        raise LlmkitError(f"block kind {kind.id} declares no cost formula; inspect needs one")
    c: Cost = kind.cost(config, context)
    out.params += c.params
    out.inactive += c.inactive_params
    out.flops += c.flops
    out.kv_values += c.kv_values
    for child_kind, child_config in kind.child_specs(config).values():
        _closed_form(child_kind, child_config, context, out)


def _measured_kv_values(model: torch.nn.Module, context: int) -> float:
    """Run every attention-like block on meta tensors over `context` tokens with a fresh cache and
    read what it stored: cached values per token, averaged over the context."""
    total = 0.0
    for block in model.modules():
        if isinstance(block, Block) and block.kind.name in ("attention", "mla"):
            cache = LayerCache(max_tokens=getattr(block.config, "window", None))
            x = torch.empty(1, context, block.config.d_model, device="meta")
            block(x, torch.arange(context, device="meta"), cache)
            total += cache.values_per_token() * len(cache) / context
    return total


def inspect(
    spec: Spec | str, *, context: int | None = None, dtype: str | torch.dtype | None = None,
    registry: Registry | None = None,
) -> dict[str, Any]:
    """The figures of `llmkit inspect` for a spec (see the module docstring)."""
    from .model import Model
    from .testing import bind_reference

    registry = registry or default_registry()
    if not isinstance(spec, Spec):
        spec = load_spec(spec, registry)
    context = context or spec.max_seq_len
    if context < 1:
        raise LlmkitError(f"--context must be >= 1, got {context}")
    dt = parse_dtype(dtype or spec.dtype or "bfloat16")

    model = bind_reference(Model(spec, registry, device="meta", dtype=torch.float32), dtype=torch.float32)
    counted = sum(p.numel() for p in model.parameters())
    inactive_counted = 0
    for block in model.modules():
        if isinstance(block, Block) and block.kind.name == "moe":
            c = block.config
            experts = sum(p.numel() for n, p in block.named_parameters(recurse=False) if n[:2] in ("w_", "b_"))
            inactive_counted += experts // c.n_experts * (c.n_experts - c.top_k)

    closed = _Totals()
    for kind_name, config in [("embedding", spec.embedding), *[("layer", c) for c in spec.layers],
                              ("norm", spec.final_norm), ("head", spec.head)]:
        _closed_form(registry.kind(kind_name), config, context, closed)
    kv_measured = _measured_kv_values(model, context)

    for what, a, b in (("params_total", counted, closed.params),
                       ("inactive params", inactive_counted, closed.inactive),
                       ("kv values per token", round(kv_measured, 6), round(closed.kv_values, 6))):
        if a != b:
            raise LlmkitError(f"{spec.name}: {what} from the built module ({a}) != closed form ({b})")

    # the meta model is float32 throughout, so each tensor's storage dtype is derived here:
    # float32-pinned tensors stay 4 bytes, blocks with a dtype of their own (and their children)
    # keep it, the rest take the dtype the row is for (None below)
    fixed = {k: parse_dtype(v) for k, v in spec.dtypes.items()}
    state: list[tuple[torch.dtype | None, int]] = []

    def walk(module: torch.nn.Module, inherited: torch.dtype | None) -> None:
        if isinstance(module, Block):
            inherited = fixed.get(module.kind.name, inherited)
            for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                pinned = module.kind.param_specs(module.config)[n].dtype == "float32"
                state.append((torch.float32 if pinned else inherited, t.numel()))
        for child in module.children():
            walk(child, inherited)

    walk(model, None)
    itemsize = torch.empty((), dtype=dt).element_size()
    return {
        "name": spec.name,
        "context": context,
        "dtype": dtype_name(dt),
        "n_layers": spec.n_layers,
        "params_total": counted,
        "params_active": counted - inactive_counted,
        "flops_per_token": closed.flops,
        "kv_cache_bytes_per_token": _number(kv_measured * itemsize),
        "weight_bytes": {
            dtype_name(w): sum(n * torch.empty((), dtype=d or w).element_size() for d, n in state)
            for w in WEIGHT_DTYPES
        },
    }


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x

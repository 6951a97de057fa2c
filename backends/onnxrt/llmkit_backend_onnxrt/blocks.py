"""The `onnxrt` impls: each kind's reference computation exported to ONNX (graphs.py) and run by
onnxruntime. Every graph is built from the catalogue's own functions, so each impl matches the
reference of its kind; only where the computation runs differs. Graph names in backquotes.

- norm@1 (`norm`), mlp@1 (`mlp`), head@1 (`head`, `head_tied`: the embedding matrix is an input),
  embedding@1 (`embedding`, int64 ids): token-wise, so leading dims are flattened into one
  dynamic row dim and restored after; one graph serves any batch, length and rank.
- rope@1 (`rope`): x [B, H, T, D] and positions [B, T], with B, H (q and k have different head
  counts) and T dynamic. Dynamic NTK scaling derives its frequencies from max(positions), a
  data-dependent value the exporter freezes: refused.
- attention@1: two graphs around the cache, which stays the Python `LayerCache` protocol, exactly
  as the reference's `attention` orders it:
  `attention_project` (x, positions) -> q [B, H, T, D], k, v [B, T, Hkv, D] (the reference's
  `project`: QKV, clip, QK-norm, RoPE); then `cache.extend(pos, k=k, v=v)` in Python; then
  `attention_attend` (q, k_all, v_all, q_pos, k_pos) -> [B, T, d_model] (`attend`, `output`),
  its scores and P V accumulated in float64 (see `Graph.wide_products`).
- moe@1 (`moe_experts`): routing in torch (the catalogue's `route`: discrete top-k, and the
  `block.routing` statistics the reference sets); the experts in ONNX densely, every expert on
  every token, weighted by the routing matrix [N, E] that is zero where a token did not choose the
  expert, added in expert order: the reference's sum, an unchosen expert adding exactly 0. The
  price is E / top_k times the expert FLOPs. Capacity factors (token dropping by rank in token
  order) are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from llmkit.cache import LayerCache, as_positions
from llmkit.hookspecs import Target
from llmkit_blocks import attention as _attention
from llmkit_blocks import embedding as _embedding
from llmkit_blocks import mlp as _mlp
from llmkit_blocks import moe as _moe
from llmkit_blocks import norm as _norm
from llmkit_blocks import positional as _rope

from . import graphs
from .graphs import Graph

# Example sizes of the dynamic dims at export: >= 2 and pairwise distinct, so the tracer neither
# specialises a dim to 0/1 nor merges two of them.
_ROWS, _BATCH, _HEADS, _TOKENS, _KEYS = 13, 3, 5, 7, 11


def _randn(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def _positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length).expand(batch, length).contiguous()


def unsupported(config: Any, target: Target) -> Iterator[str]:
    """Reasons shared by every onnxrt impl."""
    if target.dtype == torch.bfloat16:
        yield ("bfloat16: onnxruntime's Python API exchanges tensors as numpy arrays, and numpy has "
               "no bfloat16")
    elif target.dtype == torch.float64:
        yield ("float64: the exporter stores the reference's Python scalars (multipliers, eps, scales) "
               "rounded to float32, and onnxruntime's CPU kernels lack float64 for some ops (Erf): "
               "errors of float32 size, which certification fails")


# --- token-wise kinds ----------------------------------------------------------------------------

NORM = Graph("norm", _norm.norm, ("x",), ("y",),
             lambda c, dt: (_randn(dt, _ROWS, c.dim),), ({0: "rows"},))
MLP = Graph("mlp", _mlp.mlp, ("x",), ("y",),
            lambda c, dt: (_randn(dt, _ROWS, c.d_model),), ({0: "rows"},))
HEAD = Graph("head", _embedding.head, ("x",), ("logits",),
             lambda c, dt: (_randn(dt, _ROWS, c.d_model),), ({0: "rows"},))
HEAD_TIED = Graph("head_tied", _embedding.head, ("x", "tied_weight"), ("logits",),
                  lambda c, dt: (_randn(dt, _ROWS, c.d_model), _randn(dt, c.vocab_size, c.d_model)),
                  ({0: "rows"}, {}))
EMBEDDING = Graph("embedding", _embedding.embedding, ("ids",), ("h",),
                  lambda c, dt: (torch.arange(_ROWS) % c.vocab_size,), ({0: "rows"},))


def norm_prepare(block: Any, target: Target) -> None:
    graphs.prepare(block, target, [NORM])


def norm_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    return block._onnxrt["norm"](block, x.reshape(-1, block.config.dim))[0].view(x.shape)


def mlp_prepare(block: Any, target: Target) -> None:
    graphs.prepare(block, target, [MLP])


def mlp_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    d = block.config.d_model
    return block._onnxrt["mlp"](block, x.reshape(-1, d))[0].view(*x.shape[:-1], d)


def head_prepare(block: Any, target: Target) -> None:
    graphs.prepare(block, target, [HEAD_TIED if block.config.tied else HEAD])


def head_forward(block: Any, x: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
    c = block.config
    _embedding.check_tied(c, tied_weight)
    rows = x.reshape(-1, c.d_model)
    if c.tied:
        logits = block._onnxrt["head_tied"](block, rows, tied_weight)[0]
    else:
        logits = block._onnxrt["head"](block, rows)[0]
    return logits.view(*x.shape[:-1], c.vocab_size)


def embedding_prepare(block: Any, target: Target) -> None:
    graphs.prepare(block, target, [EMBEDDING])


def embedding_forward(block: Any, ids: torch.Tensor) -> torch.Tensor:
    h = block._onnxrt["embedding"](block, ids.reshape(-1).long())[0]
    return h.view(*ids.shape, block.config.d_model)


# --- rope ----------------------------------------------------------------------------------------

ROPE = Graph("rope", _rope.rope, ("x", "positions"), ("y",),
             lambda c, dt: (_randn(dt, _BATCH, _HEADS, _TOKENS, c.head_dim), _positions(_BATCH, _TOKENS)),
             ({0: "batch", 1: "heads", 2: "tokens"}, {0: "batch", 1: "tokens"}))


def rope_unsupported(config: Any, target: Target) -> Iterator[str]:
    if isinstance(config.scaling, _rope.DynamicScaling):
        yield ("dynamic NTK scaling derives the frequencies from max(positions), a data-dependent value "
               "the exported graph would freeze at its trace-time value")


def rope_prepare(block: Any, target: Target) -> None:
    graphs.prepare(block, target, [ROPE])


def rope_forward(block: Any, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return block._onnxrt["rope"](block, x, positions.long())[0]


# --- attention: project | cache in Python | attend + output --------------------------------------



def _project_example(c: Any, dt: torch.dtype) -> tuple[torch.Tensor, ...]:
    return _randn(dt, _BATCH, _TOKENS, c.d_model), _positions(_BATCH, _TOKENS)


def _attend_example(c: Any, dt: torch.dtype) -> tuple[torch.Tensor, ...]:
    k_pos = _positions(_BATCH, _KEYS)
    return (_randn(dt, _BATCH, c.n_heads, _TOKENS, c.head_dim), _randn(dt, _BATCH, _KEYS, c.n_kv_heads, c.head_dim),
            _randn(dt, _BATCH, _KEYS, c.n_kv_heads, c.head_dim), k_pos[:, -_TOKENS:].contiguous(), k_pos)


PROJECT = Graph("attention_project", _attention.project, ("x", "positions"), ("q", "k", "v"),
                _project_example, ({0: "batch", 1: "tokens"}, {0: "batch", 1: "tokens"}))
ATTEND = Graph("attention_attend", _attention.attend_output, ("q", "k", "v", "q_pos", "k_pos"), ("y",), _attend_example,
               ({0: "batch", 2: "tokens"}, {0: "batch", 1: "keys"}, {0: "batch", 1: "keys"},
                {0: "batch", 1: "tokens"}, {0: "batch", 1: "keys"}), wide_products=True)


def attention_prepare(block: Any, target: Target) -> None:
    graphs.prepare(block, target, [PROJECT, ATTEND])


def attention_forward(block: Any, x: torch.Tensor, positions: torch.Tensor,
                      cache: LayerCache | None = None) -> torch.Tensor:
    b, t, _ = x.shape
    pos = as_positions(positions, b, t)
    q, k, v = block._onnxrt["attention_project"](block, x, pos)
    k_pos = pos
    if cache is not None:
        full, k_pos = cache.extend(pos, k=k, v=v)
        k, v = full["k"], full["v"]
    return block._onnxrt["attention_attend"](block, q, k, v, pos, k_pos)[0]


# --- moe: routing in torch, dense experts in ONNX ------------------------------------------------

def _dense_experts(block: Any, h: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """h [N, d], mix [N, E] (routing weight, 0 where not chosen) -> [N, d], experts in order."""
    c = block.config
    out = torch.zeros_like(h)
    for e in range(c.n_experts):
        w = mix[:, e, None]
        # where, not a product alone: an unchosen expert's inf or NaN times 0 would poison the sum
        out = out + torch.where(w != 0, _moe.expert(block, e, h) * w, 0.0)
    return _moe.add_shared(block, h, out)


EXPERTS = Graph("moe_experts", _dense_experts, ("h", "mix"), ("y",),
                lambda c, dt: (_randn(dt, _ROWS, c.d_model), _randn(dt, _ROWS, c.n_experts)),
                ({0: "rows"}, {0: "rows"}))


def moe_unsupported(config: Any, target: Target) -> Iterator[str]:
    if config.capacity_factor is not None:
        yield ("capacity_factor drops assignments by their rank in token order; the dense experts "
               "(every expert on every token) do not model dropping")


def moe_prepare(block: Any, target: Target) -> None:
    graphs.prepare(block, target, [EXPERTS])


def moe_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    c = block.config
    h = x.reshape(-1, c.d_model)
    logits, scores, selected, weights = _moe.route(block, h)
    mix = _moe.routing_matrix(selected, weights, c.n_experts, x.dtype)
    out = block._onnxrt["moe_experts"](block, h, mix)[0]
    _moe.record_routing(block, x, logits, scores, selected, weights)
    return out.view(x.shape)


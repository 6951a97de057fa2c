"""The `mlir` impls: each kind's reference computation compiled through MLIR (see engine.py).

- norm@1, mlp@1, head@1, rope@1: the reference forward is the compiled function.
- attention@1: two kernels around the cache, which stays the Python `LayerCache` protocol:
  A (x, positions) -> q, k, v  (the reference's `project`: QKV, clip, QK-norm, RoPE);
  `cache.extend(k, v)` in Python, as the reference does;
  B (q, k_all, v_all, q_pos, k_pos) -> output  (`attend`, then `output`).
- moe@1: routing runs in torch (the catalogue's `route`: discrete top-k and its statistics);
  the experts run in MLIR densely — every expert on every token, as batched contractions over the
  fused expert weights, then weighted by the routing matrix [N, E] that is zero where a token did
  not choose the expert — plus the shared expert. An unchosen expert contributes exactly 0, so
  this is the reference's sparse dispatch up to summation order; the price is E / top_k times the
  expert FLOPs, the gain a graph without data-dependent shapes.

Dynamic dims: the sequence dims (tokens, cached keys; MoE's flattened tokens) may be compiled as
`?` (engine.py: after a second shape), so one kernel serves every prompt length and every decode
step's growing cache. Batch, head counts and feature sizes are static, one kernel per value: when a
view merges two dynamic dims ([B, T, d] -> [B*T, d], inside every linear) the linalg lowering of
this torch-mlir miscompiles (it assumes the second is 1), so at most one dim of a tensor is left
dynamic.
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


def _tokens(*inputs: torch.Tensor) -> list[tuple[int, ...]]:
    """The first input's token dim (-2: [.., T, features], [B, H, T, D]) may vary; others are static."""
    x = inputs[0]
    return [(x.dim() - 2,) if x.dim() >= 2 else (), *([()] * (len(inputs) - 1))]


def prepare(block: Any, target: Target) -> None:
    graphs.prepare(block)


# --- norm, mlp, head, rope: the reference forward is the kernel ----------------------------------

NORM = Graph("norm", _norm.norm, _tokens)
MLP = Graph("mlp", _mlp.mlp, _tokens)
HEAD = Graph("head", _embedding.head, _tokens)
ROPE = Graph("rope", _rope.rope, lambda x, pos: [(2,), (1,)])


def norm_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    return graphs.run(block, NORM, x)[0]


def mlp_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    return graphs.run(block, MLP, x)[0]


def head_forward(block: Any, x: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
    _embedding.check_tied(block.config, tied_weight)
    inputs = (x,) if tied_weight is None else (x, tied_weight)
    return graphs.run(block, HEAD, *inputs)[0]


def rope_forward(block: Any, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return graphs.run(block, ROPE, x, positions)[0]


def rope_unsupported(config: Any, target: Target) -> Iterator[str]:
    if isinstance(config.scaling, _rope.DynamicScaling):
        yield ("dynamic NTK scaling derives the frequencies from max(positions), a data-dependent value "
               "the traced kernel cannot depend on")


# --- attention: project | cache in Python | attend + output --------------------------------------



PROJECT = Graph("attention.project", _attention.project, lambda x, pos: [(1,), (1,)])
ATTEND = Graph("attention.attend", _attention.attend_output, lambda q, k, v, q_pos, k_pos: [(2,), (1,), (1,), (1,), (1,)])


def attention_forward(block: Any, x: torch.Tensor, positions: torch.Tensor,
                      cache: LayerCache | None = None) -> torch.Tensor:
    b, t, _ = x.shape
    pos = as_positions(positions, b, t)
    q, k, v = graphs.run(block, PROJECT, x, pos)
    k_pos = pos
    if cache is not None:
        full, k_pos = cache.extend(pos, k=k, v=v)
        k, v = full["k"], full["v"]
    return graphs.run(block, ATTEND, q, k, v, pos, k_pos)[0]


# --- moe: routing in torch, dense experts in MLIR ------------------------------------------------

def _dense_experts(block: Any, h: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """h [N, d], mix [N, E] (routing weight, 0 where not chosen) -> [N, d]: mlp@1's formula for all
    experts at once, as batched contractions over the fused [E, ...] expert weights."""
    c = block.config
    up = torch.einsum("nd,ehd->enh", h, block.w_up)
    if c.expert_bias:
        up = up + block.b_up[:, None]
    if c.gated:
        gate = torch.einsum("nd,ehd->enh", h, block.w_gate)
        if c.expert_bias:
            gate = gate + block.b_gate[:, None]
        hidden = _mlp.activation(c.activation, gate) * up
    else:
        hidden = _mlp.activation(c.activation, up)
    y = torch.einsum("enh,edh->end", hidden, block.w_down)
    if c.expert_bias:
        y = y + block.b_down[:, None]
    return _moe.add_shared(block, h, torch.einsum("end,ne->nd", y, mix))


EXPERTS = Graph("moe.experts", _dense_experts, lambda h, mix: [(0,), (0,)])


def moe_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    c = block.config
    h = x.reshape(-1, c.d_model)
    logits, scores, selected, weights = _moe.route(block, h)
    mix = _moe.routing_matrix(selected, weights, c.n_experts, x.dtype)
    out = graphs.run(block, EXPERTS, h, mix)[0]
    _moe.record_routing(block, x, logits, scores, selected, weights)
    return out.reshape(x.shape)


def moe_unsupported(config: Any, target: Target) -> Iterator[str]:
    if config.capacity_factor is not None:
        yield ("capacity_factor drops assignments by their rank in token order, which dense experts "
               "(every expert on every token) do not model")

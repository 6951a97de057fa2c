"""Block-level forwards built on the kernels, with the exact signatures of the block kinds'
reference impls, ready to be registered as `Impl`s by the cuda and rocm plugins.

Each forward reads only `block.config` and the block's parameters (stateless, as the registry
requires); projections reuse the catalogue's own functions (`llmkit_blocks.attention.project` /
`output`, `llmkit_blocks.moe.add_shared` / `record_routing`), so only the step a kernel replaces
differs from the reference. For each kind: FEATURES (the feature flags the forward covers,
`BlockKind.features` names), MODES, and `*_unsupported(config, target)` yielding the reasons a
config is refused beyond those declarations (sizes, group-limited routing, quantisation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from llmkit.cache import LayerCache, as_positions
from llmkit.hookspecs import Target
from llmkit_blocks import attention as _attn
from llmkit_blocks import moe as _moe
from llmkit_blocks import positional as _rope

from .activation import gated_activation
from .attention import MAX_HEAD_DIM, flash_attention
from .moe import grouped_gemm, moe_align, router_topk
from .norm import MAX_DIM, rms_norm
from .rope import apply_rope, rope_tables
from .runtime import tile

DTYPES = frozenset({"float32", "float16", "bfloat16"})
"""Storage dtypes of every forward here. float64 is not claimed: the kernels accumulate in float32,
which cannot meet the float64 rule (16 ulps of the output)."""

_ACTS = {"act_silu", "act_gelu", "act_gelu_tanh", "act_relu"}

FEATURES: dict[str, frozenset[str]] = {
    "norm@1": frozenset({"rmsnorm", "layernorm", "cast_before_weight", "cast_after_weight", "unit_offset", "bias"}),
    "rope@1": frozenset({"interleaved", "partial_rotary", "scaling_linear", "scaling_dynamic", "scaling_yarn",
                         "scaling_llama3"}),
    "mlp@1": frozenset({"gated", "ungated", "bias"} | _ACTS),
    "attention@1": frozenset({"mqa", "gqa", "fused_qkv", "qkv_bias", "o_bias", "clip_qkv", "qk_norm", "softcap",
                              "sliding_window", "non_causal", "rope"}),
    "moe@1": frozenset({"gated", "ungated", "router_softmax", "router_sigmoid", "renormalize_sum",
                        "renormalize_none", "correction_bias", "routed_scaling", "jitter", "capacity",
                        "shared_expert", "shared_gate", "expert_bias", "load_balance_loss", "z_loss",
                        "seq_balance_loss"} | _ACTS),
}
"""Feature flags covered, per kind. Not covered: moe@1's `group_limited` (see moe_unsupported)."""

MODES: dict[str, frozenset[str]] = {
    "norm@1": frozenset({"infer", "train"}),
    "rope@1": frozenset({"infer", "train"}),
    "mlp@1": frozenset({"infer", "train"}),
    "attention@1": frozenset({"infer"}),
    "moe@1": frozenset({"infer"}),
}
"""train where the kernels have a backward (norm, rope, the gated activation); attention and MoE are
forward-only."""


def _quantised(target: Target) -> Iterator[str]:
    quant = target.fact("quant")
    if quant:
        yield f"weight-only quantisation (target fact quant={quant!r}) is not implemented by the Triton kernels"


# --- norm@1 ------------------------------------------------------------------------------------

def norm_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    """norm@1: RMSNorm or LayerNorm in one kernel per row (llmkit_triton.norm), float32 statistics."""
    c = block.config
    return rms_norm(x, block.weight, c.eps, bias=block.bias if c.bias else None, layer=c.type == "layer",
                    cast=c.cast, unit_offset=c.unit_offset)


def norm_unsupported(config: Any, target: Target) -> Iterator[str]:
    if config.dim > MAX_DIM:
        yield f"dim {config.dim} exceeds {MAX_DIM}: the kernel holds a whole row in one program"


# --- rope@1 ------------------------------------------------------------------------------------

def rope_prepare(block: Any, target: Target) -> None:
    """Compute the inverse frequencies once (float64, the catalogue's `inv_freq`); optional."""
    block._triton_inv_freq = _rope.inv_freq(block.config)


def rope_forward(block: Any, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """rope@1: x [B, H, T, head_dim] rotated by positions [B, T]; float32 cos/sin tables, one kernel."""
    positions = positions if positions.dim() == 2 else positions.unsqueeze(0)
    inv_freq = getattr(block, "_triton_inv_freq", None)
    if inv_freq is not None and inv_freq.device != positions.device:
        # moved once, at the first step on this device: a host-to-device copy inside every call
        # would fail CUDA-graph capture (capture_decode runs a step eagerly before capturing)
        inv_freq = block._triton_inv_freq = inv_freq.to(positions.device)
    cos, sin = rope_tables(block.config, positions, inv_freq)
    return apply_rope(x, cos, sin, interleaved=block.config.layout == "interleaved")


def rope_unsupported(config: Any, target: Target) -> Iterator[str]:
    """Nothing is refused: every layout, partial rotary and scaling is covered (frequencies and
    attention factor come from the catalogue on the host)."""
    yield from ()


# --- mlp@1 -------------------------------------------------------------------------------------

def mlp_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    """mlp@1: the projections as torch linears (cuBLAS / hipBLASLt), act(gate) * up in one kernel."""
    c = block.config
    up = F.linear(x, block.w_up, block.b_up if c.bias else None)
    if c.gated:
        gate = F.linear(x, block.w_gate, block.b_gate if c.bias else None)
        h = gated_activation(gate, up, c.activation)
    else:
        h = gated_activation(up, None, c.activation)
    return F.linear(h, block.w_down, block.b_down if c.bias else None)


def mlp_unsupported(config: Any, target: Target) -> Iterator[str]:
    yield from _quantised(target)


# --- attention@1 -------------------------------------------------------------------------------

def attention_forward(block: Any, x: torch.Tensor, positions: torch.Tensor,
                      cache: LayerCache | None = None) -> torch.Tensor:
    """attention@1: the catalogue's projections and cache, the attend step by the flash kernel."""
    c = block.config
    b, t, _ = x.shape
    pos = as_positions(positions, b, t)
    q, k, v = _attn.project(block, x, pos)
    k_pos = pos
    if cache is not None:
        full, k_pos = cache.extend(pos, k=k, v=v)
        k, v = full["k"], full["v"]
    o = flash_attention(q, k.transpose(1, 2), v.transpose(1, 2), pos, k_pos, scale=_attn.softmax_scale(c),
                        softcap=c.softcap, causal=c.causal, window=c.window, block_m=tile(64), block_n=tile(64))
    return _attn.output(block, o)


def attention_unsupported(config: Any, target: Target) -> Iterator[str]:
    if config.head_dim > MAX_HEAD_DIM:
        yield (f"head_dim {config.head_dim} exceeds {MAX_HEAD_DIM}: the kernel keeps a query tile of a whole "
               "head on chip")
    yield from _quantised(target)


# --- moe@1 -------------------------------------------------------------------------------------

def moe_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    """moe@1: fused router top-k, alignment by expert, two grouped GEMMs (gated activation fused
    into the first, routing weight into the second), the slots summed in float32."""
    c = block.config
    h = x.reshape(-1, c.d_model)
    n = h.shape[0]
    routed = h
    if block.training and c.jitter > 0:
        routed = h * torch.empty_like(h).uniform_(1.0 - c.jitter, 1.0 + c.jitter)
    logits = F.linear(routed, block.router)
    scores, selected, weights = router_topk(
        logits, c.top_k, scoring=c.scoring, correction_bias=block.correction_bias if c.correction_bias else None,
        renormalize=c.renormalize == "sum", routed_scaling=c.routed_scaling)
    capacity = None if c.capacity_factor is None else math.ceil(c.capacity_factor * n * c.top_k / c.n_experts)
    align = moe_align(selected, c.n_experts, tile(64), capacity)
    bias = c.expert_bias
    inner = grouped_gemm(h, block.w_up, align, a_div=c.top_k, bias=block.b_up if bias else None,
                         gate=block.w_gate if c.gated else None,
                         gate_bias=block.b_gate if bias and c.gated else None, activation=c.activation)
    rows = torch.zeros((n * c.top_k, c.d_model), dtype=torch.float32, device=x.device)
    grouped_gemm(inner, block.w_down, align, bias=block.b_down if bias else None, row_scale=weights.reshape(-1),
                 out=rows)
    out = rows.view(n, c.top_k, c.d_model).sum(dim=1).to(x.dtype)
    out = _moe.add_shared(block, h, out)
    _moe.record_routing(block, x, logits.to(scores.dtype), scores, selected, weights, capacity, align.counts)
    return out.reshape(x.shape)


def moe_unsupported(config: Any, target: Target) -> Iterator[str]:
    if config.n_group is not None:
        yield (f"group-limited routing (n_group={config.n_group}, topk_group={config.topk_group}) is not in "
               "the fused router top-k kernel")
    yield from _quantised(target)

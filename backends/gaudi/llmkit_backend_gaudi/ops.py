"""Gaudi impls on the SynapseAI fused ops. Written against the SynapseAI API, not yet certified on hardware.

API names and signatures follow HabanaAI/gaudi-pytorch-bridge (python_packages/habana_frameworks/
torch/hpex) and their use in optimum-habana and vllm-hpu-extension:
- `hpex.kernels.FusedSDPA.apply(q, k, v, attn_mask, dropout_p, is_causal, scale, softmax_mode)`:
  GQA handled inside (it regroups q by KV head); `attn_mask` additive, [B, 1, T, S].
- `hpex.normalization.FusedRMSNorm.apply(x, gamma, eps)` (`torch.ops.hpu.rms_norm`).
- `hpex.kernels.apply_rotary_pos_emb(p, cos, sin, position_ids, offset, mode)` with
  `RotaryPosEmbeddingMode.BLOCKWISE` (rotate-half) or `PAIRWISE` (interleaved pairs); cos/sin span
  the rotated width and broadcast over heads.
- `torch.ops.hpu.mixture_of_experts(hidden_states, expert_routing_table, router_weights, w1=gate,
  w2=up, w3=down, permuted_weights=True, activation, experts_min, experts_max)`: per-expert weight
  lists in nn.Linear layout, activations "silu" / "relu" / "gelu" (hpu_ops mixture_of_experts.cpp).

Each forward keeps the reference's contract (llmkit_blocks): the catalogue's projections, routing
and cache are reused, only the fused step differs.
"""

from __future__ import annotations

from typing import Any

import torch

from llmkit.cache import LayerCache, as_positions
from llmkit.hookspecs import Target
from llmkit_blocks import attention as _attn
from llmkit_blocks import moe as _moe
from llmkit_blocks import positional as _rope


def fused_sdpa_forward(block: Any, x: torch.Tensor, positions: torch.Tensor,
                       cache: LayerCache | None = None) -> torch.Tensor:
    """attention@1 through FusedSDPA: `is_causal` for plain prefill, an additive mask otherwise
    (padding, cached keys, windows); a query that sees no key outputs 0, as the reference."""
    from habana_frameworks.torch.hpex.kernels import FusedSDPA

    c = block.config
    b, t, _ = x.shape
    pos = as_positions(positions, b, t)
    q, k, v = _attn.project(block, x, pos)
    k_pos = pos
    if cache is not None:
        full, k_pos = cache.extend(pos, k=k, v=v)
        k, v = full["k"], full["v"]
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if c.n_kv_heads == 1 and c.n_heads > 1:
        # the bridge regroups q only when K/V have several heads (is_gqa); MQA is handed as MHA
        k, v = k.expand(-1, c.n_heads, -1, -1), v.expand(-1, c.n_heads, -1, -1)
    scale = _attn.softmax_scale(c)
    ok = _attn.visible(pos, k_pos, c.causal, c.window)[:, None]
    # the is_causal shortcut needs a host read of the mask; under lazy-mode tracing or
    # torch.compile the additive mask (exact for every case) is used instead
    plain = c.causal and c.window is None and k.shape[2] == t and not torch.compiler.is_compiling()
    if plain and bool((ok == _causal_pattern(t, ok.device)).all()):
        o = FusedSDPA.apply(q, k, v, None, 0.0, True, scale, "None")
    else:
        empty = ~ok.any(dim=-1, keepdim=True)
        mask = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill(~(ok | empty), torch.finfo(q.dtype).min)
        o = FusedSDPA.apply(q, k, v, mask, 0.0, False, scale, "None").masked_fill(empty, 0.0)
    return _attn.output(block, o)


def _causal_pattern(t: int, device: torch.device) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]


def fused_rms_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    """norm@1 (RMSNorm) through FusedRMSNorm, run in float32 so the statistics are float32 and the
    cast is where the config says: before the weight (gamma = 1, weight applied in the storage
    dtype, LlamaRMSNorm) or after it (gamma = w or 1 + w in float32, Gemma / Grok-1)."""
    from habana_frameworks.torch.hpex.normalization import FusedRMSNorm

    c = block.config
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    if c.cast == "before_weight":
        y = FusedRMSNorm.apply(h, h.new_ones(c.dim), c.eps).to(x.dtype)
        return y * (block.weight + 1 if c.unit_offset else block.weight)
    gamma = block.weight.to(acc) + 1 if c.unit_offset else block.weight.to(acc)
    return FusedRMSNorm.apply(h, gamma, c.eps).to(x.dtype)


def rope_prepare(block: Any, target: Target) -> None:
    """Inverse frequencies once, in float64 (dynamic NTK scaling recomputes them per call)."""
    block._gaudi_inv_freq = _rope.inv_freq(block.config)


def fused_rope_forward(block: Any, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """rope@1 through the fused rotary op: float32 angles, cos/sin scaled by the attention factor and
    cast to the storage dtype (as the reference), rotated width only; the rest passes through."""
    from habana_frameworks.torch.hpex.kernels import RotaryPosEmbeddingMode, apply_rotary_pos_emb

    c = block.config
    positions = positions if positions.dim() == 2 else positions.unsqueeze(0).expand(x.shape[0], -1)
    angle_dtype = torch.promote_types(x.dtype, torch.float32)
    if isinstance(c.scaling, _rope.DynamicScaling):
        inv = _rope.inv_freq(c, int(positions.max()) + 1)
    else:
        inv = block._gaudi_inv_freq
    angles = positions.to(angle_dtype)[:, None, :, None] * inv.to(device=x.device, dtype=angle_dtype)
    scale = _rope.attention_factor(c)
    cos, sin = (angles.cos() * scale).to(x.dtype), (angles.sin() * scale).to(x.dtype)
    if c.layout == "half":
        mode = RotaryPosEmbeddingMode.BLOCKWISE
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    else:
        mode = RotaryPosEmbeddingMode.PAIRWISE
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    d = _rope.rotary_dim(c)
    rotated = apply_rotary_pos_emb(x[..., :d], cos, sin, None, 0, mode)
    return torch.cat([rotated, x[..., d:]], dim=-1) if d < c.head_dim else rotated


def moe_op_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    """moe@1: the catalogue's router, then all experts in one `torch.ops.hpu.mixture_of_experts`
    call (gated experts, weights cast to the storage dtype before scaling, as the reference)."""
    c = block.config
    h = x.reshape(-1, c.d_model)
    logits, scores, selected, weights = _moe.route(block, h)
    out = torch.ops.hpu.mixture_of_experts(
        hidden_states=h, expert_routing_table=selected.to(torch.int64), router_weights=weights.to(h.dtype),
        w1=list(block.w_gate.unbind(0)), w2=list(block.w_up.unbind(0)), w3=list(block.w_down.unbind(0)),
        permuted_weights=True, activation=c.activation, experts_min=0, experts_max=c.n_experts - 1,
    )
    out = _moe.add_shared(block, h, out)
    _moe.record_routing(block, x, logits, scores, selected, weights)
    return out.reshape(x.shape)

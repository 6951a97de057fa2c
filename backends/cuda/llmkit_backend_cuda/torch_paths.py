"""PyTorch's own fused GPU paths, shared by the cuda and rocm plugins (both are torch device "cuda").

- `sdpa_forward` (`attention@1`): `F.scaled_dot_product_attention` restricted to the fused kernels
  a backend names (`SDPA_KERNELS`: FlashAttention-2, memory-efficient, cuDNN on NVIDIA), never the
  unfused math kernel, so a certified pass proves a fused kernel ran. The formula is the
  reference's (llmkit_blocks.attention): plain causal prefill uses `is_causal`; padding, cached
  keys and sliding windows use a boolean mask built per block of queries; a query that sees no key
  outputs 0 (SDPA would give NaN). Soft-capped logits cannot be expressed through SDPA: that
  config is left to the Triton kernel. GQA: `enable_gqa` on the causal half-precision path on
  NVIDIA sm_80+ (FlashAttention takes it); elsewhere K/V heads are repeated, since the
  memory-efficient kernel refuses grouped heads (PyTorch's sdp_utils: no GQA support) and flash
  needs sm_80, so on a T4 `enable_gqa` would leave no kernel. Under `torch.compile` the
  data-dependent shortcuts (plain causal, nothing masked) are skipped: the masked path is exact
  for every case and needs no host synchronisation.
- `fused_norm_forward` (`norm@1`): `F.rms_norm` / `F.layer_norm`, one fused CUDA kernel each, on
  the upcast input, with the reference's cast rule (before or after the weight).
- `grouped_moe_forward` (`moe@1`): the catalogue's router, then the N*k (token, expert) rows
  sorted by expert and three grouped GEMMs (`torch._grouped_mm`, public as `F.grouped_mm`) over
  the jagged groups: gate, up and down projections of every expert. PyTorch runs each as one
  CUTLASS launch on sm_90/sm_100 (and with CK on gfx942/gfx950); elsewhere its fallback copies
  the group offsets to the host and loops over the groups (exact, but a synchronisation per GEMM).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmkit.cache import LayerCache, as_positions
from llmkit.hookspecs import Impl, Target
from llmkit_blocks import attention as _attn
from llmkit_blocks import mlp as _mlp
from llmkit_blocks import moe as _moe

Reasons = Callable[[Any, Target], Iterator[str]]

CUDA_SDPA_KERNELS = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
"""Fused SDPA kernels on NVIDIA, in PyTorch's preference order."""
MASK_ELEMENTS = 1 << 24
"""Largest boolean mask (queries x keys) built at once: 16 MiB per batch row."""


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _flash_gqa(q: torch.Tensor) -> bool:
    """Whether SDPA may be handed grouped K/V heads (`enable_gqa`): FlashAttention on NVIDIA sm_80+."""
    return q.is_cuda and torch.version.hip is None and torch.cuda.get_device_capability(q.device) >= (8, 0)


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, *,
                scale: float, causal: bool, window: int | None,
                kernels: Sequence[SDPBackend] | None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D], positions [B, T] / [B, S] -> [B, H, T, D].

    `kernels` restricts SDPA to those fused kernels (None: PyTorch's own choice, which is how the
    masking logic is tested on a CPU)."""
    t, s = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    # no host reads while torch.compile traces or a CUDA graph captures the step
    tracing = torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    context = sdpa_kernel(list(kernels)) if kernels is not None else nullcontext()
    with context:
        plain = not tracing and causal and window is None and s == t and bool((q_pos >= 0).all())
        if plain and (t == 1 or bool((q_pos[:, 1:] > q_pos[:, :-1]).all())):
            if q.dtype in (torch.float16, torch.bfloat16) and (groups == 1 or _flash_gqa(q)):
                return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=scale, enable_gqa=groups > 1)
            kr, vr = _repeat_kv(k, v, groups)
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=t > 1, scale=scale)
        kr, vr = _repeat_kv(k, v, groups)
        step = max(1, MASK_ELEMENTS // s)
        outs = []
        for start in range(0, t, step):
            ok = _attn.visible(q_pos[:, start:start + step], k_pos, causal, window)[:, None]
            qs = q[:, :, start:start + step]
            if not tracing and bool(ok.all()):  # e.g. decode over a cache without window or padding: no mask
                outs.append(F.scaled_dot_product_attention(qs, kr, vr, scale=scale))
                continue
            empty = ~ok.any(dim=-1, keepdim=True)
            # a row that sees no key is unmasked for the kernel (no NaN) and zeroed after, as the reference
            o = F.scaled_dot_product_attention(qs, kr, vr, attn_mask=ok | empty, scale=scale)
            outs.append(o.masked_fill(empty, 0.0))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def make_sdpa_forward(kernels: Sequence[SDPBackend] | None) -> Callable[..., torch.Tensor]:
    """The `attention@1` forward restricted to `kernels` (one per backend: NVIDIA and ROCm differ)."""
    chosen = tuple(kernels) if kernels is not None else None

    def sdpa_forward(block: Any, x: torch.Tensor, positions: torch.Tensor,
                     cache: LayerCache | None = None) -> torch.Tensor:
        c = block.config
        b, t, _ = x.shape
        pos = as_positions(positions, b, t)
        q, k, v = _attn.project(block, x, pos)
        k_pos = pos
        if cache is not None:
            full, k_pos = cache.extend(pos, k=k, v=v)
            k, v = full["k"], full["v"]
        o = sdpa_attend(q, k.transpose(1, 2), v.transpose(1, 2), pos, k_pos, scale=_attn.softmax_scale(c),
                        causal=c.causal, window=c.window, kernels=chosen)
        return _attn.output(block, o)

    return sdpa_forward


def fused_norm_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm / LayerNorm statistics in float32 (float64 for float64) through one fused kernel."""
    c = block.config
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    shape = (c.dim,)
    if c.cast == "before_weight":
        h = F.rms_norm(h, shape, None, c.eps) if c.type == "rms" else F.layer_norm(h, shape, None, None, c.eps)
        w = block.weight + 1 if c.unit_offset else block.weight
        y = h.to(x.dtype) * w
        return y + block.bias if c.bias else y
    w = block.weight.to(acc) + 1 if c.unit_offset else block.weight.to(acc)
    if c.type == "rms":
        y = F.rms_norm(h, shape, w, c.eps)
    else:
        y = F.layer_norm(h, shape, w, block.bias.to(acc) if c.bias else None, c.eps)
    return y.to(x.dtype)


def _grouped(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of `a` [M, K] grouped by `offs` times the matching expert's w[e] [N, K] transposed."""
    return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)


def grouped_moe_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    """The reference's routing; experts as three grouped GEMMs over the expert-sorted rows."""
    c = block.config
    h = x.reshape(-1, c.d_model)
    logits, scores, selected, weights = _moe.route(block, h)
    flat = selected.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=c.n_experts)
    offs = counts.cumsum(0).to(torch.int32)
    expert_of_row = flat[order]
    rows = h.index_select(0, order // c.top_k)
    bias = c.expert_bias
    up = _grouped(rows, block.w_up, offs)
    if bias:
        up = up + block.b_up[expert_of_row]
    if c.gated:
        gate = _grouped(rows, block.w_gate, offs)
        if bias:
            gate = gate + block.b_gate[expert_of_row]
        act = _mlp.activation(c.activation, gate) * up
    else:
        act = _mlp.activation(c.activation, up)
    y = _grouped(act, block.w_down, offs)
    if bias:
        y = y + block.b_down[expert_of_row]
    mix = weights.reshape(-1)[order].to(x.dtype)[:, None]
    out = torch.zeros_like(h).index_add_(0, order // c.top_k, y * mix)
    out = _moe.add_shared(block, h, out)
    _moe.record_routing(block, x, logits, scores, selected, weights, None, counts)
    return out.reshape(x.shape)


def impls(backend: str, *, sdpa_kernels: Sequence[SDPBackend], sdpa_dtypes: set[str], sdpa_summary: str,
          attention_features: set[str], moe_features: set[str], sdpa_unsupported: Reasons,
          norm_unsupported: Reasons, moe_unsupported: Reasons) -> list[Impl]:
    """The PyTorch-path impls of a GPU backend on torch's "cuda" device type (NVIDIA or ROCm):
    fused SDPA restricted to `sdpa_kernels`, fused norms, grouped-GEMM MoE (bf16)."""
    return [
        Impl(kind="attention@1", backend=backend, name="sdpa", forward=make_sdpa_forward(sdpa_kernels),
             device_types={"cuda"}, dtypes=sdpa_dtypes, features=attention_features,
             priority=30, not_supported_reasons=sdpa_unsupported, summary=sdpa_summary),
        Impl(kind="norm@1", backend=backend, name="fused", forward=fused_norm_forward,
             device_types={"cuda"}, dtypes={"float16", "bfloat16", "float32", "float64"}, features={"*"},
             priority=20, not_supported_reasons=norm_unsupported,
             summary="F.rms_norm / F.layer_norm fused kernels, float32 statistics"),
        Impl(kind="moe@1", backend=backend, name="grouped", forward=grouped_moe_forward,
             device_types={"cuda"}, dtypes={"bfloat16"}, features=moe_features, priority=30,
             not_supported_reasons=moe_unsupported,
             summary="reference router; experts as three torch._grouped_mm calls over expert-sorted rows"),
    ]

"""Flash-style attention forward with online softmax, attention@1's `attend` semantics
(llmkit_blocks.attention), after FlashAttention-2 (Dao 2023, Algorithm 1) and Milakov &
Gimelshein's online softmax.

    s_ij = scale * q_i . k_j;  soft-cap: s = cap * tanh(s / cap) (Grok-1, Gemma-2)
    query i sees key j iff p_i >= 0 and p_j >= 0 (a negative position is padding), p_j <= p_i
    (causal) and p_i - p_j < W (sliding window of W keys including itself)
    o_i = sum_j softmax_j(s_ij) v_j over the visible keys; a query that sees no key outputs 0.
GQA/MQA: query head h reads KV head h // (H / Hkv), without copying K or V.

Positions are explicit ([B, T] for queries, [B, S] for keys), so prefill, decode over a longer
cache (query positions offset), chunked prefill and left padding are one kernel. One program per
(block of BLOCK_M queries, batch x head); it walks the keys in blocks of BLOCK_N keeping the running
max m, denominator l and accumulator in float32:
    m' = max(m, rowmax(s)),  p = exp(s - m'),  l' = l e^(m - m') + rowsum(p),  acc' = acc e^(m - m') + p V
and skips a key block with no visible key. Rows that have seen nothing keep m = -inf and subtract 0
instead (no NaN). Scores, soft-cap, softmax and accumulator are float32; operands of the two dots
follow `runtime.upcast_dots` (float32 IEEE, or float16/bfloat16 tensor-core tiles with P rounded
to V's dtype as FlashAttention-2 does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import jitlib
from .runtime import block_size, check_dtype, upcast_dots

MAX_HEAD_DIM = 256
"""Largest q/k and v head dim: a [BLOCK_M, head_dim] tile of each stays on chip (FlashAttention-2's limit)."""


@triton.jit
def _flash_fwd(Q, K, V, O, QP, KP,
               sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot, sqpb, sqpt, skpb, skps,
               H, GROUP, T, S, D, DV, scale, softcap, window,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)  # int64: b * skb passes 2^31 for a long batched cache
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    qp = tl.load(QP + b * sqpb + offs_m * sqpt, mask=m_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        kp = tl.load(KP + b * skpb + offs_n * skps, mask=n_ok, other=-1)
        seen = (qp[:, None] >= 0) & (kp[None, :] >= 0)
        if CAUSAL:
            seen = seen & (kp[None, :] <= qp[:, None])
        if HAS_WINDOW:
            seen = seen & (qp[:, None] - kp[None, :] < window)
        if tl.max(tl.max(seen.to(tl.int32), axis=1), axis=0) > 0:
            k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :],
                        mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0)
            s = jitlib.dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST) * scale
            if HAS_SOFTCAP:
                s = softcap * jitlib.tanh(s / softcap)
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * svs + offs_dv[None, :],
                        mask=n_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
            if UPCAST:
                pv = p
            else:
                pv = jitlib.round_to(p, v.dtype)
            acc = jitlib.dot(pv, v, acc * alpha[:, None], UPCAST)
            m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_dv[None, :], jitlib.round_to(out, O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv < DV)[None, :])


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    *, scale: float, softcap: float | None = None, causal: bool = True,
                    window: int | None = None, block_m: int = 16, block_n: int = 16) -> torch.Tensor:
    """q [B, H, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (any strides, e.g. transposed views of the
    token-major cache), positions q_pos [B, T] and k_pos [B, S] (int; negative = padding)
    -> o [B, H, T, Dv] in q's dtype. The signature and semantics of `llmkit_blocks.attention.attend`.

    block_m/block_n are the query and key tile sizes (powers of two >= 16): small for the
    interpreter, 64-128 on a GPU.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
    b, h, t, d = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[-1]
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if h % hkv or k.shape[0] != b or k.shape[-1] != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "q [B, H, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] with H a multiple of Hkv")
    if max(d, dv) > MAX_HEAD_DIM:
        raise ValueError(f"head dim {max(d, dv)} exceeds the kernel's MAX_HEAD_DIM {MAX_HEAD_DIM}")
    if tuple(q_pos.shape) != (b, t) or tuple(k_pos.shape) != (b, s):
        raise ValueError(f"positions {tuple(q_pos.shape)} / {tuple(k_pos.shape)} must be [{b}, {t}] / [{b}, {s}]")
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    o = torch.empty((b, h, t, dv), dtype=q.dtype, device=q.device)
    if o.numel():
        grid = (triton.cdiv(t, block_m), b * h)
        _flash_fwd[grid](
            q, k, v, o, q_pos, k_pos,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            q_pos.stride(0), q_pos.stride(1), k_pos.stride(0), k_pos.stride(1),
            h, h // hkv, t, s, d, dv, float(scale), float(softcap or 1.0), int(window or 0),
            CAUSAL=causal, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
            UPCAST=upcast_dots(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_size(d), BLOCK_DV=block_size(dv))
    return o

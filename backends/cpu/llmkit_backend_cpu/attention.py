"""CPU attention impls for `attention@1`: PyTorch's SDPA where its semantics fit, and a chunked
online-softmax (flash-style) kernel for what SDPA cannot express (logit soft-cap) and for long
contexts under a mask.

Both compute the reference's formula (llmkit_blocks.attention): scores = q k^T * scale,
optionally c * tanh(scores / c), masked where a key is padding, in the future (causal) or
`window` or more positions behind the query; softmax over keys; rows that see no key give 0.

- `cpu.sdpa`: `F.scaled_dot_product_attention` with native GQA (`enable_gqa`). Without cache,
  padding or window (positions increasing along each row) it uses `is_causal`, which runs PyTorch's
  CPU flash kernel in O(T) extra memory; otherwise a boolean mask built per block of queries, so
  the mask never exceeds `_MASK_ELEMENTS`. A decode step over a long cache is two grouped GEMMs.
- `cpu.flash`: queries and keys in blocks of `_CHUNK`; a running max m, denominator l and
  accumulator per query (Milakov & Gimelshein 2018, FlashAttention): extra memory
  O(B * H * chunk * chunk) whatever the length. Blocks with no visible key are skipped (causal
  and window structure). Scores, exp and the accumulator are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmkit.cache import LayerCache, as_positions
from llmkit_blocks import attention as _attn

from .quant import grouped, linear, quantize

_QKV = ("wq", "wk", "wv")

_CHUNK = 512
_DECODE_GEMM_KEYS = 256
"""Above this many keys a one-query step uses two grouped GEMMs: SDPA's CPU kernel scales badly
there (bf16, 9 heads, AVX-512 VM: 0.28 ms vs 0.08 ms at 512 keys, 1.1 ms vs 0.13 ms at 2048; at
64 keys SDPA wins, 0.05 ms vs 0.07 ms)."""
_MASK_ELEMENTS = 1 << 24
"""Largest boolean mask (queries x keys) `cpu.sdpa` builds at once: 16 MiB per batch row."""


def _project(block: Any, x: torch.Tensor, pos: torch.Tensor,
             cache: LayerCache | None) -> tuple[torch.Tensor, ...]:
    """q [B, H, T, D], k and v [B, Hkv, S, D] (cached + new, in the cache's storage dtype: the
    callers convert them, `_decode` and `flash_attend` straight to their float32 sums) and key
    positions [B, S]. The values the cache gives back are the model's own, rounded to the storage
    dtype, so converting them straight to float32 gives what converting them to the model's
    dtype first gives (bar values beyond a float16 cache's range under a bfloat16 model)."""
    q, k, v = _attn.project(block, x, pos, grouped(block, _QKV, x))
    k_pos = pos
    if cache is not None:
        full, k_pos = cache.extend_stored(pos, k=k, v=v)
        k, v = full["k"], full["v"]
    return q, k.transpose(1, 2), v.transpose(1, 2), k_pos


def prepare(block: Any, target: Any) -> None:
    """Pack the projections when the target asks for it (q, k and v as one matrix)."""
    names = ["wqkv", "wo"] if block.config.fused_qkv else [_QKV, "wo"]
    quantize(block, names, target)


def sdpa_forward(block: Any, x: torch.Tensor, positions: torch.Tensor,
                 cache: LayerCache | None = None) -> torch.Tensor:
    c = block.config
    b, t, _ = x.shape
    pos = as_positions(positions, b, t)
    q, k, v, k_pos = _project(block, x, pos, cache)
    gqa = c.n_heads != c.n_kv_heads
    scale = _attn.softmax_scale(c)
    compiling = torch.compiler.is_compiling()
    if t == 1 and (compiling or k.shape[2] > _DECODE_GEMM_KEYS):
        # inside a compiled step always: it has no data-dependent branch, which would break the graph
        o = _decode(q, k, v, pos, k_pos, scale, c.causal, c.window, compiled=compiling)
        return _attn.output(block, o, linear)
    k, v = k.to(q.dtype), v.to(q.dtype)
    plain = c.causal and c.window is None and k.shape[2] == t and bool((pos >= 0).all())
    if plain and (t == 1 or bool((pos[:, 1:] > pos[:, :-1]).all())):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=scale, enable_gqa=gqa)
        return _attn.output(block, o, linear)
    s = k.shape[2]
    step = max(1, _MASK_ELEMENTS // s)
    outs = []
    for start in range(0, t, step):
        ok = _attn.visible(pos[:, start:start + step], k_pos, c.causal, c.window)[:, None]
        qs = q[:, :, start:start + step]
        if bool(ok.all()):
            outs.append(F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=gqa))
            continue
        # a row that sees no key (a padding query) would be NaN under SDPA; the reference gives 0
        empty = ~ok.any(dim=-1, keepdim=True)
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=ok | empty, scale=scale, enable_gqa=gqa)
        outs.append(o.masked_fill(empty, 0.0))
    return _attn.output(block, outs[0] if len(outs) == 1 else torch.cat(outs, dim=2), linear)


def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
            scale: float, causal: bool, window: int | None, compiled: bool = False) -> torch.Tensor:
    """One query per row over the cache: the g query heads of a KV head against its keys (no K/V
    copies), in float32 (float64 for float64 inputs): the reference promotes the scores to float32
    anyway, and without native bf16/fp16 instructions (AVX2) PyTorch's half-precision batched GEMMs
    are 3-8x slower than upcasting K and V and running float32 ones.

    Eager: two [g, S] GEMMs. `compiled` (inside a traced decode step): the same sums written as
    products and reductions, which inductor fuses into loops that read the cache once (upcasting in
    registers); for SmolLM2's 30 layers at 570 keys 3.8-4.5 ms a step against 6.6-7.6 ms for the
    GEMMs on their strided cache views (AVX2 VM), 19-20 against 28 ms at 3000 keys. It also masks
    unconditionally: a data-dependent branch would break the graph."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    out_dtype = q.dtype
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    qg = q.view(b, hkv, h // hkv, d)
    if compiled:
        scores = (qg[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1) * scale  # [B, Hkv, g, S]
    else:
        scores = torch.matmul(qg, k.transpose(-1, -2)) * scale
    ok = _attn.visible(q_pos, k_pos, causal, window)[:, None]  # [B, 1, 1, S]
    everything = False if compiled else bool(ok.all())
    if not everything:
        scores = scores.masked_fill(~ok, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if not everything:
        probs = probs.masked_fill(~ok.any(dim=-1, keepdim=True), 0.0)  # a padding query sees nothing
    o = (probs[..., None] * v[:, :, None, :, :]).sum(-2) if compiled else torch.matmul(probs, v)
    return o.to(out_dtype).view(b, h, 1, v.shape[-1])


def flash_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 *, scale: float, softcap: float | None, causal: bool, window: int | None,
                 chunk: int = _CHUNK) -> torch.Tensor:
    """q [B, H, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] -> [B, H, T, Dv], chunked online softmax."""
    b, h, t, d = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    # GQA without copying K/V: the g query heads of a KV head become extra query rows
    qg = q.view(b, hkv, g, t, d)
    out = q.new_empty(b, hkv, g, t, dv)
    for qs in range(0, t, chunk):
        qb = qg[:, :, :, qs:qs + chunk].to(acc_dtype).reshape(b, hkv, -1, d)
        qpb = q_pos[:, qs:qs + chunk]
        n = qpb.shape[1]
        m = qb.new_full((b, hkv, g * n), float("-inf"))
        den = qb.new_zeros((b, hkv, g * n))
        acc = qb.new_zeros((b, hkv, g * n, dv))
        for ks in range(0, s, chunk):
            ok = _attn.visible(qpb, k_pos[:, ks:ks + chunk], causal, window)
            if not bool(ok.any()):
                continue
            kb = k[:, :, ks:ks + chunk].to(acc_dtype)
            vb = v[:, :, ks:ks + chunk].to(acc_dtype)
            scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            ok = ok[:, None, None].expand(b, 1, g, n, -1).reshape(b, 1, g * n, -1)
            scores = scores.masked_fill(~ok, float("-inf"))
            m_new = torch.maximum(m, scores.amax(dim=-1))
            # rows with nothing visible yet keep m = -inf; subtract 0 there instead (no NaN)
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(scores - m_safe[..., None])
            correction = torch.exp(m - m_safe)
            den = den * correction + p.sum(dim=-1)
            acc = acc * correction[..., None] + torch.matmul(p, vb)
            m = m_new
        o = acc / torch.where(den == 0, torch.ones_like(den), den)[..., None]
        out[:, :, :, qs:qs + chunk] = o.view(b, hkv, g, n, dv).to(out.dtype)
    return out.view(b, h, t, dv)


def flash_forward(block: Any, x: torch.Tensor, positions: torch.Tensor,
                  cache: LayerCache | None = None) -> torch.Tensor:
    c = block.config
    b, t, _ = x.shape
    pos = as_positions(positions, b, t)
    q, k, v, k_pos = _project(block, x, pos, cache)
    o = flash_attend(q, k, v, pos, k_pos, scale=_attn.softmax_scale(c), softcap=c.softcap, causal=c.causal, window=c.window)
    return _attn.output(block, o, linear)

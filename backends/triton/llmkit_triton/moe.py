"""Mixture-of-experts kernels: a fused router top-k, token alignment by expert, and a grouped expert
GEMM over the aligned tokens — the structure of vLLM's fused_moe (moe_align_block_size, then one
GEMM launch covering every expert), written for moe@1's semantics (llmkit_blocks.moe).

Router (`router_topk`), per token, from the router logits [N, E] (computed in the storage dtype,
as the reference does):
    s = softmax(logits) | sigmoid(logits)     float32
    c = s + correction_bias                   chooses only (DeepSeek-V3)
    chosen = top_k of c (k rounds of argmax; a tie goes to the lower expert id)
    w = s[chosen];  w = w / sum(w) when renormalize == "sum";  w = routed_scaling * w
Group-limited routing (n_group / topk_group) is not fused.

Alignment (`moe_align`), for the N * k (token, slot) assignments a = token * k + slot:
    count each expert's assignments (per chunk of CHUNK assignments, then a prefix over chunks),
    keep the first `capacity` of each expert in assignment order (Switch Transformer), pad every
    expert's run to a multiple of BLOCK_M, and scatter: sorted_ids[start_e + rank] = a, where rank
    is the assignment's rank among its expert's assignments (stable: token order is kept).
    Padding slots hold the sentinel N * k; expert_ids[i] names the expert of the i-th BLOCK_M rows.
Grouped GEMM (`grouped_gemm`): one program per (block of BLOCK_M aligned rows, BLOCK_N outputs);
all rows of a block belong to one expert e, so it reads W[e] once for them:
    out[a] = epilogue(A[a // a_div] @ W[e]^T + bias[e])
with an optional second weight (the gate) for the fused gated epilogue act(A Wg^T + bg) * (A W^T + b)
and an optional per-row scale (the routing weight). Blocks past the padded total exit at once, so
the grid is sized without reading the total back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import jitlib
from .runtime import check_dtype, upcast_dots

_CHUNK = 256
"""Assignments counted and scattered by one alignment program."""


@triton.jit
def _router_topk(L, BIAS, SCORES, SEL, WTS, E, stride_l, scaling,
                 K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr,
                 HAS_BIAS: tl.constexpr, RENORM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    logit = tl.load(L + row * stride_l + e, mask=e_ok, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        s = jitlib.sigmoid(logit)
    else:
        p = tl.exp(logit - tl.max(logit, axis=0))
        s = p / tl.sum(p, axis=0)
    s = tl.where(e_ok, s, 0.0)
    tl.store(SCORES + row * E + e, s, mask=e_ok)
    choice = s
    if HAS_BIAS:
        choice = choice + tl.load(BIAS + e, mask=e_ok, other=0.0).to(tl.float32)
    choice = tl.where(e_ok, choice, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    picked = tl.zeros([BLOCK_K], dtype=tl.int32)
    weight = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(K):
        _, idx = tl.max(choice, axis=0, return_indices=True, return_indices_tie_break_left=True)
        hit = e == idx
        picked = tl.where(slots == j, idx, picked)
        weight = tl.where(slots == j, tl.sum(tl.where(hit, s, 0.0), axis=0), weight)
        choice = tl.where(hit, float("-inf"), choice)
    if RENORM:
        weight = weight / tl.sum(weight, axis=0)
    k_ok = slots < K
    tl.store(SEL + row * K + slots, picked, mask=k_ok)
    tl.store(WTS + row * K + slots, weight * scaling, mask=k_ok)


@triton.jit
def _moe_count(IDS, COUNTS, M, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    p = tl.program_id(0)
    offs = p * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(IDS + offs, mask=offs < M, other=-1)
    e = tl.arange(0, BLOCK_E)
    onehot = (ids[:, None] == e[None, :]).to(tl.int32)
    tl.store(COUNTS + p * E + e, tl.sum(onehot, axis=0), mask=e < E)


@triton.jit
def _moe_offsets(COUNTS, PREFIX, TOTALS, STARTS, ENDS, PADDED, P, E, capacity,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, HAS_CAPACITY: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    running = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p in range(0, P):
        tl.store(PREFIX + p * E + e, running, mask=e_ok)
        running += tl.load(COUNTS + p * E + e, mask=e_ok, other=0)
    tl.store(TOTALS + e, running, mask=e_ok)
    kept = running
    if HAS_CAPACITY:
        kept = tl.minimum(kept, capacity)
    padded = (kept + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(STARTS + e, ends - padded, mask=e_ok)
    tl.store(ENDS + e, ends, mask=e_ok)
    tl.store(PADDED, tl.sum(padded, axis=0))


@triton.jit
def _moe_scatter(IDS, PREFIX, STARTS, SORTED, M, E, capacity,
                 CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, HAS_CAPACITY: tl.constexpr):
    p = tl.program_id(0)
    offs = p * CHUNK + tl.arange(0, CHUNK)
    ok = offs < M
    ids = tl.load(IDS + offs, mask=ok, other=-1)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    onehot = (ids[:, None] == e[None, :]).to(tl.int32)
    before = tl.load(PREFIX + p * E + e, mask=e_ok, other=0)
    start = tl.load(STARTS + e, mask=e_ok, other=0)
    rank = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - 1 + before[None, :]), axis=1)
    keep = ok
    if HAS_CAPACITY:
        keep = keep & (rank < capacity)
    tl.store(SORTED + tl.sum(onehot * start[None, :], axis=1) + rank, offs, mask=keep)


@triton.jit
def _moe_block_experts(ENDS, EXPERT_IDS, n_blocks, E, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_E: tl.constexpr):
    blocks = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    e = tl.arange(0, BLOCK_E)
    ends = tl.load(ENDS + e, mask=e < E, other=2147483647)
    expert = tl.sum((ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
    tl.store(EXPERT_IDS + blocks, tl.where(expert < E, expert, -1), mask=blocks < n_blocks)


@triton.jit
def _moe_gemm(A, W, WG, BIAS, BIASG, SCALE, OUT, SORTED, EXPERT_IDS, PADDED,
              N_OUT, K_IN, M, a_div, stride_a, swe, swn, swk, sbe, stride_out,
              ACT: tl.constexpr, GATED: tl.constexpr, HAS_ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    if pid_m * BLOCK_M < tl.load(PADDED):
        # int64: e * swe (an expert's weight stride) passes 2^31 in large MoEs (160 x 6144 x 2560)
        e = tl.load(EXPERT_IDS + pid_m).to(tl.int64)
        rows = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < M
        a_rows = tl.where(row_ok, rows // a_div, 0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_OUT
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K_IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K_IN
            a = tl.load(A + a_rows[:, None] * stride_a + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w_off = e * swe + offs_n[None, :] * swn + offs_k[:, None] * swk
            w_ok = k_ok[:, None] & n_ok[None, :]
            acc = jitlib.dot(a, tl.load(W + w_off, mask=w_ok, other=0.0), acc, UPCAST)
            if GATED:
                acc_g = jitlib.dot(a, tl.load(WG + w_off, mask=w_ok, other=0.0), acc_g, UPCAST)
        if HAS_BIAS:
            acc += tl.load(BIAS + e * sbe + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_g += tl.load(BIASG + e * sbe + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc = jitlib.activation(acc_g, ACT) * acc
        elif HAS_ACT:
            acc = jitlib.activation(acc, ACT)
        if HAS_SCALE:
            acc = acc * tl.load(SCALE + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(OUT + rows[:, None] * stride_out + offs_n[None, :], jitlib.round_to(acc, OUT.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def router_topk(logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
                correction_bias: torch.Tensor | None = None, renormalize: bool = True,
                routed_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> scores [N, E] (float32), selected [N, k] (int64), weights [N, k]
    (float32), as moe@1's `route` computes them (without group-limited routing)."""
    check_dtype("logits", logits)
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    n, e = logits.shape
    if not 0 < top_k <= e:
        raise ValueError(f"top_k {top_k} must be in 1..{e}")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    scores = torch.empty((n, e), dtype=torch.float32, device=logits.device)
    selected = torch.empty((n, top_k), dtype=torch.int32, device=logits.device)
    weights = torch.empty((n, top_k), dtype=torch.float32, device=logits.device)
    if n:
        bias = correction_bias.to(torch.float32).contiguous() if correction_bias is not None else scores
        _router_topk[(n,)](logits, bias, scores, selected, weights, e, logits.stride(0), float(routed_scaling),
                           K=top_k, BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k),
                           SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None,
                           RENORM=renormalize)
    return scores, selected.long(), weights


@dataclass(frozen=True)
class Alignment:
    """The (token, slot) assignments grouped by expert, each expert's run padded to `block_m` rows."""

    sorted_ids: torch.Tensor
    """[max_padded] int32 assignment ids a = token * top_k + slot; padding = the sentinel N * top_k."""
    expert_ids: torch.Tensor
    """[max_padded / block_m] int32: the expert of each block of rows (-1 past the padded total)."""
    padded: torch.Tensor
    """[1] int32 on the device: rows in use (the sum of the padded runs)."""
    counts: torch.Tensor
    """[E] int64: assignments per expert before capacity dropping."""
    block_m: int
    assignments: int
    """N * top_k."""


def moe_align(selected: torch.Tensor, n_experts: int, block_m: int, capacity: int | None = None) -> Alignment:
    """Group the assignments of `selected` [N, k] by expert (stable), keeping each expert's first
    `capacity` assignments when given, each run padded to a multiple of block_m (module docstring)."""
    ids = selected.reshape(-1).to(torch.int32).contiguous()
    m, dev = ids.numel(), ids.device
    chunks = max(1, triton.cdiv(m, _CHUNK))
    block_e = triton.next_power_of_2(n_experts)
    counts = torch.empty((chunks, n_experts), dtype=torch.int32, device=dev)
    prefix = torch.empty_like(counts)
    totals = torch.empty(n_experts, dtype=torch.int32, device=dev)
    starts = torch.empty_like(totals)
    ends = torch.empty_like(totals)
    padded = torch.empty(1, dtype=torch.int32, device=dev)
    max_padded = m + n_experts * (block_m - 1)
    n_blocks = triton.cdiv(max_padded, block_m)
    sorted_ids = torch.full((n_blocks * block_m,), m, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=dev)
    has_cap = capacity is not None
    _moe_count[(chunks,)](ids, counts, m, n_experts, CHUNK=_CHUNK, BLOCK_E=block_e)
    _moe_offsets[(1,)](counts, prefix, totals, starts, ends, padded, chunks, n_experts, int(capacity or 0),
                       BLOCK_M=block_m, BLOCK_E=block_e, HAS_CAPACITY=has_cap)
    _moe_scatter[(chunks,)](ids, prefix, starts, sorted_ids, m, n_experts, int(capacity or 0),
                            CHUNK=_CHUNK, BLOCK_E=block_e, HAS_CAPACITY=has_cap)
    block_b = 64
    _moe_block_experts[(triton.cdiv(n_blocks, block_b),)](ends, expert_ids, n_blocks, n_experts,
                                                          BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_E=block_e)
    return Alignment(sorted_ids, expert_ids, padded, totals.long(), block_m, m)


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, align: Alignment, *, a_div: int = 1,
                 bias: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                 gate_bias: torch.Tensor | None = None, activation: str | None = None,
                 row_scale: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    """Per aligned row a (assignment id): out[a] = A[a // a_div] @ w[e]^T (+ bias[e]) for its expert e.

    a [rows, K]; w (and gate) [E, N_out, K] (nn.Linear's [out, in] per expert); bias [E, N_out].
    With `gate`: out = act(A gate[e]^T + gate_bias[e]) * (A w[e]^T + bias[e]), the fused gated
    expert; without it, `activation` (if given) is applied to the result. `row_scale` [assignments]
    multiplies each row (the routing weight). Rows that alignment dropped or padded are not written:
    pass a zeroed `out` [assignments, N_out] when they are read later.
    """
    check_dtype("a", a)
    e, n_out, k_in = w.shape
    if a.shape[-1] != k_in or w.dtype != a.dtype or (gate is not None and gate.shape != w.shape):
        raise ValueError(f"a {tuple(a.shape)} {a.dtype} does not fit w {tuple(w.shape)} {w.dtype}"
                         + (f" / gate {tuple(gate.shape)}" if gate is not None else ""))
    if activation is not None and activation not in jitlib.ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(jitlib.ACTIVATIONS)}")
    if gate is not None and activation is None:
        raise ValueError("a gated expert needs its activation")
    a = a.contiguous()
    w = w.contiguous()
    gate = gate.contiguous() if gate is not None else None
    if out is None:
        out = torch.empty((align.assignments, n_out), dtype=a.dtype, device=a.device)
    if bias is not None:
        bias = bias.contiguous()
        gate_bias = gate_bias.contiguous() if gate_bias is not None else None
    if (gate is not None) and ((bias is None) != (gate_bias is None)):
        raise ValueError("give both bias and gate_bias, or neither")
    if align.assignments and n_out:
        grid = (align.expert_ids.numel(), triton.cdiv(n_out, block_n))
        _moe_gemm[grid](
            a, w, gate if gate is not None else w, bias if bias is not None else w,
            gate_bias if gate_bias is not None else w, row_scale if row_scale is not None else w, out,
            align.sorted_ids, align.expert_ids, align.padded,
            n_out, k_in, align.assignments, a_div, a.stride(0), w.stride(0), w.stride(1), w.stride(2),
            bias.stride(0) if bias is not None else 0, out.stride(0),
            ACT=jitlib.ACTIVATIONS[activation] if activation else 0, GATED=gate is not None,
            HAS_ACT=activation is not None, HAS_BIAS=bias is not None, HAS_SCALE=row_scale is not None,
            UPCAST=upcast_dots(a.dtype), BLOCK_M=align.block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out

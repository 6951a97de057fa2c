"""Multi-process execution on torch.distributed: tensor, expert and context parallel.

A model is built whole on every rank (same spec, same seed or the same checkpoint), then `shard`
cuts each block down to this rank's part and wraps its forward with the collective that makes the
part whole again. A shard of a block is itself a block of the same kind with a smaller config, so
whatever impl the plan bound (cpu, onnxrt, a vendor's) keeps running on it unchanged; only the
collectives are added. Semantics follow Megatron-LM (Shoeybi et al. 2019) for tensor parallelism
and GShard / DeepSpeed-MoE for expert parallelism:

- attention (tp): the rank's q heads and their kv heads (column split of Wq/Wk/Wv, or of each
  part of a fused Wqkv), its columns of Wo; the partial outputs are summed with `all_reduce`
  (the output bias lives on rank 0 only). The KV cache holds the rank's kv heads.
- mlp (tp): column split of W_gate/W_up, row split of W_down, `all_reduce` of the outputs.
- embedding and head (tp, vocab-parallel): each rank holds a contiguous vocab slice; ids outside
  it embed to 0 and the embeddings are summed with `all_reduce`; logits slices are joined with
  `all_gather`. A tied head uses the embedding's slice.
- moe (ep): experts split in contiguous ranges across ranks; router, correction bias and the shared
  expert are replicated. Each rank routes its contiguous slice of the tokens, sends each
  (token, slot) row to the expert's owner with `all_to_all_single` (per-rank split sizes, so any
  load, however skewed, is exact), the owner applies the expert, the rows come back the same way
  and are combined with the routing weights where they came from; the token slices are then
  gathered so every rank holds every token again. The routing statistics (`block.routing`) are
  those of all tokens, as in one process.
- norms, RoPE, MLA and MoE under tp alone are replicated: every rank computes them whole.
- context parallel (cp, alone): the sequence is cut into 2 cp chunks and rank r runs chunks r and
  2cp-1-r (zig-zag, for causal load balance) through the model; attention sees every rank's K/V,
  passed around a ring and merged with an online softmax (ring attention, Liu et al. 2023) or
  all-gathered; the logits are gathered back in token order. Whole sequences only (no KV cache).

Layouts: every rank takes part in each split that is > 1, so tp, ep and cp are each 1 or the world
size (tp=2 x ep=2 runs on 2 ranks: attention split by heads, experts by ranges); splits over
separate rank groups, and cp combined with tp or ep, are refused with that reason.
`layout_reasons` checks a layout against a spec before any process-group work.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import LlmkitError

CP_MODES = ("ring", "allgather")
TIMEOUT_ENV = "LLMKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
"""Collective timeout (env LLMKIT_DIST_TIMEOUT, seconds): a rank that died or hangs makes the
others fail after at most this long."""


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Degrees of parallelism: tensor (tp), expert (ep), context (cp)."""

    tp: int = 1
    ep: int = 1
    cp: int = 1
    cp_mode: str = "ring"
    """How context parallelism moves K/V: "ring" (blocks passed rank to rank, online-softmax merge)
    or "allgather" (every rank gathers all K/V, then one masked attention)."""

    @classmethod
    def make(cls, value: Parallel | Mapping[str, Any] | None) -> Parallel:
        if value is None:
            return cls()
        if isinstance(value, Parallel):
            return value
        unknown = set(value) - {"tp", "ep", "cp", "cp_mode"}
        if unknown:
            raise LlmkitError(f"parallel: unknown key(s) {', '.join(sorted(unknown))}; valid: tp, ep, cp, cp_mode")
        out: dict[str, Any] = {}
        for key, degree in value.items():
            if key == "cp_mode":
                if degree not in CP_MODES:
                    raise LlmkitError(f"parallel.cp_mode must be one of {', '.join(CP_MODES)}, got {degree!r}")
                out[key] = degree
                continue
            if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
                raise LlmkitError(f"parallel.{key} must be a positive integer, got {degree!r}")
            out[key] = degree
        return cls(**out)

    @property
    def world(self) -> int:
        """Ranks the layout needs."""
        return max(self.tp, self.ep, self.cp)

    @property
    def trivial(self) -> bool:
        return self.world == 1

    def __str__(self) -> str:
        return f"tp={self.tp} ep={self.ep} cp={self.cp}" + (f" ({self.cp_mode})" if self.cp > 1 else "")


def layout_reasons(spec: Any, parallel: Parallel, world: int | None = None) -> list[str]:
    """Why `parallel` cannot run `spec` (on `world` ranks, when given); empty when it can."""
    p = parallel
    reasons = []
    if world is not None and world != p.world:
        reasons.append(f"{p} needs {p.world} ranks, the process group has {world}")
    if p.cp > 1 and (p.tp > 1 or p.ep > 1):
        reasons.append(f"{p}: context parallelism combined with tp or ep is not built yet")
    for name, degree in (("tp", p.tp), ("ep", p.ep), ("cp", p.cp)):
        if degree not in (1, p.world):
            reasons.append(f"{name}={degree} on {p.world} ranks: splits over separate rank groups (e.g. tp=2 x ep=2 "
                           "on 4 ranks) are not built yet; use 1 or the world size")
    if p.tp > 1:
        if spec.embedding.vocab_size % p.tp:
            reasons.append(f"embedding: vocab_size {spec.embedding.vocab_size} is not divisible by tp={p.tp}")
        if spec.head.vocab_size % p.tp:
            reasons.append(f"head: vocab_size {spec.head.vocab_size} is not divisible by tp={p.tp}")
    for i, layer in enumerate(spec.layers):
        att, ffn = layer.attention, layer.mlp
        if p.tp > 1 and getattr(att, "type", None) == "attention":
            if att.n_kv_heads % p.tp:
                reasons.append(f"layer {i} attention: n_kv_heads {att.n_kv_heads} is not divisible by tp={p.tp} "
                               "(replicating KV heads is not built)")
            elif att.n_heads % p.tp:
                reasons.append(f"layer {i} attention: n_heads {att.n_heads} is not divisible by tp={p.tp}")
        if p.cp > 1 and getattr(att, "type", None) != "attention":
            reasons.append(f"layer {i}: {getattr(att, 'type', 'this')} attention under context parallelism is not "
                           "built (only attention@1)")
        if p.tp > 1 and getattr(ffn, "type", None) == "mlp" and ffn.hidden % p.tp:
            reasons.append(f"layer {i} mlp: hidden {ffn.hidden} is not divisible by tp={p.tp}")
        if p.ep > 1 and getattr(ffn, "type", None) == "moe":
            if ffn.n_experts % p.ep:
                reasons.append(f"layer {i} moe: n_experts {ffn.n_experts} is not divisible by ep={p.ep}")
            if ffn.capacity_factor is not None:
                reasons.append(f"layer {i} moe: capacity_factor drops tokens by their rank in the whole batch, "
                               "which expert-parallel dispatch does not reproduce")
    return reasons


def env_world() -> int | None:
    """The world size torchrun (or an initialised process group) says, else None."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE", "").isdigit() else None


def init(backend: str | None, timeout_s: float | None = None) -> None:
    """Join the process group torchrun describes (env:// rendezvous), if not joined yet.

    `backend` is the process-group backend the device's llmkit backend names (`dist_backend`)."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        raise LlmkitError("parallel execution needs a process group: launch with torchrun "
                          "(torchrun --nproc-per-node N -m llmkit ...) or call torch.distributed.init_process_group")
    if backend is None:
        raise LlmkitError("this llmkit backend names no torch.distributed backend (Backend.dist_backend): "
                          "it cannot run on several ranks")
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
        try:
            timeout_s = float(raw)
        except ValueError:
            raise LlmkitError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def _collective(what: str, fn: Callable[[], Any]) -> Any:
    """Run one collective; a peer that died or timed out becomes a precise error on this rank."""
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as exc:
        raise LlmkitError(f"rank {dist.get_rank()}: collective {what} failed — a peer rank died or hung "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    _collective("all_reduce", lambda: dist.all_reduce(x, group=group))
    return x


def _all_gather_last(x: torch.Tensor, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    _collective("all_gather", lambda: dist.all_gather(parts, x.contiguous(), group=group))
    return torch.cat(parts, dim=-1)


def _gather_rows(x: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
    """Concatenate every rank's rows (rank r holds sizes[r] rows) on every rank."""
    width = max(sizes)
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    _collective("all_gather", lambda: dist.all_gather(parts, padded, group=group))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _exchange(rows: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    out = rows.new_empty((sum(recv), *rows.shape[1:]))
    _collective("all_to_all_single", lambda: dist.all_to_all_single(
        out, rows.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group))
    return out


def _keep(block: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer by (a copy of) `value`."""
    value = value.detach().clone().contiguous()
    if name in block._buffers:
        block._buffers[name] = value
    else:
        block._parameters[name] = nn.Parameter(value, requires_grad=block._parameters[name].requires_grad)


def _rows(t: torch.Tensor, rank: int, parts: int, dim: int = 0) -> torch.Tensor:
    return t.chunk(parts, dim=dim)[rank]


def _wrap(block: nn.Module, after: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    block.forward = after(block.forward)


def _shard_attention(block: Any, rank: int, tp: int, group: Any) -> None:
    c = block.config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    if c.fused_qkv:
        for name in ("wqkv", "bqkv") if c.qkv_bias else ("wqkv",):
            wq, wk, wv = getattr(block, name).split([q, kv, kv], dim=0)
            _keep(block, name, torch.cat([_rows(t, rank, tp) for t in (wq, wk, wv)]))
    else:
        for name in ("wq", "wk", "wv", *(("bq", "bk", "bv") if c.qkv_bias else ())):
            _keep(block, name, _rows(getattr(block, name), rank, tp))
    _keep(block, "wo", _rows(block.wo, rank, tp, dim=1))
    if c.o_bias and rank:
        _keep(block, "bo", torch.zeros_like(block.bo))  # added once, by rank 0's part of the sum
    block.config = c.model_copy(update={"n_heads": c.n_heads // tp, "n_kv_heads": c.n_kv_heads // tp})

    def after(inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(x: torch.Tensor, positions: torch.Tensor, cache: Any = None) -> torch.Tensor:
            return _all_reduce(inner(x, positions, cache), group)
        return forward
    _wrap(block, after)


def _shard_mlp(block: Any, rank: int, tp: int, group: Any) -> None:
    c = block.config
    for name in ("w_gate", "w_up", "b_gate", "b_up"):
        if name in block._parameters:
            _keep(block, name, _rows(getattr(block, name), rank, tp))
    _keep(block, "w_down", _rows(block.w_down, rank, tp, dim=1))
    if c.bias and rank:
        _keep(block, "b_down", torch.zeros_like(block.b_down))
    block.config = c.model_copy(update={"hidden": c.hidden // tp})

    def after(inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return _all_reduce(inner(x), group)
        return forward
    _wrap(block, after)


def _shard_embedding(block: Any, rank: int, tp: int, group: Any) -> None:
    c = block.config
    size = c.vocab_size // tp
    start = rank * size
    _keep(block, "weight", _rows(block.weight, rank, tp))
    block.config = c.model_copy(update={"vocab_size": size})

    def after(inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(ids: torch.Tensor) -> torch.Tensor:
            local = ids - start
            outside = (local < 0) | (local >= size)
            h = inner(local.masked_fill(outside, 0))
            return _all_reduce(h.masked_fill(outside[..., None], 0.0), group)
        return forward
    _wrap(block, after)


def _shard_head(block: Any, rank: int, tp: int, group: Any) -> None:
    c = block.config
    for name in ("weight", "bias"):
        if name in block._parameters:
            _keep(block, name, _rows(getattr(block, name), rank, tp))
    block.config = c.model_copy(update={"vocab_size": c.vocab_size // tp})

    def after(inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(x: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
            return _all_gather_last(inner(x, tied_weight), group)
        return forward
    _wrap(block, after)


def _shard_moe(block: Any, rank: int, ep: int, group: Any) -> None:
    from llmkit_blocks import moe as _moe

    c = block.config
    per = c.n_experts // ep
    for name in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"):
        if name in block._parameters:
            _keep(block, name, _rows(getattr(block, name), rank, ep))

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, c.d_model)
        n = h.shape[0]
        sizes = [n // ep + (r < n % ep) for r in range(ep)]
        start = sum(sizes[:rank])
        mine = h[start:start + sizes[rank]]
        logits, scores, selected, weights = _moe.route(block, mine)
        owner = selected.flatten() // per
        order = torch.argsort(owner, stable=True)
        token = torch.arange(mine.shape[0], device=x.device).repeat_interleave(c.top_k)[order]
        expert_id = selected.flatten()[order]
        send = torch.bincount(owner, minlength=ep)
        recv = torch.empty_like(send)
        _collective("all_to_all_single", lambda: dist.all_to_all_single(recv, send, group=group))
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        rows = _exchange(mine.index_select(0, token), send_sizes, recv_sizes, group)
        local_id = _exchange(expert_id, send_sizes, recv_sizes, group) - rank * per
        y = torch.zeros_like(rows)
        for e in range(per):
            at = (local_id == e).nonzero(as_tuple=True)[0]
            y[at] = _moe.expert(block, e, rows.index_select(0, at))
        back = _exchange(y, recv_sizes, send_sizes, group)
        out = torch.zeros_like(mine)
        out.index_add_(0, token, back * weights.flatten()[order, None].to(x.dtype))
        out = _gather_rows(_moe.add_shared(block, mine, out), sizes, group)
        full = [_gather_rows(t, sizes, group) for t in (logits, scores, selected, weights)]
        _moe.record_routing(block, x, *full)
        return out.reshape(x.shape)

    block.forward = forward


# --- context parallel ------------------------------------------------------------------------------

def zigzag(length: int, cp: int, rank: int) -> torch.Tensor:
    """The token indices rank `rank` holds: of 2 cp near-equal chunks, chunk r and chunk 2cp-1-r.

    Under causal attention a late chunk attends to many keys and an early one to few; pairing
    them gives every rank about the same work (the zig-zag of ring-attention implementations)."""
    chunks = torch.arange(length).tensor_split(2 * cp)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])


def _pad_rows(x: torch.Tensor, width: int, dim: int, value: float) -> torch.Tensor:
    pad = width - x.shape[dim]
    if pad == 0:
        return x.contiguous()
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _gather_seq(x: torch.Tensor, width: int, group: Any, value: float = 0.0) -> list[torch.Tensor]:
    """Every rank's x (dim 1 = its tokens, at most `width`), padded to `width` with `value`."""
    padded = _pad_rows(x, width, 1, value)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    _collective("all_gather", lambda: dist.all_gather(parts, padded, group=group))
    return parts


def _ring_attend(block: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                 k_pos: torch.Tensor, width: int, group: Any) -> torch.Tensor:
    """attend() with K/V blocks passed around the ring: each step scores the local queries against
    the block in hand while the next block arrives, and merges it into a running softmax
    (max m, normaliser l, accumulator; FlashAttention's online rescaling) in float32."""
    from llmkit_blocks import attention as _attention

    c = block.config
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    kb, vb, pb = (_pad_rows(k, width, 1, 0.0), _pad_rows(v, width, 1, 0.0), _pad_rows(k_pos, width, 1, -1))
    groups = c.n_heads // c.n_kv_heads
    qf = q.float()
    m = torch.full((*q.shape[:3], 1), float("-inf"), device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros((*q.shape[:3], v.shape[-1]), device=q.device)
    for step in range(world):
        pending = []
        if step < world - 1:
            incoming = [torch.empty_like(kb), torch.empty_like(vb), torch.empty_like(pb)]
            sends = [dist.isend(t, (rank + 1) % world, group=group) for t in (kb, vb, pb)]
            pending = [*sends, *(dist.irecv(t, (rank - 1) % world, group=group) for t in incoming)]
        kh = kb.transpose(1, 2).float().repeat_interleave(groups, dim=1)
        vh = vb.transpose(1, 2).float().repeat_interleave(groups, dim=1)
        scores = torch.matmul(qf, kh.transpose(-1, -2)) * _attention.softmax_scale(c)
        if c.softcap is not None:
            scores = c.softcap * torch.tanh(scores / c.softcap)
        allowed = _attention.visible(q_pos, pb, c.causal, c.window)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), 0.0, m_new)  # rows that have seen no key yet
        p = torch.exp(scores - safe)
        correction = torch.exp(m - safe)
        l = l * correction + p.sum(dim=-1, keepdim=True)
        acc = acc * correction + torch.matmul(p, vh)
        m = m_new
        for work in pending:
            _collective("ring send/recv", work.wait)
        if pending:
            kb, vb, pb = incoming
    out = torch.where(l > 0, acc / l.clamp(min=torch.finfo(l.dtype).tiny), 0.0)
    return _attention.output(block, out.to(v.dtype))


def _shard_context(model: nn.Module, rank: int, cp: int, mode: str, group: Any) -> None:
    """Each rank runs its zig-zag share of the tokens through the model; attention gathers the
    other ranks' K/V (ring or all-gather); the logits are gathered back into token order."""
    from llmkit_blocks import attention as _attention

    from .assembly import Block
    from .cache import as_positions

    state: dict[str, int] = {}

    def attention_forward(block: Any, x: torch.Tensor, positions: torch.Tensor, cache: Any = None) -> torch.Tensor:
        b, t, _ = x.shape
        pos = as_positions(positions, b, t)
        q, k, v = _attention.project(block, x, pos)
        if mode == "ring":
            return _ring_attend(block, q, k, v, pos, pos, state["width"], group)
        keys = torch.cat(_gather_seq(k, state["width"], group), dim=1)
        values = torch.cat(_gather_seq(v, state["width"], group), dim=1)
        k_pos = torch.cat(_gather_seq(pos, state["width"], group, value=-1), dim=1)
        return _attention.attend_output(block, q, keys, values, pos, k_pos)

    for m in model.modules():
        if isinstance(m, Block) and m.kind.name == "attention":
            m.forward = functools.partial(attention_forward, m)

    inner = model.forward

    def forward(ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Any = None, *,
                last_only: bool = False) -> torch.Tensor:
        if cache is not None:
            raise LlmkitError("context parallelism runs whole sequences (prefill, scoring); a KV cache under cp is "
                              "not built: generate without --cp")
        b, t = ids.shape
        pos = as_positions(positions if positions is not None else torch.arange(t, device=ids.device), b, t)
        mine = zigzag(t, cp, rank)
        sizes = [len(zigzag(t, cp, r)) for r in range(cp)]
        state["width"] = max(sizes)
        local = inner(ids[:, mine], pos[:, mine])
        out = local.new_empty((b, t, local.shape[-1]))
        for r, part in enumerate(_gather_seq(local, state["width"], group)):
            out[:, zigzag(t, cp, r)] = part[:, :sizes[r]]
        return out[:, -1:] if last_only else out

    model.forward = forward


_TP: dict[str, tuple[Callable[[Any, int, int, Any], None], str, str, str]] = {
    # kind: (split, what is split, the config field holding this rank's share, joining collective)
    "attention": (_shard_attention, "q heads", "n_heads", "all_reduce"),
    "mlp": (_shard_mlp, "hidden", "hidden", "all_reduce"),
    "embedding": (_shard_embedding, "vocab", "vocab_size", "all_reduce"),
    "head": (_shard_head, "vocab", "vocab_size", "all_gather"),
}


def shard(model: nn.Module, parallel: Parallel | Mapping[str, Any], group: Any = None) -> list[str]:
    """Cut `model` (built whole, identical on every rank) down to this rank's part, in place.

    Returns one line per block saying what this rank runs (the parallel part of the plan)."""
    from .assembly import Block

    p = Parallel.make(parallel)
    if p.trivial:
        return []
    world = dist.get_world_size(group)
    spec = getattr(model, "spec", None)
    reasons = layout_reasons(spec, p, world) if spec is not None else []
    if reasons:
        raise LlmkitError(f"parallel layout {p} refused: " + "; ".join(reasons))
    rank = dist.get_rank(group)
    target = model.plan.target if getattr(model, "plan", None) is not None else None
    lines = []
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, Block)]
    # a MoE's shared expert is replicated: under ep its inputs differ per rank, so a split of it
    # could not be summed across ranks
    inside_moe = tuple(f"{path}." for path, m in blocks if m.kind.name == "moe")
    if p.cp > 1:
        _shard_context(model, rank, p.cp, p.cp_mode, group)
        return [f"cp ({p.cp_mode}): sequence chunks {rank} and {2 * p.cp - 1 - rank} of {2 * p.cp} (zig-zag); "
                "attention sees every rank's K/V; logits gathered in token order"]
    for path, m in blocks:
        kind = m.kind.name
        what = "replicated"
        if path.startswith(inside_moe):
            pass
        elif kind in _TP and p.tp > 1:
            split, label, field, collective = _TP[kind]
            split(m, rank, p.tp, group)
            size = getattr(m.config, field)
            what = f"tp: {label} {rank * size}..{(rank + 1) * size - 1}, {collective}"
        elif kind == "moe" and p.ep > 1:
            per = m.config.n_experts // p.ep
            _shard_moe(m, rank, p.ep, group)
            what = f"ep: experts {rank * per}..{(rank + 1) * per - 1}, all_to_all_single dispatch"
        if what != "replicated" and kind != "moe" and target is not None and m.impl.prepare is not None:
            m.impl.prepare(m, target)  # the impl's build-time work, redone for the shard's config
        lines.append(f"{path or '(model)'} [{m.kind.id}] {what}")
    return lines

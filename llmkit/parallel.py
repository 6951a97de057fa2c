"""Multi-process execution on torch.distributed: tensor, expert and context parallel.

A model is built whole on every rank (same spec, same seed or the same checkpoint), then `shard`
cuts each block down to this rank's part and wraps its forward with the collective that makes the
part whole again. A shard of a block is itself a block of the same kind with a smaller config, so
whatever impl the plan bound (cpu, onnxrt, a vendor's) keeps running on it unchanged; only the
collectives are added. Semantics follow Megatron-LM (Shoeybi et al. 2019) for tensor parallelism
and GShard / DeepSpeed-MoE for expert parallelism:

- attention (tp): the rank's q heads and their kv heads (column split of Wq/Wk/Wv, or of each
  part of a fused Wqkv), its columns of Wo; the partial outputs are summed with `all_reduce`
  (the output bias lives on rank 0 only). The KV cache holds the rank's kv heads. With fewer KV
  heads than ranks (tp a multiple of n_kv_heads) each rank keeps a copy of the one KV head its q
  heads share (Megatron's and vLLM's KV-head replication).
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
- context parallel (cp, alone or on a tp x cp grid): a prompt is cut into 2 cp chunks and rank r runs chunks r and
  2cp-1-r (zig-zag, for causal load balance) through the model; attention (attention@1, or MLA,
  whose per-token latent is what moves) sees every rank's K/V, passed around a ring and merged
  with an online softmax (ring attention, Liu et al. 2023) or all-gathered; the logits are
  gathered back in token order (with `last_only`, broadcast from the rank holding the last token).
  With a KV cache (`model.new_cache()` makes a `ContextCache`), each rank keeps the K/V of its own
  prompt tokens; every decode step runs the new token on all ranks, each attends over the tokens it
  keeps, the partial softmax states (max, normaliser, weighted sum) are all-gathered and merged,
  and one rank per step (round-robin) keeps the new token's K/V. So the cache is spread evenly
  and no rank ever holds another's. MoE routing statistics are redone over all tokens.

Layouts: either every split > 1 spans all ranks (tp, ep and cp each 1 or the world size; tp=2 x
ep=2 on 2 ranks: attention split by heads, experts by ranges, on the same ranks), or, for tp x ep
ranks, a grid (Megatron-Core's expert tensor parallelism): rank = e * tp + t, tp groups are the
rows (attention, MLP, embedding and head split as above; every row computes the same tokens), ep
groups the columns (experts split in ranges over a column, each expert's hidden split over its
row, the partial expert outputs summed in the row before they travel back). tp x cp ranks form
the same grid with cp groups as columns: a row splits heads, a column the sequence (attention
heads of the rank's tp share, over the cp group's K/V). cp combined with ep is refused.
`layout_reasons` checks a layout against a spec before any process-group work.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import functools
import os
import time
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

    def grid(self, world: int | None) -> str | None:
        """The split laid across the tp groups when `world` ranks run this layout as a grid (rank =
        i * tp + t): "ep" for tp > 1 and ep > 1 over tp * ep ranks, "cp" for tp > 1 and cp > 1 over
        tp * cp ranks; None when every split > 1 spans all ranks (tp=2 x ep=2 on 2 ranks: attention
        split by heads, experts by ranges, on the same ranks)."""
        if world is None or self.tp == 1 or world == self.world:
            return None
        if self.ep > 1 and self.cp == 1 and world == self.tp * self.ep:
            return "ep"
        if self.cp > 1 and self.ep == 1 and world == self.tp * self.cp:
            return "cp"
        return None

    def __str__(self) -> str:
        return f"tp={self.tp} ep={self.ep} cp={self.cp}" + (f" ({self.cp_mode})" if self.cp > 1 else "")


def layout_reasons(spec: Any, parallel: Parallel, world: int | None = None) -> list[str]:
    """Why `parallel` cannot run `spec` (on `world` ranks, when given); empty when it can."""
    p = parallel
    reasons = []
    grid = p.grid(world)
    if p.cp > 1 and p.ep > 1:
        reasons.append(f"{p}: context parallelism combined with ep is not built")
    elif p.cp > 1 and p.tp > 1:
        if world is not None and grid != "cp":
            reasons.append(f"{p} runs on {p.tp * p.cp} ranks (tp groups x cp groups), the process group has {world}")
    elif world is not None and world != p.world and grid is None:
        reasons.append(f"{p} needs {p.world} ranks" + (f" (or {p.tp * p.ep}: tp groups x ep groups)"
                                                       if p.tp > 1 and p.ep > 1 else "")
                       + f", the process group has {world}")
    if grid is None and not (p.cp > 1 and p.tp > 1):
        for name, degree in (("tp", p.tp), ("ep", p.ep), ("cp", p.cp)):
            if degree not in (1, p.world):
                reasons.append(f"{name}={degree} on {p.world} ranks: each degree is 1 or the world size, or tp x ep "
                               "is the world size (tp groups x ep groups)")
    if p.tp > 1:
        if spec.embedding.vocab_size % p.tp:
            reasons.append(f"embedding: vocab_size {spec.embedding.vocab_size} is not divisible by tp={p.tp}")
        if spec.head.vocab_size % p.tp:
            reasons.append(f"head: vocab_size {spec.head.vocab_size} is not divisible by tp={p.tp}")
    for i, layer in enumerate(spec.layers):
        att, ffn = layer.attention, layer.mlp
        if p.tp > 1 and getattr(att, "type", None) == "attention":
            if att.n_kv_heads % p.tp and p.tp % att.n_kv_heads:
                reasons.append(f"layer {i} attention: n_kv_heads {att.n_kv_heads} and tp={p.tp}: neither divides the "
                               "other (KV heads are split, or replicated when tp is a multiple of them)")
            elif att.n_heads % p.tp:
                reasons.append(f"layer {i} attention: n_heads {att.n_heads} is not divisible by tp={p.tp}")
        if p.cp > 1 and getattr(att, "type", None) not in ("attention", "mla"):
            reasons.append(f"layer {i}: {getattr(att, 'type', 'this')} attention under context parallelism is not "
                           "built (attention@1 and mla@1 are)")
        if p.tp > 1 and getattr(ffn, "type", None) == "mlp" and ffn.hidden % p.tp:
            reasons.append(f"layer {i} mlp: hidden {ffn.hidden} is not divisible by tp={p.tp}")
        if p.ep > 1 and getattr(ffn, "type", None) == "moe":
            if grid == "ep" and ffn.hidden % p.tp:
                reasons.append(f"layer {i} moe: expert hidden {ffn.hidden} is not divisible by tp={p.tp} "
                               "(each expert is split across its tp group)")
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
    # torn down before the interpreter exits: a gloo group left to process teardown can abort the
    # process ("terminate called without an active exception") while its threads still run
    atexit.register(_destroy_group)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Profile:
    """Wall time per block and time inside collectives, on this rank, while active (`with`).

    Blocks: the embedding, each layer and its attention and mlp/moe, the final norm and the head,
    timed by forward pre/post hooks (an asynchronous device is synchronised at each hook, which
    serialises it: profile in a separate pass, not while timing throughput). Each collective's wall
    time (`_collective`) is charged to every block running at the time, by its name (all_reduce,
    all_to_all_single, ...). Collectives block on gloo, so that is the transfer plus the wait for
    slower peers; compute = time - communication."""

    active: Profile | None = None

    def __init__(self, model: nn.Module) -> None:
        from .assembly import Block

        self.model = model
        self.time: dict[str, float] = {}
        self.comm: dict[str, dict[str, float]] = {}
        self._stack: list[tuple[str, float]] = []
        self._hooks: list[Any] = []
        top = {"embedding", "norm", "head"}
        self._paths = [(path, m) for path, m in model.named_modules() if isinstance(m, Block) and (
            path in top or (path.startswith("layers.") and (path.count(".") == 1 or (
                path.count(".") == 2 and m.kind.name in ("attention", "mla", "mlp", "moe")))))]
        device = next(model.parameters()).device
        self._sync = (lambda: None) if device.type in ("cpu", "meta") else torch.accelerator.synchronize

    def __enter__(self) -> Profile:
        for path, m in self._paths:
            self._hooks.append(m.register_forward_pre_hook(functools.partial(self._enter, path)))
            self._hooks.append(m.register_forward_hook(functools.partial(self._leave, path)))
        Profile.active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        Profile.active = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _enter(self, path: str, *_: Any) -> None:
        self._sync()
        self._stack.append((path, time.perf_counter()))

    def _leave(self, path: str, *_: Any) -> None:
        self._sync()
        name, start = self._stack.pop()
        self.time[name] = self.time.get(name, 0.0) + time.perf_counter() - start

    def charge(self, what: str, seconds: float) -> None:
        for path, _ in self._stack:
            ops = self.comm.setdefault(path, {})
            ops[what] = ops.get(what, 0.0) + seconds

    def rows(self, per: int = 1) -> list[dict[str, Any]]:
        """One row per block, in model order: time_s, comm_s (by collective) — divided by `per`."""
        return [{"block": path, "time_s": self.time.get(path, 0.0) / per,
                 "comm_s": {op: t / per for op, t in self.comm.get(path, {}).items()}}
                for path, _ in self._paths]


def _collective(what: str, fn: Callable[[], Any]) -> Any:
    """Run one collective; a peer that died or timed out becomes a precise error on this rank."""
    start = time.perf_counter()
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as exc:
        raise LlmkitError(f"rank {dist.get_rank()}: collective {what} failed — a peer rank died or hung "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    finally:
        if Profile.active is not None:
            Profile.active.charge(what, time.perf_counter() - start)


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
    if c.n_kv_heads % tp:
        # fewer KV heads than ranks (tp a multiple of n_kv_heads): the rank's q heads all share one
        # KV head, which it keeps a copy of (replicated over tp / n_kv_heads ranks)
        def kv_part(t: torch.Tensor) -> torch.Tensor:
            return _rows(t, rank // (tp // c.n_kv_heads), c.n_kv_heads)
    else:
        def kv_part(t: torch.Tensor) -> torch.Tensor:
            return _rows(t, rank, tp)
    if c.fused_qkv:
        for name in ("wqkv", "bqkv") if c.qkv_bias else ("wqkv",):
            wq, wk, wv = getattr(block, name).split([q, kv, kv], dim=0)
            _keep(block, name, torch.cat([_rows(wq, rank, tp), kv_part(wk), kv_part(wv)]))
    else:
        _keep(block, "wq", _rows(block.wq, rank, tp))
        for name in ("wk", "wv"):
            _keep(block, name, kv_part(getattr(block, name)))
        if c.qkv_bias:
            _keep(block, "bq", _rows(block.bq, rank, tp))
            for name in ("bk", "bv"):
                _keep(block, name, kv_part(getattr(block, name)))
    _keep(block, "wo", _rows(block.wo, rank, tp, dim=1))
    if c.o_bias and rank:
        _keep(block, "bo", torch.zeros_like(block.bo))  # added once, by rank 0's part of the sum
    block.config = c.model_copy(update={"n_heads": c.n_heads // tp, "n_kv_heads": max(1, c.n_kv_heads // tp)})

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


def _shard_moe(block: Any, rank: int, ep: int, group: Any, tp: tuple[int, int, Any] | None = None) -> None:
    """Experts split in contiguous ranges over the ep group; with `tp` (rank, size, group of the
    tp peers, which hold the same range and see the same rows) each expert's hidden is split
    across them too (column split of W_gate/W_up, row split of W_down) and the partial expert
    outputs are summed with `all_reduce` in the tp group before they travel back."""
    from llmkit_blocks import moe as _moe

    c = block.config
    per = c.n_experts // ep
    for name in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"):
        if name in block._parameters:
            _keep(block, name, _rows(getattr(block, name), rank, ep))
    if tp is not None:
        t, size, _ = tp
        for name in ("w_gate", "w_up", "b_gate", "b_up"):
            if name in block._parameters:
                _keep(block, name, _rows(getattr(block, name), t, size, dim=1))
        _keep(block, "w_down", _rows(block.w_down, t, size, dim=2))
        if c.expert_bias and t:
            _keep(block, "b_down", torch.zeros_like(block.b_down))  # added once, by tp rank 0's part

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
        if tp is not None:
            y = _all_reduce(y, tp[2])
        back = _exchange(y, recv_sizes, send_sizes, group)
        out = torch.zeros_like(mine)
        out.index_add_(0, token, back * weights.flatten()[order, None].to(x.dtype))
        out = _gather_rows(_moe.add_shared(block, mine, out), sizes, group)
        full = _gather_routing((logits, scores, selected, weights), lambda t: _gather_rows(t, sizes, group))
        _moe.record_routing(block, x, *full)
        return out.reshape(x.shape)

    block.forward = forward


def _gather_routing(routed: tuple[torch.Tensor, ...], gather: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """`route`'s (logits, scores, selected, weights) of this rank's tokens -> those of all tokens,
    packed into one tensor so that one collective (`gather`) moves them (expert ids travel as
    floats: exact below 2^24)."""
    logits, scores, selected, weights = routed
    e, k = logits.shape[-1], selected.shape[-1]
    packed = torch.cat([logits, scores.to(logits.dtype), selected.to(logits.dtype), weights.to(logits.dtype)], dim=-1)
    whole_logits, whole_scores, whole_selected, whole_weights = gather(packed).split([e, e, k, k], dim=-1)
    return [whole_logits, whole_scores.to(scores.dtype), whole_selected.long(), whole_weights.to(weights.dtype)]


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


# Each attention-like kind under cp: its projection (q, and what the cache holds per token), how
# cached tensors become per-head k/v, its score parameters and its output projection. All come from
# the catalogue, so cp computes exactly what the kind's reference computes.

def _cp_project(block: Any, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from llmkit_blocks import attention as _attention

    if block.kind.name == "mla":
        q, latent, k_rope = _attention.mla_project(block, x, pos)
        return q, {"latent": latent, "k_rope": k_rope}
    q, k, v = _attention.project(block, x, pos)
    return q, {"k": k, "v": v}


def _cp_keys(block: Any, cached: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached per-token tensors [B, S, ...] -> k [B, Hkv, S, D], v [B, Hkv, S, Dv]."""
    from llmkit_blocks import attention as _attention

    if block.kind.name == "mla":
        return _attention.mla_keys(block, cached["latent"], cached["k_rope"])
    return cached["k"].transpose(1, 2), cached["v"].transpose(1, 2)


def _cp_scores(block: Any) -> dict[str, Any]:
    from llmkit_blocks import attention as _attention

    c = block.config
    if block.kind.name == "mla":
        return {"scale": _attention.mla_scale(c), "softcap": None, "causal": c.causal, "window": None}
    return {"scale": _attention.softmax_scale(c), "softcap": c.softcap, "causal": c.causal, "window": c.window}


def _cp_output(block: Any, o: torch.Tensor) -> torch.Tensor:
    from llmkit_blocks import attention as _attention

    return _attention.mla_output(block, o) if block.kind.name == "mla" else _attention.output(block, o)


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, *,
             scale: float, softcap: float | None, causal: bool, window: int | None) -> torch.Tensor:
    """The softmax state of queries q [B, H, T, D] over one block of keys k, v [B, Hkv, S, *]:
    [B, H, T, 2 + Dv] = (row max m, normaliser l = sum exp(s - m), accumulator sum exp(s - m) v),
    in float32 (float64 for float64 inputs). States of disjoint key blocks merge exactly (`_merge`):
    the online softmax of FlashAttention (Dao et al. 2022) and ring attention."""
    from llmkit_blocks import attention as _attention

    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    b, h, t, _ = q.shape
    if k.shape[2] == 0:  # this rank holds no keys (yet)
        empty = q.new_zeros((b, h, t, 2 + v.shape[-1]), dtype=acc_dtype)
        empty[..., 0] = float("-inf")
        return empty
    groups = h // k.shape[1]
    kh = k.to(acc_dtype).repeat_interleave(groups, dim=1)
    vh = v.to(acc_dtype).repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.to(acc_dtype), kh.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = _attention.visible(q_pos, k_pos, causal, window)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isinf(m), 0.0, m))  # rows that see no key: all zeros
    return torch.cat([m, p.sum(dim=-1, keepdim=True), torch.matmul(p, vh)], dim=-1)


def _merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two `_partial` states over disjoint keys -> the state over both."""
    m = torch.maximum(a[..., :1], b[..., :1])
    safe = torch.where(torch.isinf(m), 0.0, m)
    return torch.cat([m, torch.exp(a[..., :1] - safe) * a[..., 1:] + torch.exp(b[..., :1] - safe) * b[..., 1:]], dim=-1)


def _finish(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A state -> the attention output [B, H, T, Dv] (0 for a query that saw no key)."""
    l, acc = state[..., 1:2], state[..., 2:]
    return torch.where(l > 0, acc / l.clamp(min=torch.finfo(l.dtype).tiny), 0.0).to(dtype)


def _in_token_order(local: torch.Tensor, length: int, cp: int, width: int, group: Any) -> torch.Tensor:
    """Every rank's zig-zag share of a [B, T_rank, ...] tensor, gathered and put back in token
    order: [B, length, ...]."""
    whole = local.new_empty((local.shape[0], length, *local.shape[2:]))
    for r, part in enumerate(_gather_seq(local, width, group)):
        mine = zigzag(length, cp, r)
        whole[:, mine] = part[:, :len(mine)]
    return whole


def _ring_attend(block: Any, q: torch.Tensor, cached: dict[str, torch.Tensor], q_pos: torch.Tensor,
                 k_pos: torch.Tensor, width: int, group: Any) -> torch.Tensor:
    """Attention output of the local queries over every rank's keys: each rank's cached tensors
    (k/v, or MLA's latent and rope key, padded to `width` tokens with position -1) pass around the
    ring; each step scores the block in hand while the next one arrives and merges its state."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # point-to-point peers are named by global rank
    nxt, prev = ((r if group is None else dist.get_global_rank(group, r)) for r in ((rank + 1) % world,
                                                                                   (rank - 1) % world))
    blocks = [_pad_rows(t, width, 1, 0.0) for t in cached.values()] + [_pad_rows(k_pos, width, 1, -1)]
    scores = _cp_scores(block)
    state: torch.Tensor | None = None
    for step in range(world):
        pending, incoming = [], []
        if step < world - 1:
            incoming = [torch.empty_like(t) for t in blocks]
            pending = [dist.isend(t, nxt, group=group) for t in blocks]
            pending += [dist.irecv(t, prev, group=group) for t in incoming]
        k, v = _cp_keys(block, dict(zip(cached, blocks[:-1])))
        part = _partial(q, k, v, q_pos, blocks[-1], **scores)
        state = part if state is None else _merge(state, part)
        for work in pending:
            _collective("ring send/recv", work.wait)
        if pending:
            blocks = incoming
    assert state is not None
    return _finish(state, q.dtype)


class ContextCache(list):
    """The per-layer caches of a context-parallel model (`model.new_cache()` under cp): each rank's
    caches hold only the tokens it keeps, so this list also carries what every rank must agree on:
    tokens seen so far, the last position of each row, and the decode steps taken (whose tokens
    are kept round-robin, one rank per step)."""

    def __init__(self, layers: list[Any]) -> None:
        super().__init__(layers)
        self.seen = 0
        self.last: torch.Tensor | None = None
        self.steps = 0


def _cached_now(cache: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What a layer cache holds (without adding to it)."""
    n = len(cache)
    return {k: v[:, :n] for k, v in cache.tensors.items()}, cache.positions[:, :n]


def _shard_context(model: nn.Module, rank: int, cp: int, mode: str, group: Any) -> None:
    """Prefill: each rank runs its zig-zag share of the tokens through the model, attention sees
    every rank's K/V (ring or all-gather), each rank's cache keeps its own tokens. Later steps
    (decode, or a prompt shorter than cp): every rank runs all the new tokens, attends over the
    tokens it keeps, and the softmax states are merged across ranks; one rank per step keeps them."""
    from llmkit_blocks import attention as _attention
    from llmkit_blocks import moe as _moe

    from .assembly import Block
    from .cache import as_positions

    state: dict[str, Any] = {}

    def attention_forward(block: Any, x: torch.Tensor, positions: torch.Tensor, cache: Any = None) -> torch.Tensor:
        b, t, _ = x.shape
        pos = as_positions(positions, b, t)
        q, new = _cp_project(block, x, pos)
        if state["split"]:
            if cache is not None:
                cache.extend(pos, **new)
            if mode == "ring":
                return _cp_output(block, _ring_attend(block, q, new, pos, pos, state["width"], group))
            gathered = {name: torch.cat(_gather_seq(t_, state["width"], group), dim=1) for name, t_ in new.items()}
            k_pos = torch.cat(_gather_seq(pos, state["width"], group, value=-1), dim=1)
            k, v = _cp_keys(block, gathered)
            return _cp_output(block, _attention.attend(q, k, v, pos, k_pos, **_cp_scores(block)))
        if state["keeper"] == rank:
            mine, k_pos = cache.extend(pos, **new) if cache is not None else (new, pos)
        elif cache is not None and len(cache):
            mine, k_pos = _cached_now(cache)
        else:
            mine, k_pos = {name: t_[:, :0] for name, t_ in new.items()}, pos[:, :0]
        k, v = _cp_keys(block, mine)
        part = _partial(q, k, v, pos, k_pos, **_cp_scores(block)).contiguous()
        parts = [torch.empty_like(part) for _ in range(cp)]
        _collective("all_gather", lambda: dist.all_gather(parts, part, group=group))
        merged = functools.reduce(_merge, parts)
        return _cp_output(block, _finish(merged, q.dtype))

    def moe_forward(block: Any, inner: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
        out = inner(x)
        if state["split"]:
            # the block saw this rank's tokens only: its statistics are redone over every token
            # (router again, its outputs gathered into token order)
            b, t = x.shape[0], state["length"]

            def gather(rows: torch.Tensor) -> torch.Tensor:
                local = rows.reshape(b, x.shape[1], -1)
                return _in_token_order(local, t, cp, state["width"], group).reshape(b * t, -1)

            full = _gather_routing(_moe.route(block, x.reshape(-1, x.shape[-1])), gather)
            # record_routing reads only x's shape ([batch, seq] for the per-sequence loss)
            _moe.record_routing(block, x.new_empty(1).expand(b, t, x.shape[-1]), *full)
        return out

    for m in model.modules():
        if isinstance(m, Block) and m.kind.name in ("attention", "mla"):
            m.forward = functools.partial(attention_forward, m)
        elif isinstance(m, Block) and m.kind.name == "moe":
            m.forward = functools.partial(moe_forward, m, m.forward)

    inner_forward, inner_new_cache = model.forward, model.new_cache

    def new_cache(capacity: int | None = None, *, fixed: bool = False, dtype: torch.dtype | None = None) -> ContextCache:
        if fixed:
            raise LlmkitError("a fixed-shape (graph-capturable) cache under context parallelism is not built")
        if dtype is not None:  # the ring exchanges each rank's stored keys and values as they are
            raise LlmkitError("a cache dtype under context parallelism is not built")
        return ContextCache(inner_new_cache(capacity))

    def forward(ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Any = None, *,
                last_only: bool = False) -> torch.Tensor:
        if cache is not None and not isinstance(cache, ContextCache):
            raise LlmkitError("under context parallelism the KV cache must come from model.new_cache() "
                              "(each rank keeps part of the tokens)")
        b, t = ids.shape
        if positions is None:
            steps = torch.arange(t, device=ids.device)
            positions = cache.last + 1 + steps if cache is not None and cache.seen else steps
        pos = as_positions(positions, b, t)
        # the zig-zag split for a first pass of at least cp tokens; every rank runs every token after
        state["split"] = (cache is None or not cache.seen) and t >= cp
        if cache is not None:
            cache.last, cache.seen = pos[:, -1:], cache.seen + t
        if not state["split"]:
            state["keeper"] = 0 if cache is None else (cache.steps % cp)
            if cache is not None:
                cache.steps += 1
            return inner_forward(ids, pos, cache, last_only=last_only)
        state.update(width=max(len(zigzag(t, cp, r)) for r in range(cp)), length=t)
        mine = zigzag(t, cp, rank)
        local = inner_forward(ids[:, mine], pos[:, mine], cache, last_only=last_only)
        if last_only:
            # token t-1 is the last one its rank holds (the last chunk is a rank's second)
            src = next(r for r in range(cp) if int(zigzag(t, cp, r)[-1]) == t - 1)
            _collective("broadcast", lambda: dist.broadcast(local, src=dist.get_global_rank(group, src)
                                                            if group is not None else src, group=group))
            return local
        return _in_token_order(local, t, cp, state["width"], group)

    model.forward = forward
    model.new_cache = new_cache


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
    tp_rank = ep_rank = cp_rank = rank
    tp_group = ep_group = cp_group = group
    grid = p.grid(world)
    if grid is not None:
        # rank = i * tp + t: tp groups are rows, ep (or cp) groups columns (every rank creates
        # every group, in the same order, as torch.distributed.new_group requires)
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        other = world // p.tp
        row, tp_rank = divmod(rank, p.tp)
        rows = [dist.new_group([ranks[i * p.tp + t] for t in range(p.tp)]) for i in range(other)]
        cols = [dist.new_group([ranks[i * p.tp + t] for i in range(other)]) for t in range(p.tp)]
        tp_group = rows[row]
        if grid == "ep":
            ep_rank, ep_group = row, cols[tp_rank]
        else:
            cp_rank, cp_group = row, cols[tp_rank]
    target = model.plan.target if getattr(model, "plan", None) is not None else None
    lines = []
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, Block)]
    # a MoE's shared expert is replicated: under ep its inputs differ per rank, so a split of it
    # could not be summed across ranks
    inside_moe = tuple(f"{path}." for path, m in blocks if m.kind.name == "moe")
    if p.cp > 1:
        # first, so that a tp split below wraps the cp attention with its all_reduce
        _shard_context(model, cp_rank, p.cp, p.cp_mode, cp_group)
        lines.append(f"cp ({p.cp_mode}): sequence chunks {cp_rank} and {2 * p.cp - 1 - cp_rank} of {2 * p.cp} "
                     "(zig-zag); attention sees every rank's K/V; logits gathered in token order")
        if p.tp == 1:
            return lines
    for path, m in blocks:
        kind = m.kind.name
        what = "replicated"
        if path.startswith(inside_moe):
            pass
        elif kind in _TP and p.tp > 1:
            split, label, field, collective = _TP[kind]
            split(m, tp_rank, p.tp, tp_group)
            size = getattr(m.config, field)
            what = f"tp: {label} {tp_rank * size}..{(tp_rank + 1) * size - 1}, {collective}"
        elif kind == "moe" and p.ep > 1:
            per = m.config.n_experts // p.ep
            mesh = (tp_rank, p.tp, tp_group) if grid == "ep" else None
            _shard_moe(m, ep_rank, p.ep, ep_group, mesh)
            what = f"ep: experts {ep_rank * per}..{(ep_rank + 1) * per - 1}, all_to_all_single dispatch"
            if mesh:
                size = m.config.hidden // p.tp
                what += f"; tp: expert hidden {tp_rank * size}..{(tp_rank + 1) * size - 1}, all_reduce"
        if what != "replicated" and kind != "moe" and target is not None and m.impl.prepare is not None:
            m.impl.prepare(m, target)  # the impl's build-time work, redone for the shard's config
        lines.append(f"{path or '(model)'} [{m.kind.id}] {what}")
    return lines

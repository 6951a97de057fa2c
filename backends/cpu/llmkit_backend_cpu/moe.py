"""CPU impl `cpu.grouped` of `moe@1`: tokens grouped by expert, one GEMM chain per active expert.

Routing is the catalogue's (`llmkit_blocks.moe.route`: the same router, scores, group limit,
correction bias, renormalisation and scaling), so only the expert computation differs from the
reference: the N * top_k (token, slot) assignments are sorted by expert with a stable sort, so
each expert's tokens are one contiguous slice, in token order (capacity drops keep the first
tokens, as the reference does). Each active expert runs act(x Wg^T) * (x Wu^T) Wd^T on its slice
only — a handful of tokens at decode, a large GEMM at prefill — and the rows, weighted by their
routing weight, are added back with one `index_add_`. Inactive experts cost nothing.

A call of a few tokens (decode: at most `GEMV_MAX_ROWS`, or `DECODE_MAX_TOKENS` where the row
kernels take several rows of x at once) in float32 or bfloat16, outside autograd and without
training's router jitter, is one call of this plugin's `llmkit_cpu::moe_decode` (moe.c):
routing, experts and the weighted sum in one C kernel, every product and sum in float32 (the
reference rounds the router's logits, each product and the routing weights to a bfloat16 layer's
dtype; the kernel is closer to float64, and a near-tie may route otherwise; where an exact tie
decides a pick, the call is routed here as below, as PyTorch's topk breaks ties). Run as PyTorch
operations, the routing, sorting and scatter cost as much as the kernels' distance to the memory
roofline (README, MoE layer). Otherwise an expert with at most `GEMV_MAX_ROWS` tokens multiplies
by this plugin's GEMV kernel (gemv.c through `llmkit_cpu::gemv`: the weights as stored, float32
sums, the output rounded once to the block's dtype, as `F.linear` does; a bfloat16 block's
activations go in as they are, for AVX512_BF16's vdpbf16ps where the CPU has it) when the kernels
can be built here (`kernels.ready`, checked at bind time), else by `F.linear`: same formula, the
kernel streams the expert's weights about twice as fast (README, MoE layer). Larger
bfloat16 slices (more than `quant.PACKED_MAX_ROWS` tokens) on a CPU without bf16 instructions are
multiplied in float32 (`quant.WIDEN_BF16`).

At prefill (beyond moe_decode's tokens) the experts' slices of more than `GEMV_MAX_ROWS` tokens go
to one call of `llmkit_cpu::moe_experts` (ops.cpp), which gives each thread whole experts, largest
first, and runs each product as PyTorch's GEMM on that one thread: a Mixtral-proportioned expert's
slice of ~128 tokens kept 90-93% of a 1024^3 product's rate on one thread and 71-87% split over two
(AVX-512 VM), and its eight experts together went from 71-75% to 95% of that rate in float32 and
from 80-83% to 97% in bfloat16. A slice too large to share (`_together`) keeps all threads.

The routing statistics of a moe_decode call are built from its outputs where no auxiliary loss has
a coefficient (record_routing's PyTorch operations cost 0.07-0.09 ms a call with cold caches). In
a compiled decode step the whole layer is one op, `llmkit_cpu::moe_layer`, run eagerly: the
routing's branches and statistics would break the graph (README, compiled decode).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from llmkit_blocks import mlp as _mlp
from llmkit_blocks import moe as _moe

from . import quant

GEMV_MAX_ROWS = quant.GEMV_MAX_ROWS
"""Up to this many tokens an expert's products are GEMVs (each weight read once, the rows reuse it
from cache); beyond, PyTorch's GEMM."""
DECODE_MAX_TOKENS = {torch.float32: 512, torch.bfloat16: 64}
"""Up to this many tokens a call is one `moe_decode` call on a CPU whose row kernels take several
rows of x in one pass (float32: AVX-512F; bfloat16: AVX512_BF16), else up to `GEMV_MAX_ROWS`.
The grouped path's time over moe_decode's (benchmarks/moe_decode_range.py: the Mixtral-proportioned
layer, AVX-512 VM, 2 threads, cold caches, two runs): float32 1.1-1.2x at 4-8 tokens, 1.5-2.3x at
16-256 and 1.18-1.20x at 512 (faster than PyTorch's float32 GEMM, MKL, here); bfloat16 1.2-1.4x at
4-8, 1.3-1.9x at 16-64, 1.00-1.02x at 128, 0.81x at 256 and 0.56-0.58x at 512 (oneDNN's
vdpbf16ps GEMMs). Not measured on other CPUs."""
SHARE_SLACK = 1.2
"""How much longer than an even share one thread's experts may take in `_experts_together`: a GEMM
of ~128 rows kept 90-93% of the peak on one thread against 71-87% on two (AVX-512 VM, 2 threads)."""
_ABSENT = torch.empty(0)  # moe_decode's absent operand
_SCORING = {"softmax": 0, "sigmoid": 1}
_ACTIVATION = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


_LAYERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
"""The bound blocks (and the copies run eagerly) by `id`: where a compiled step's
`llmkit_cpu::moe_layer` call finds its block."""


def prepare(block: Any, target: Any) -> None:
    """`quant.prepare_gemv`, and the block made known to `llmkit_cpu::moe_layer` (defined here at the
    first bind)."""
    quant.prepare_gemv(block, target)
    if target.device != "meta":  # the op's fake impl imports torch's tracing machinery (kernels.py)
        _layer_op()
    _LAYERS[id(block)] = block


@functools.cache
def _layer_op() -> torch.library.Library:
    """Define `llmkit_cpu::moe_layer(Tensor x, int layer) -> Tensor`: this impl's forward of the
    bound block `id(block) == layer` on x, run eagerly. A compiled decode step calls it in place
    of the layer (`grouped_forward`)."""
    lib = torch.library.Library("llmkit_cpu", "FRAGMENT")
    lib.define("moe_layer(Tensor x, int layer) -> Tensor")
    lib.impl("moe_layer", _layer_call, "CPU")
    torch.library.register_fake("llmkit_cpu::moe_layer", lambda x, layer: torch.empty_like(x), lib=lib)
    return lib


def _layer_call(x: torch.Tensor, layer: int) -> torch.Tensor:
    block = _LAYERS.get(layer)
    if block is None:
        raise RuntimeError(f"llmkit_cpu::moe_layer: no cpu.grouped block with id {layer} was bound or run; "
                           "run a copied model once without compiling (generate's prefill does) or bind it again")
    return _forward(block, x)


def _expert(lin: Callable[..., torch.Tensor], block: Any, e: int, x: torch.Tensor) -> torch.Tensor:
    """`_moe.expert` (mlp@1's formula) with `lin(x, w, b)` for its products."""
    c = block.config
    bias = c.expert_bias
    up = lin(x, block.w_up[e], block.b_up[e] if bias else None)
    if c.gated:
        h = _mlp.activation(c.activation, lin(x, block.w_gate[e], block.b_gate[e] if bias else None)) * up
    else:
        h = _mlp.activation(c.activation, up)
    return lin(h, block.w_down[e], block.b_down[e] if bias else None)


def _decode(block: Any, h: torch.Tensor, capacity: int | None) -> tuple[torch.Tensor, ...]:
    """moe_decode's (out, logits, scores, selected, weights, counts, info, aux_loss) for the tokens
    h [n, d] (`kernels.MOE_DECODE_SCHEMA`)."""
    c = block.config
    bias = c.expert_bias
    return torch.ops.llmkit_cpu.moe_decode.default(
        h.contiguous(), block.router, block.correction_bias if c.correction_bias else _ABSENT,
        block.w_gate if c.gated else _ABSENT, block.w_up, block.w_down,
        block.b_gate if bias and c.gated else _ABSENT, block.b_up if bias else _ABSENT,
        block.b_down if bias else _ABSENT, c.top_k, _SCORING[c.scoring], c.n_group or 0, c.topk_group or 0,
        int(c.renormalize == "sum"), c.routed_scaling, -1 if capacity is None else capacity,
        _ACTIVATION[c.activation])


def _together(h: torch.Tensor, slices: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The prefill-sized slices (more than `GEMV_MAX_ROWS` tokens) that `_experts_together` runs, one
    expert per thread, largest first: all but those too large to share, each taken out (and
    multiplied by all threads) while it alone holds more than `SHARE_SLACK` times a thread's share
    of the rows left."""
    if quant.WIDEN_BF16 and h.dtype == torch.bfloat16:
        return []
    big = sorted((s for s in slices if s[2] - s[1] > GEMV_MAX_ROWS), key=lambda s: s[1] - s[2])
    left = sum(s[2] - s[1] for s in big)
    threads = torch.get_num_threads()
    while big and (big[0][2] - big[0][1]) * threads > SHARE_SLACK * left:
        left -= big[0][2] - big[0][1]
        big.pop(0)
    return big


def _experts_together(block: Any, h: torch.Tensor, token: torch.Tensor,
                      slices: list[tuple[int, int, int]]) -> dict[int, torch.Tensor]:
    """Each slice's expert outputs (by expert) from one `llmkit_cpu::moe_experts` call, which spreads
    the experts over the threads, each product one single-threaded GEMM (ops.cpp: at ~128 rows a
    GEMM on one thread keeps more of its peak than split over two)."""
    c = block.config
    bias = c.expert_bias
    rows = torch.cat([token[start:keep] for _, start, keep in slices])
    sizes = [keep - start for _, start, keep in slices]
    y = torch.ops.llmkit_cpu.moe_experts.default(
        h.index_select(0, rows), torch.tensor([e for e, _, _ in slices]), torch.tensor(sizes),
        block.w_gate if c.gated else _ABSENT, block.w_up, block.w_down,
        block.b_gate if bias and c.gated else _ABSENT, block.b_up if bias else _ABSENT,
        block.b_down if bias else _ABSENT, _ACTIVATION[c.activation])
    return {e: part for (e, _, _), part in zip(slices, y.split(sizes))}


def _grouped(block: Any, h: torch.Tensor, capacity: int | None, gemv: bool) -> tuple[torch.Tensor, ...]:
    """The module docstring's grouping with PyTorch operations and this plugin's kernels: (out,
    logits, scores, selected, weights, counts)."""
    c = block.config
    logits, scores, selected, weights = _moe.route(block, h)
    flat = selected.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=c.n_experts)
    token = order // c.top_k
    mix = weights.reshape(-1)[order].to(h.dtype)[:, None]
    slices = []  # (expert, first assignment, end of its served ones)
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count:
            slices.append((e, start, start + (count if capacity is None else min(count, capacity))))
        start += count
    together = _experts_together(block, h, token, chosen) if gemv and (chosen := _together(h, slices)) else {}
    out = torch.zeros_like(h)
    wide = quant.WIDEN_BF16 and h.dtype == torch.bfloat16
    for e, start, keep in slices:
        rows = token[start:keep]
        if e in together:
            y = together[e]
        elif gemv and keep - start <= GEMV_MAX_ROWS:
            y = _expert(quant.gemv_linear, block, e, h.index_select(0, rows))
        elif wide and keep - start > quant.PACKED_MAX_ROWS:  # prefill-sized, as quant.linear widens
            y = _expert(quant.wide_linear, block, e, h.index_select(0, rows))
        else:
            y = _moe.expert(block, e, h.index_select(0, rows))
        out.index_add_(0, rows, y * mix[start:keep])
    return out, logits, scores, selected, weights, counts


@functools.cache
def decode_max_tokens(dtype: torch.dtype) -> int:
    """The most tokens a `dtype` call gives `moe_decode` here (`DECODE_MAX_TOKENS`)."""
    if dtype == torch.bfloat16:
        several = not quant.WIDEN_BF16
    else:
        several = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return DECODE_MAX_TOKENS[dtype] if several else GEMV_MAX_ROWS


def grouped_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        # one opaque op in the compiled graph: the routing's data-dependent branches and statistics
        # (Python numbers) would break it, and a break inside the model's loop over its layers
        # left the whole model eager, traced again at every generate call (tiny-mixtral: 20x
        # slower than eager)
        return torch.ops.llmkit_cpu.moe_layer.default(x, id(block))
    if id(block) not in _LAYERS:  # a copy of a bound block (copy.deepcopy), met here first
        _LAYERS[id(block)] = block
    return _forward(block, x)


def _forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    c = block.config
    h = x.reshape(-1, c.d_model)
    n = h.shape[0]
    capacity = None if c.capacity_factor is None else math.ceil(c.capacity_factor * n * c.top_k / c.n_experts)
    gemv = quant.gemv_ready(block, h, block.w_up, block.router)
    jitter = block.training and c.jitter > 0  # route's noise on the router's input
    decoded = gemv and 0 < n <= decode_max_tokens(h.dtype) and not jitter
    tied = True
    if decoded:
        out, logits, scores, selected, weights, counts, info, aux_loss = _decode(block, h, capacity)
        tied, most, dropped = info.tolist()
    if tied:  # not decoded, or an exact tie decided moe_decode's routing
        out, logits, scores, selected, weights, counts = _grouped(block, h, capacity, gemv)
    out = _moe.add_shared(block, h, out)
    if tied or c.load_balance_coef or c.z_loss_coef or c.seq_balance_coef:
        _moe.record_routing(block, x, logits, scores, selected, weights, capacity, counts)
    else:
        # record_routing's statistics without its PyTorch operations (0.07-0.09 ms with cold caches,
        # a tenth of a bfloat16 token's layer: README, MoE layer): the largest count, the dropped
        # assignments and the zero loss come from moe_decode; no loss has a coefficient. Set past
        # nn.Module.__setattr__, whose checks for a parameter, buffer or module (the statistics are
        # none) took another 0.02 ms cold
        object.__setattr__(block, "routing", _moe.RoutingStats(
            selected=selected, weights=weights, tokens_per_expert=counts, dropped=dropped,
            imbalance=most / (n * c.top_k / c.n_experts), aux_loss=aux_loss, losses={}))
    return out.reshape(x.shape)

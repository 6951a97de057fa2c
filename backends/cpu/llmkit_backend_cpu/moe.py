"""CPU impl `cpu.grouped` of `moe@1`: tokens grouped by expert, one GEMM chain per active expert.

Routing is the catalogue's (`llmkit_blocks.moe.route`: the same router, scores, group limit,
correction bias, renormalisation and scaling), so only the expert computation differs from the
reference: the N * top_k (token, slot) assignments are sorted by expert with a stable sort, so
each expert's tokens are one contiguous slice, in token order (capacity drops keep the first
tokens, as the reference does). Each active expert runs act(x Wg^T) * (x Wu^T) Wd^T on its slice
only — a handful of tokens at decode, a large GEMM at prefill — and the rows, weighted by their
routing weight, are added back with one `index_add_`. Inactive experts cost nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llmkit_blocks import moe as _moe


def grouped_forward(block: Any, x: torch.Tensor) -> torch.Tensor:
    c = block.config
    h = x.reshape(-1, c.d_model)
    n = h.shape[0]
    logits, scores, selected, weights = _moe.route(block, h)
    flat = selected.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=c.n_experts)
    capacity = None if c.capacity_factor is None else math.ceil(c.capacity_factor * n * c.top_k / c.n_experts)
    token = order // c.top_k
    mix = weights.reshape(-1)[order].to(x.dtype)[:, None]
    out = torch.zeros_like(h)
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        end = start + count
        keep = end if capacity is None else start + min(count, capacity)
        rows = token[start:keep]
        y = _moe.expert(block, e, h.index_select(0, rows))
        out.index_add_(0, rows, y * mix[start:keep])
        start = end
    out = _moe.add_shared(block, h, out)
    _moe.record_routing(block, x, logits, scores, selected, weights, capacity, counts)
    return out.reshape(x.shape)

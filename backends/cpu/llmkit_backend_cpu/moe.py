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
import torch.nn.functional as F

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
    if c.shared_hidden is not None:
        shared = block.shared(h)
        if c.shared_gate:
            shared = torch.sigmoid(F.linear(h, block.shared_gate)) * shared
        out = out + shared
    losses = _moe.aux_losses(c, x, logits, scores, selected, counts)
    coefs = {"load_balance": c.load_balance_coef, "z_loss": c.z_loss_coef, "seq_balance": c.seq_balance_coef}
    block.routing = _moe.RoutingStats(
        selected=selected,
        weights=weights.detach(),
        tokens_per_expert=counts,
        dropped=0 if capacity is None else int((counts - capacity).clamp(min=0).sum()),
        imbalance=int(counts.max()) / (n * c.top_k / c.n_experts) if n else 0.0,
        aux_loss=sum((coefs[k] * v for k, v in losses.items()), torch.zeros((), dtype=logits.dtype)),
        losses=losses,
    )
    return out.reshape(x.shape)

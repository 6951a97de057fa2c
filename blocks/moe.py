"""Mixture of experts, kind `moe@1`: a router sends each token to top_k of n_experts MLPs.

Per token x [d_model] (leading dims are flattened into N tokens), E = n_experts, k = top_k:

    logits = W_r x                                  router [E, d_model], in the storage dtype
    s      = softmax(logits) | sigmoid(logits)      in float32 (float64 for float64 inputs)
    c      = s + b                                  b = correction_bias: used to CHOOSE only
    groups: c split into n_group groups of E / n_group experts; a group scores the sum of its two
            best c; experts outside the topk_group best groups get c = -inf
    chosen = top_k experts by c
    w      = s[chosen]                              the unbiased scores
    w      = w / sum(w)                             renormalize: sum (none: kept as is)
    w      = routed_scaling * w
    y      = sum_j w_j.to(dtype) * expert_{chosen_j}(x)  +  sigmoid(g . x) * shared(x)

expert_e is mlp@1's formula with the e-th slice of the fused expert weights, in the storage dtype:
    gated:   W_down[e] (act(W_gate[e] x + b_gate[e]) * (W_up[e] x + b_up[e])) + b_down[e]
    ungated: W_down[e] act(W_up[e] x + b_up[e]) + b_down[e]
shared(x) is an `mlp@1` child block (`shared`, hidden = shared_hidden, same gated / activation /
bias as the experts); its sigmoid gate g [1, d_model] is optional.

Which original each option matches (transformers 5.x class names):
- softmax over all experts, then top-k, renormalize sum: MixtralSparseMoeBlock; DbrxFFN with
  moe_normalize_expert_weights=1 (a p=1 norm of positive weights is their sum).
- softmax, top-k, renormalize none, shared expert with a sigmoid gate: Qwen2MoeSparseMoeBlock
  (norm_topk_prob false, Qwen1.5-MoE-A2.7B); renormalize none is also Grok-1's routing.
- sigmoid, correction_bias (e_score_correction_bias), n_group / topk_group, renormalize sum
  (norm_topk_prob), routed_scaling (routed_scaling_factor), shared experts: DeepseekV3MoE.
- jitter: DBRX's moe_jitter_eps. In training only (`block.training`), the router's input (not the
  experts') is multiplied by uniform(1 - jitter, 1 + jitter) noise.
- capacity_factor (Switch Transformer / GShard): capacity C = ceil(capacity_factor * N * k / E);
  each expert serves its first C (token, slot) assignments in token order over all N tokens of
  the call (SwitchTransformersTop1Router's cumsum priority, which counts per sequence); a dropped
  assignment contributes nothing. A token's output then depends on the other tokens of the call,
  so prefill and decode can differ.
Two precision choices, both invisible in float32/float64: the routing weights are cast to the
storage dtype before they scale the expert outputs (Mixtral's original code and transformers 4.x;
transformers 5.x scales in float32 and casts after), and the router logits are computed in the
storage dtype (Mixtral, Qwen-MoE, DBRX; transformers' DeepseekV3TopkRouter upcasts x and W_r to
float32 first).

After every forward the block's `routing` attribute holds a `RoutingStats`: the choices, the
weights, per-expert counts and the auxiliary losses. With f_e = (number of (token, slot)
assignments to e) / (N k), counted before capacity dropping, and p the router probabilities
(softmax; for sigmoid scoring the scores normalised to sum to 1 per token):
    load_balance = E * sum_e f_e * mean_t p_{t,e}     Switch Transformer eq. 4 (1 when uniform);
                   transformers' load_balancing_loss_func returns top_k times this value
    z_loss       = mean_t logsumexp(logits_t)^2       ST-MoE router z-loss
    seq_balance  = mean_b sum_e f'_{b,e} * mean_t p_{b,t,e}, with f'_{b,e} = E / (k T) * (number
                   of tokens t of sequence b that chose e): DeepSeek-V3's sequence-wise balance
                   loss (eqs. 17-20), which needs x of shape [B, T, d_model]
    aux_loss     = load_balance_coef * load_balance + z_loss_coef * z_loss
                   + seq_balance_coef * seq_balance   (only the terms whose coefficient is non-zero)
The counts f are not differentiable; the gradient reaches the router through p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from llmkit.hookspecs import BlockKind, Cost, ParamSpec

from . import mlp as _mlp


class MoEConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["moe"] = "moe"
    """Tag that tells a MoE from a dense MLP (`type: mlp`) in a layer's `mlp` slot."""
    d_model: PositiveInt
    n_experts: PositiveInt
    top_k: PositiveInt
    hidden: PositiveInt
    """Hidden size of each routed expert."""
    gated: bool = True
    activation: _mlp.Activation = "silu"
    expert_bias: bool = False
    """Biases on the expert projections (and on the shared expert's)."""
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: Literal["none", "sum"] = "sum"
    """sum: divide the top-k weights by their sum (Mixtral, DBRX, DeepSeek norm_topk_prob);
    none: use the scores as they are (Grok-1, Qwen1.5-MoE)."""
    correction_bias: bool = False
    """DeepSeek-V3's e_score_correction_bias: added to the scores to choose, not to weight."""
    n_group: PositiveInt | None = None
    topk_group: PositiveInt | None = None
    routed_scaling: float = Field(1.0, gt=0)
    jitter: float = Field(0.0, ge=0, lt=1)
    capacity_factor: float | None = Field(None, gt=0)
    shared_hidden: PositiveInt | None = None
    """Hidden size of the always-on shared expert (DeepSeek: moe_intermediate_size * n_shared)."""
    shared_gate: bool = False
    """Scale the shared expert's output by sigmoid(shared_gate . x) (Qwen-MoE)."""
    load_balance_coef: float = Field(0.0, ge=0)
    z_loss_coef: float = Field(0.0, ge=0)
    seq_balance_coef: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts}): a token chooses "
                "top_k distinct experts"
            )
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(
                "n_group and topk_group go together (group-limited routing): set both or neither"
            )
        if self.n_group is not None and self.topk_group is not None:
            if self.n_experts % self.n_group:
                raise ValueError(
                    f"n_experts ({self.n_experts}) must be a multiple of n_group ({self.n_group})"
                )
            per_group = self.n_experts // self.n_group
            if per_group < 2:
                raise ValueError(
                    f"each group needs >= 2 experts (a group scores the sum of its two best), but "
                    f"n_experts / n_group = {per_group}; use fewer groups"
                )
            if self.topk_group > self.n_group:
                raise ValueError(
                    f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})"
                )
            if self.top_k > self.topk_group * per_group:
                raise ValueError(
                    f"top_k ({self.top_k}) must be <= topk_group * n_experts / n_group "
                    f"({self.topk_group * per_group}), the experts of the kept groups"
                )
        if self.shared_gate and self.shared_hidden is None:
            raise ValueError("shared_gate gates the shared expert: set shared_hidden too")
        return self


@dataclass
class RoutingStats:
    """What the router did in the last forward (N tokens, k = top_k, E experts)."""

    selected: torch.Tensor
    """[N, k] expert ids (long)."""
    weights: torch.Tensor
    """[N, k] routing weights (float32, float64 for float64 inputs; detached), before dropping."""
    tokens_per_expert: torch.Tensor
    """[E] (token, slot) assignments per expert (long), before capacity dropping."""
    dropped: int
    """(token, slot) assignments beyond an expert's capacity (0 without capacity_factor)."""
    imbalance: float
    """max / mean of tokens_per_expert: 1.0 is perfectly balanced."""
    aux_loss: torch.Tensor
    """Scalar: the sum of coefficient * loss over the non-zero coefficients (0.0 when none)."""
    losses: dict[str, torch.Tensor]
    """The unscaled losses with a non-zero coefficient: load_balance, z_loss, seq_balance."""


def params(c: MoEConfig) -> dict[str, ParamSpec]:
    e, d, h = c.n_experts, c.d_model, c.hidden
    out = {"router": ParamSpec((e, d))}
    if c.correction_bias:
        # a buffer, as in transformers: DeepSeek updates it by a balancing rule, not by gradient
        out["correction_bias"] = ParamSpec((e,), init="zeros", dtype="float32", buffer=True)
    if c.gated:
        out["w_gate"] = ParamSpec((e, h, d))
    out["w_up"] = ParamSpec((e, h, d))
    out["w_down"] = ParamSpec((e, d, h))
    if c.expert_bias:
        if c.gated:
            out["b_gate"] = ParamSpec((e, h), init="zeros")
        out["b_up"] = ParamSpec((e, h), init="zeros")
        out["b_down"] = ParamSpec((e, d), init="zeros")
    if c.shared_gate:
        out["shared_gate"] = ParamSpec((1, d))
    return out


def children(c: MoEConfig) -> dict[str, tuple[BlockKind, Any]]:
    if c.shared_hidden is None:
        return {}
    shared = {"d_model": c.d_model, "hidden": c.shared_hidden, "gated": c.gated,
              "activation": c.activation, "bias": c.expert_bias}
    return {"shared": (_mlp.KIND, shared)}


def features(c: MoEConfig) -> set[str]:
    out = {"gated" if c.gated else "ungated", f"act_{c.activation}",
           f"router_{c.scoring}", f"renormalize_{c.renormalize}"}
    flags = {
        "correction_bias": c.correction_bias,
        "group_limited": c.n_group is not None,
        "routed_scaling": c.routed_scaling != 1.0,
        "jitter": c.jitter > 0,
        "capacity": c.capacity_factor is not None,
        "shared_expert": c.shared_hidden is not None,
        "shared_gate": c.shared_gate,
        "expert_bias": c.expert_bias,
        "load_balance_loss": c.load_balance_coef > 0,
        "z_loss": c.z_loss_coef > 0,
        "seq_balance_loss": c.seq_balance_coef > 0,
    }
    return out | {name for name, on in flags.items() if on}


def route(block: Any, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """h [N, d] -> logits [N, E], scores [N, E], selected [N, k], weights [N, k] (float32/64)."""
    c: MoEConfig = block.config
    if block.training and c.jitter > 0:
        h = h * torch.empty_like(h).uniform_(1.0 - c.jitter, 1.0 + c.jitter)
    acc = torch.promote_types(h.dtype, torch.float32)
    logits = F.linear(h, block.router).to(acc)
    scores = logits.softmax(dim=-1) if c.scoring == "softmax" else logits.sigmoid()
    selected = choice_scores(block, scores).topk(c.top_k, dim=-1).indices
    weights = scores.gather(-1, selected)
    if c.renormalize == "sum":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, scores, selected, weights * c.routed_scaling


def choice_scores(block: Any, scores: torch.Tensor) -> torch.Tensor:
    """The scores top-k picks from: scores (+ correction bias), groups outside the top
    `topk_group` masked to -inf (DeepSeek-V3's group-limited routing)."""
    c: MoEConfig = block.config
    choice = scores + block.correction_bias if c.correction_bias else scores
    if c.n_group is None:
        return choice
    grouped = choice.view(-1, c.n_group, c.n_experts // c.n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    kept = group_scores.topk(c.topk_group, dim=-1).indices
    keep = (kept[..., None] == torch.arange(c.n_group, device=kept.device)).any(dim=1)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, c.n_experts)


def expert(block: Any, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `e` applied to the token rows `x` [n, d] (mlp@1's formula)."""
    c: MoEConfig = block.config
    bias = c.expert_bias
    return _mlp.feed_forward(
        x, block.w_up[e], block.w_down[e], c.activation,
        w_gate=block.w_gate[e] if c.gated else None,
        b_up=block.b_up[e] if bias else None,
        b_down=block.b_down[e] if bias else None,
        b_gate=block.b_gate[e] if bias and c.gated else None,
    )


def aux_losses(
    c: MoEConfig, x: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor,
    selected: torch.Tensor, counts: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The losses whose coefficient is non-zero (formulas in the module docstring)."""
    n, e, k = logits.shape[0], c.n_experts, c.top_k
    probs = scores if c.scoring == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
    out = {}
    if c.load_balance_coef:
        f = counts.to(probs.dtype) / (n * k)
        out["load_balance"] = e * (f * probs.mean(dim=0)).sum()
    if c.z_loss_coef:
        out["z_loss"] = torch.logsumexp(logits, dim=-1).pow(2).mean()
    if c.seq_balance_coef:
        if x.dim() != 3:
            raise ValueError(
                f"seq_balance_coef needs x of shape [batch, seq, d_model] to find the sequences, "
                f"got shape {tuple(x.shape)}"
            )
        b, t = x.shape[:2]
        chose = torch.zeros_like(probs).scatter_(-1, selected, 1.0).view(b, t, e)
        f = e / (k * t) * chose.sum(dim=1)
        out["seq_balance"] = (f * probs.view(b, t, e).mean(dim=1)).sum(dim=-1).mean()
    return out


def moe(block: Any, x: torch.Tensor) -> torch.Tensor:
    """x [..., d_model] -> same shape and dtype; also sets `block.routing` (a RoutingStats)."""
    c: MoEConfig = block.config
    h = x.reshape(-1, c.d_model)
    n = h.shape[0]
    logits, scores, selected, weights = route(block, h)
    mix = weights.to(x.dtype)
    capacity = None
    if c.capacity_factor is not None:
        capacity = math.ceil(c.capacity_factor * n * c.top_k / c.n_experts)

    out = torch.zeros_like(h)
    for e in range(c.n_experts):
        # row-major nonzero lists an expert's assignments in token order: first come, first served
        # no early exit for an expert without tokens: its empty GEMM adds nothing, and the loop
        # stays free of data-dependent branches, so torch.export (ONNX export) can trace it
        token, slot = torch.nonzero(selected == e, as_tuple=True)
        if capacity is not None:
            token, slot = token[:capacity], slot[:capacity]
        y = expert(block, e, h.index_select(0, token))
        out.index_add_(0, token, y * mix[token, slot, None])
    out = add_shared(block, h, out)
    record_routing(block, x, logits, scores, selected, weights, capacity)
    return out.reshape(x.shape)


def add_shared(block: Any, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out + the shared expert's output on h [N, d] (sigmoid-gated when `shared_gate`, Qwen2-MoE);
    out unchanged when the config has no shared expert."""
    c: MoEConfig = block.config
    if c.shared_hidden is None:
        return out
    shared = block.shared(h)
    if c.shared_gate:
        shared = torch.sigmoid(F.linear(h, block.shared_gate)) * shared
    return out + shared


def routing_matrix(selected: torch.Tensor, weights: torch.Tensor, n_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, E] routing weights, 0 where a token did not choose the expert: the dense form of
    (selected, weights), built as a one-hot sum (no scatter, so it exports to plain ONNX/linalg)."""
    chosen = selected[..., None] == torch.arange(n_experts, device=selected.device)
    return (chosen.to(dtype) * weights.to(dtype)[..., None]).sum(dim=1)


def record_routing(block: Any, x: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor,
                   selected: torch.Tensor, weights: torch.Tensor, capacity: int | None = None,
                   counts: torch.Tensor | None = None) -> None:
    """Set `block.routing` (a RoutingStats) from one forward's routing, as every moe@1 impl must.
    `counts` ([E] assignments per expert) is computed unless the impl already has it."""
    c: MoEConfig = block.config
    n = selected.shape[0]
    if counts is None:
        counts = torch.bincount(selected.flatten(), minlength=c.n_experts)
    losses = aux_losses(c, x, logits, scores, selected, counts)
    coefs = {"load_balance": c.load_balance_coef, "z_loss": c.z_loss_coef,
             "seq_balance": c.seq_balance_coef}
    aux_loss = sum((coefs[name] * loss for name, loss in losses.items()),
                   torch.zeros((), dtype=logits.dtype, device=x.device))
    block.routing = RoutingStats(
        selected=selected,
        weights=weights.detach(),
        tokens_per_expert=counts,
        dropped=0 if capacity is None else int((counts - capacity).clamp(min=0).sum()),
        imbalance=counts.max().item() / (n * c.top_k / c.n_experts) if n else 0.0,
        aux_loss=aux_loss,
        losses=losses,
    )


def cost(c: MoEConfig, context: int) -> Cost:
    """Router E * d; E experts of (2 or 3) * d * hidden (+ biases), of which a token uses top_k;
    shared gate d (the shared expert is a child mlp@1 block). The correction bias is a buffer."""
    per_expert_matmul = (3 if c.gated else 2) * c.d_model * c.hidden
    per_expert = per_expert_matmul + ((2 * c.hidden if c.gated else c.hidden) + c.d_model if c.expert_bias else 0)
    router = c.n_experts * c.d_model
    extra = c.d_model if c.shared_gate else 0
    return Cost(
        params=router + c.n_experts * per_expert + extra,
        inactive_params=(c.n_experts - c.top_k) * per_expert,
        flops=2 * (router + c.top_k * per_expert_matmul + (c.d_model if c.shared_gate else 0)),
    )

KIND = BlockKind(
    name="moe",
    version=1,
    config=MoEConfig,
    params=params,
    reference=moe,
    features=features,
    children=children,
    cost=cost,
    summary="mixture of experts: softmax/sigmoid top-k router, fused experts, shared expert, aux losses",
)

"""Token embedding (`embedding@1`) and LM head (`head@1`).

embedding: h = E[ids] * m, where m = `multiplier` (Grok-1: 78.38367176906169 = sqrt(6144));
           with `round_multiplier` m is first rounded to the storage dtype, as Gemma does with
           `torch.tensor(hidden_size**0.5, dtype=hidden.dtype)`.
head:      logits = (h W^T + b) * `multiplier` (Grok-1: 0.5773502691896257 = 1/sqrt(3)), then the
           optional final soft-cap `cap * tanh(logits / cap)` (Gemma-2: 30).
           With `tied: true` the head owns no weight; its forward takes the embedding matrix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from llmkit.hookspecs import BlockKind, Cost, ParamSpec


class EmbeddingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: PositiveInt
    d_model: PositiveInt
    multiplier: float = 1.0
    round_multiplier: bool = False


def embedding_params(c: EmbeddingConfig) -> dict[str, ParamSpec]:
    return {"weight": ParamSpec((c.vocab_size, c.d_model))}


def embedding_features(c: EmbeddingConfig) -> set[str]:
    out = set()
    if c.multiplier != 1.0:
        out.add("multiplier")
    if c.round_multiplier:
        out.add("round_multiplier")
    return out


def embedding(block: Any, ids: torch.Tensor) -> torch.Tensor:
    """Look up token ids [..., T] -> [..., T, d_model], scaled by the multiplier."""
    c: EmbeddingConfig = block.config
    h = F.embedding(ids, block.weight)
    if c.multiplier == 1.0:
        return h
    m = torch.tensor(c.multiplier, dtype=h.dtype, device=h.device) if c.round_multiplier else c.multiplier
    return h * m


class HeadConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    d_model: PositiveInt
    vocab_size: PositiveInt
    tied: bool = False
    bias: bool = False
    multiplier: float = 1.0
    softcap: float | None = Field(None, gt=0)


def head_params(c: HeadConfig) -> dict[str, ParamSpec]:
    out = {} if c.tied else {"weight": ParamSpec((c.vocab_size, c.d_model))}
    if c.bias:
        out["bias"] = ParamSpec((c.vocab_size,), init="zeros")
    return out


def head_features(c: HeadConfig) -> set[str]:
    out = {"tied" if c.tied else "untied"}
    if c.bias:
        out.add("bias")
    if c.multiplier != 1.0:
        out.add("multiplier")
    if c.softcap is not None:
        out.add("softcap")
    return out


def head(block: Any, x: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Project hidden states [..., d_model] to logits [..., vocab_size]."""
    c: HeadConfig = block.config
    check_tied(c, tied_weight)
    w = tied_weight if c.tied else block.weight
    return finish_logits(c, F.linear(x, w, block.bias if c.bias else None))


def check_tied(c: HeadConfig, tied_weight: torch.Tensor | None) -> None:
    if c.tied and tied_weight is None:
        raise ValueError("head@1 with tied: true needs the embedding matrix as tied_weight")
    if not c.tied and tied_weight is not None:
        raise ValueError("head@1 with tied: false owns its weight; do not pass tied_weight")


def finish_logits(c: HeadConfig, logits: torch.Tensor) -> torch.Tensor:
    """The output multiplier, then the final soft-cap c * tanh(logits / c)."""
    if c.multiplier != 1.0:
        logits = logits * c.multiplier
    if c.softcap is not None:
        logits = c.softcap * torch.tanh(logits / c.softcap)
    return logits


def embedding_cost(c: EmbeddingConfig, context: int) -> Cost:
    return Cost(params=c.vocab_size * c.d_model)  # a lookup, no multiply


def head_cost(c: HeadConfig, context: int) -> Cost:
    """The projection always costs 2 * d_model * vocab FLOPs; its weight is the embedding's when tied."""
    own = 0 if c.tied else c.vocab_size * c.d_model
    return Cost(params=own + (c.vocab_size if c.bias else 0), flops=2 * c.d_model * c.vocab_size)

EMBEDDING = BlockKind(
    name="embedding",
    version=1,
    config=EmbeddingConfig,
    params=embedding_params,
    reference=embedding,
    features=embedding_features,
    cost=embedding_cost,
    summary="token embedding with optional multiplier",
)

HEAD = BlockKind(
    name="head",
    version=1,
    config=HeadConfig,
    params=head_params,
    reference=head,
    features=head_features,
    cost=head_cost,
    summary="LM head: tied or untied, output multiplier, final logit soft-cap",
)

"""Normalisation: RMSNorm and LayerNorm, one block kind `norm@1`.

RMSNorm   y = x / sqrt(mean(x^2) + eps) * w        (w -> 1 + w with `unit_offset`, Gemma)
LayerNorm y = (x - mean(x)) / sqrt(var(x) + eps) * w + b   (biased variance; `bias: false` = DBRX)

Statistics are computed in float32 (float64 for float64 inputs), never in the storage dtype. Where
the result is cast back to the input dtype is part of the contract, because it changes the bits:
- `cast: before_weight`: cast the normalised value, then multiply by the weight in the storage
  dtype — transformers' LlamaRMSNorm (`weight * hidden.to(input_dtype)`);
- `cast: after_weight`: multiply (and add the bias) in float32, cast at the end — GemmaRMSNorm
  (`(x * (1 + w.float())).type_as(x)`), Grok-1's RMSNorm, torch.nn.LayerNorm.
The default is the family's usual convention: before_weight for RMSNorm, after_weight for LayerNorm.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from llmkit.hookspecs import BlockKind, Cost, ParamSpec


class NormConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["rms", "layer"] = "rms"
    dim: PositiveInt
    eps: float = Field(1e-6, gt=0)
    unit_offset: bool = False
    """RMSNorm only: scale by (1 + w) and initialise w to zero (Gemma)."""
    bias: bool = False
    """LayerNorm only: add a learned bias (torch.nn.LayerNorm has one; DBRX's LayerNorm does not)."""
    cast: Literal["before_weight", "after_weight"] | None = None

    @model_validator(mode="after")
    def _check(self) -> NormConfig:
        if self.type == "rms" and self.bias:
            raise ValueError("bias applies to LayerNorm only (type: layer); RMSNorm has no bias")
        if self.type == "layer" and self.unit_offset:
            raise ValueError("unit_offset applies to RMSNorm only (type: rms)")
        if self.cast is None:
            default = "before_weight" if self.type == "rms" else "after_weight"
            object.__setattr__(self, "cast", default)
        return self


def params(c: NormConfig) -> dict[str, ParamSpec]:
    out = {"weight": ParamSpec((c.dim,), init="zeros" if c.unit_offset else "ones")}
    if c.bias:
        out["bias"] = ParamSpec((c.dim,), init="zeros")
    return out


def features(c: NormConfig) -> set[str]:
    out = {f"{c.type}norm", f"cast_{c.cast}"}
    if c.unit_offset:
        out.add("unit_offset")
    if c.bias:
        out.add("bias")
    return out


def norm(block: Any, x: torch.Tensor) -> torch.Tensor:
    """Normalise the last dimension of `x` (see the module docstring for the exact formula)."""
    c: NormConfig = block.config
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    if c.type == "rms":
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + c.eps)
    else:
        h = h - h.mean(-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + c.eps)
    if c.cast == "before_weight":
        w = block.weight + 1 if c.unit_offset else block.weight
        y = h.to(x.dtype) * w
        return y + block.bias if c.bias else y
    w = block.weight.to(acc) + 1 if c.unit_offset else block.weight.to(acc)
    y = h * w
    if c.bias:
        y = y + block.bias.to(acc)
    return y.to(x.dtype)


def cost(c: NormConfig, context: int) -> Cost:
    return Cost(params=c.dim * (2 if c.bias else 1))

KIND = BlockKind(
    name="norm",
    version=1,
    config=NormConfig,
    params=params,
    reference=norm,
    features=features,
    cost=cost,
    summary="RMSNorm / LayerNorm over the last dimension, statistics in float32",
)

"""The decoder layer, kind `layer@1`: norms, attention (or MLA) and MLP (or MoE) with residuals.

placement `pre` (Llama, Mistral, Qwen, Mixtral, DBRX, DeepSeek):
    h = x + attn(attn_norm(x));  y = h + mlp(mlp_norm(h))
placement `sandwich` (Grok-1; Gemma-2's pre/post feed-forward norms): the sublayer outputs are
normalised too before the residual add:
    h = x + post_attn_norm(attn(attn_norm(x)));  y = h + post_mlp_norm(mlp(mlp_norm(h)))
`parallel: true` (GPT-J/NeoX-style): both sublayers read the same input:
    y = x + attn(attn_norm(x)) + mlp(mlp_norm(x))
Every norm takes the layer's `norm` config (dim = d_model). The attention slot holds an
`attention@1` or `mla@1` config (`type: mla`), the mlp slot an `mlp@1` or `moe@1` config
(`type: moe`); each sublayer is a child block resolved on its own.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, PositiveInt, Tag, model_validator

from llmkit.cache import LayerCache
from llmkit.hookspecs import BlockKind, Cost, ParamSpec

from . import attention as _attention
from . import mlp as _mlp
from . import moe as _moe
from . import norm as _norm


def _tag(default: str):
    def pick(value: Any) -> str:
        if isinstance(value, dict):
            return value.get("type", default)
        return getattr(value, "type", default)

    return pick


AttentionSlot = Annotated[
    Annotated[_attention.AttentionConfig, Tag("attention")] | Annotated[_attention.MLAConfig, Tag("mla")],
    Discriminator(_tag("attention")),
]
MLPSlot = Annotated[
    Annotated[_mlp.MLPConfig, Tag("mlp")] | Annotated[_moe.MoEConfig, Tag("moe")],
    Discriminator(_tag("mlp")),
]


class NormSpec(BaseModel):
    """A norm@1 config without `dim` (the layer fills in d_model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["rms", "layer"] = "rms"
    eps: float = 1e-6
    unit_offset: bool = False
    bias: bool = False
    cast: Literal["before_weight", "after_weight"] | None = None


class LayerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    d_model: PositiveInt
    norm: NormSpec = NormSpec()
    placement: Literal["pre", "sandwich"] = "pre"
    parallel: bool = False
    attention: AttentionSlot
    mlp: MLPSlot

    @model_validator(mode="before")
    @classmethod
    def _share_d_model(cls, data: Any) -> Any:
        # sublayer configs may omit d_model; it is the layer's
        if isinstance(data, dict) and "d_model" in data:
            data = dict(data)
            for slot in ("attention", "mlp"):
                if isinstance(data.get(slot), dict):
                    data[slot] = {"d_model": data["d_model"], **data[slot]}
        return data

    @model_validator(mode="after")
    def _check(self) -> LayerConfig:
        for slot in ("attention", "mlp"):
            sub = getattr(self, slot)
            if sub.d_model != self.d_model:
                raise ValueError(f"{slot}.d_model ({sub.d_model}) must equal the layer's d_model ({self.d_model})")
        if self.parallel and self.placement == "sandwich":
            raise ValueError("parallel layers use pre-norm placement; sandwich norms are for sequential layers")
        try:  # validate the norm once here, so its error names the layer field
            _norm.NormConfig(dim=self.d_model, **self.norm.model_dump(exclude_none=True))
        except ValueError as exc:
            raise ValueError(f"norm: {exc}") from None
        return self


def params(c: LayerConfig) -> dict[str, ParamSpec]:
    return {}


def children(c: LayerConfig) -> dict[str, tuple[BlockKind, Any]]:
    norm_cfg = {"dim": c.d_model, **c.norm.model_dump(exclude_none=True)}
    attn_kind = _attention.MLA if isinstance(c.attention, _attention.MLAConfig) else _attention.ATTENTION
    mlp_kind = _moe.KIND if isinstance(c.mlp, _moe.MoEConfig) else _mlp.KIND
    out: dict[str, tuple[BlockKind, Any]] = {
        "attn_norm": (_norm.KIND, norm_cfg),
        "attention": (attn_kind, c.attention),
        "mlp_norm": (_norm.KIND, norm_cfg),
        "mlp": (mlp_kind, c.mlp),
    }
    if c.placement == "sandwich":
        out["post_attn_norm"] = (_norm.KIND, norm_cfg)
        out["post_mlp_norm"] = (_norm.KIND, norm_cfg)
    return out


def features(c: LayerConfig) -> set[str]:
    out = {f"placement_{c.placement}"}
    if c.parallel:
        out.add("parallel")
    return out


def layer(block: Any, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
    """x [B, T, d_model], positions [B, T] or [T] -> [B, T, d_model]."""
    c: LayerConfig = block.config
    a = block.attention(block.attn_norm(x), positions, cache)
    if c.parallel:
        return x + a + block.mlp(block.mlp_norm(x))
    if c.placement == "sandwich":
        h = x + block.post_attn_norm(a)
        return h + block.post_mlp_norm(block.mlp(block.mlp_norm(h)))
    h = x + a
    return h + block.mlp(block.mlp_norm(h))


def cost(c: LayerConfig, context: int) -> Cost:
    return Cost(params=0)  # everything is in the child blocks

KIND = BlockKind(
    name="layer",
    version=1,
    config=LayerConfig,
    params=params,
    reference=layer,
    features=features,
    children=children,
    cost=cost,
    summary="decoder layer: pre-norm or sandwich norms, optional parallel attention + MLP, dense or MoE",
)

"""Rotary position embedding (RoPE), kind `rope@1`, with the scaling variants of the seed models.

For each pair of channels (a, b) of the rotated part and frequency w_i:
    a' = a cos(p w_i) - b sin(p w_i),   b' = b cos(p w_i) + a sin(p w_i),   p = token position.
Base frequencies w_i = theta^(-2i/d), i < d/2, d = rotary dim = int(head_dim * partial).
Layouts: `half` pairs channel i with i + d/2 (rotate_half: Llama, Mistral, Qwen, GPT-NeoX);
`interleaved` pairs 2i with 2i+1 (GPT-J; DeepSeek's MLA rope key). transformers'
`apply_rotary_pos_emb_interleave` de-interleaves q and k identically before rotating, so its
q.k scores equal ours though its channel order differs. Channels beyond d pass through unchanged.

Scaling (transformers' modeling_rope_utils, same names):
- linear:  w_i / factor.
- dynamic (NTK): base theta * (factor * L / L0 - (factor - 1)) ** (d / (d - 2)) with
  L = max(max position + 1, L0), L0 = original_max_position_embeddings. L is taken from the
  positions of the current call (transformers keeps the largest L seen; with a growing cache the
  two agree).
- yarn: blend of w_i (extrapolation) and w_i / factor (interpolation) by a linear ramp between
  the correction dims of beta_fast and beta_slow (floor/ceil when `truncate`); cos and sin are
  multiplied by attention_factor (default mscale(factor, mscale) / mscale(factor, mscale_all_dim),
  or mscale(factor) = 0.1 ln(factor) + 1).
- llama3: w_i / factor for wavelengths above L0 / low_freq_factor, w_i below L0 / high_freq_factor,
  a smooth blend in between.

Inverse frequencies are evaluated in float64. Angles p * w_i are computed in float32, or float64
for float64 inputs, never in bf16/fp16 (positions beyond 2^15 stay exact); cos and sin are then
cast to the storage dtype and applied there, as transformers does.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from llmkit.hookspecs import BlockKind, Cost, ParamSpec

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class LinearScaling(BaseModel):
    model_config = _FROZEN
    type: Literal["linear"]
    factor: float = Field(gt=0)


class DynamicScaling(BaseModel):
    model_config = _FROZEN
    type: Literal["dynamic"]
    factor: float = Field(gt=0)
    original_max_position_embeddings: PositiveInt


class YarnScaling(BaseModel):
    model_config = _FROZEN
    type: Literal["yarn"]
    factor: float = Field(gt=0)
    original_max_position_embeddings: PositiveInt
    beta_fast: float = Field(32.0, gt=0)
    beta_slow: float = Field(1.0, gt=0)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = Field(None, gt=0)
    truncate: bool = True


class Llama3Scaling(BaseModel):
    model_config = _FROZEN
    type: Literal["llama3"]
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(gt=0)
    high_freq_factor: float = Field(gt=0)
    original_max_position_embeddings: PositiveInt

    @model_validator(mode="after")
    def _check(self) -> Llama3Scaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor ({self.low_freq_factor})"
            )
        return self


Scaling = Annotated[
    LinearScaling | DynamicScaling | YarnScaling | Llama3Scaling, Field(discriminator="type")
]


class RopeConfig(BaseModel):
    model_config = _FROZEN

    head_dim: PositiveInt
    """Size of the vectors rotated (an attention head, or MLA's qk_rope_head_dim)."""
    theta: float = Field(10000.0, gt=0)
    layout: Literal["half", "interleaved"] = "half"
    partial: float = Field(1.0, gt=0, le=1)
    """Fraction of head_dim that is rotated (the first channels); the rest passes through."""
    scaling: Scaling | None = None

    @model_validator(mode="after")
    def _check(self) -> RopeConfig:
        d = rotary_dim(self)
        if d < 2 or d % 2:
            raise ValueError(
                f"rotary dim int(head_dim * partial) = int({self.head_dim} * {self.partial}) = {d} "
                "must be even and >= 2"
            )
        return self


def rotary_dim(c: RopeConfig) -> int:
    return int(c.head_dim * c.partial)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq(c: RopeConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies w_i (float64, [rotary_dim / 2]); `seq_len` matters for `dynamic` only."""
    d = rotary_dim(c)
    exponents = torch.arange(0, d, 2, dtype=torch.float64) / d
    base = c.theta
    s = c.scaling
    if isinstance(s, DynamicScaling):
        length = max(seq_len or 0, s.original_max_position_embeddings)
        base = base * ((s.factor * length / s.original_max_position_embeddings) - (s.factor - 1)) ** (d / (d - 2))
    w = 1.0 / base**exponents
    if isinstance(s, LinearScaling):
        return w / s.factor
    if isinstance(s, YarnScaling):
        def correction_dim(rotations: float) -> float:
            return d * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # as transformers: avoid a zero-width ramp
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        return (w / s.factor) * (1 - extrapolation) + w * extrapolation
    if isinstance(s, Llama3Scaling):
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / w
        scaled = torch.where(wavelen > low_wavelen, w / s.factor, w)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return w


def attention_factor(c: RopeConfig) -> float:
    """Multiplier of cos and sin (YaRN's attention factor; 1 otherwise)."""
    s = c.scaling
    if not isinstance(s, YarnScaling):
        return 1.0
    if s.attention_factor is not None:
        return s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return _mscale(s.factor, s.mscale) / _mscale(s.factor, s.mscale_all_dim)
    return _mscale(s.factor)


def softmax_scale_multiplier(c: RopeConfig) -> float:
    """DeepSeek's YaRN softmax-scale correction m^2, m = 0.1 * mscale_all_dim * ln(factor) + 1.

    Matches DeepseekV3Attention: applied when the scaling sets a non-zero mscale_all_dim; 1 otherwise.
    """
    s = c.scaling
    if isinstance(s, YarnScaling) and s.mscale_all_dim:
        m = _mscale(s.factor, s.mscale_all_dim)
        return m * m
    return 1.0


def params(c: RopeConfig) -> dict[str, ParamSpec]:
    return {}


def features(c: RopeConfig) -> set[str]:
    out = set()
    if c.layout == "interleaved":
        out.add("interleaved")
    if c.partial < 1:
        out.add("partial_rotary")
    if c.scaling is not None:
        out.add(f"scaling_{c.scaling.type}")
    return out


def rope(block: Any, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, head_dim] by positions [B, T]."""
    c: RopeConfig = block.config
    angle_dtype = torch.promote_types(x.dtype, torch.float32)
    seq_len = int(positions.max()) + 1 if isinstance(c.scaling, DynamicScaling) else None
    w = inv_freq(c, seq_len).to(device=x.device, dtype=angle_dtype)
    angles = positions.to(angle_dtype)[:, None, :, None] * w  # [B, 1, T, d/2]
    scale = attention_factor(c)
    cos = (angles.cos() * scale).to(x.dtype)
    sin = (angles.sin() * scale).to(x.dtype)
    return rotate(c, x, cos, sin)


def rotate(c: RopeConfig, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotation with precomputed cos/sin [B, 1, T, rotary_dim / 2] in x's dtype."""
    d = rotary_dim(c)
    rot, rest = x[..., :d], x[..., d:]
    if c.layout == "half":
        a, b = rot[..., : d // 2], rot[..., d // 2:]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1) if d < c.head_dim else rotated


def cost(c: RopeConfig, context: int) -> Cost:
    return Cost(params=0)

KIND = BlockKind(
    name="rope",
    version=1,
    config=RopeConfig,
    params=params,
    reference=rope,
    features=features,
    cost=cost,
    summary="rotary position embedding: half/interleaved, partial, linear/dynamic/yarn/llama3 scaling",
)

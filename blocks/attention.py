"""Attention: `attention@1` (MHA/GQA/MQA with the seed models' variants) and `mla@1` (DeepSeek MLA).

Scores and masking (shared by both kinds, `attend`):
    s_ij = scale * q_i . k_j,  then optional soft-cap s = cap * tanh(s / cap) (Grok-1 30, Gemma-2 50),
    then the mask, then softmax in float32 (float64 for float64 inputs), output = P V.
Query at position p_i sees key at position p_j iff
    p_j <= p_i (causal)  and  p_i - p_j < W (sliding window W: W keys including itself;
    implementations have disagreed by one here, this is transformers 5's and Mistral's rule)
and neither position is negative (a negative position marks padding; a query that sees no key
outputs zeros). Positions are explicit, so prefill, decode and chunked prefill through a
`LayerCache` are the same computation. This follows transformers' eager attention (matmul and
scale in the storage dtype, softmax in float32, cast back before P V).

`attention@1` per token x:
    q, k, v = x Wq + bq, x Wk + bk, x Wv + bv    (fused `wqkv` for DBRX's Wqkv; Qwen: biases on
                                                  q, k, v but not o)
    clamp q, k, v to [-clip_qkv, clip_qkv]        (DBRX, before RoPE)
    q, k = rms_norm(q), rms_norm(k) per head      (optional QK-norm, before RoPE)
    q, k = rope(q), rope(k)
    o = attend(q, k, v) Wo + bo                   (GQA: each group of n_heads / n_kv_heads query
                                                  heads shares one KV head)
scale = head_dim^-0.5, or an explicit `scale` (Grok-1 1/sqrt(128); Gemma-2
query_pre_attn_scalar^-0.5).

`mla@1` (DeepseekV3Attention): q = Wq_b rms(Wq_a x) (or Wq x without q_lora_rank), split into
q_nope [qk_nope_head_dim] and q_rope [qk_rope_head_dim] per head; [c_kv, k_rope] = Wkv_a x with
c_kv the kv_lora_rank latent; k_nope, v = split(Wkv_b rms(c_kv)) per head; k_rope is rotated
once and shared by all heads; attention over [q_nope, q_rope] . [k_nope, k_rope] with
scale (qk_nope_head_dim + qk_rope_head_dim)^-0.5 (times the YaRN m^2). The cache holds only
rms(c_kv) and the rotated k_rope: kv_lora_rank + qk_rope_head_dim values per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from llmkit.cache import LayerCache, as_positions
from llmkit.hookspecs import BlockKind, Cost, ParamSpec

from . import norm as _norm
from . import positional

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class QKNorm(BaseModel):
    """RMSNorm over head_dim applied to q and k (Qwen3, OLMo-2 style), before RoPE."""

    model_config = _FROZEN
    eps: float = Field(1e-6, gt=0)
    unit_offset: bool = False
    cast: Literal["before_weight", "after_weight"] | None = None


def _fill_rope_dim(data: Any, head_dim: int | None, field: str = "rope") -> Any:
    """Let a spec omit rope.head_dim inside an attention config: it is the attention's."""
    if isinstance(data, dict) and isinstance(data.get(field), dict) and head_dim is not None:
        rope = dict(data[field])
        rope.setdefault("head_dim", head_dim)
        data = {**data, field: rope}
    return data


class AttentionConfig(BaseModel):
    model_config = _FROZEN

    type: Literal["attention"] = "attention"
    d_model: PositiveInt
    n_heads: PositiveInt
    n_kv_heads: PositiveInt | None = None
    """KV heads: n_heads (MHA, the default), 1 (MQA) or a divisor of n_heads (GQA)."""
    head_dim: PositiveInt | None = None
    """Defaults to d_model / n_heads; may differ (Gemma-7B: 256 with d_model 3072, 16 heads)."""
    fused_qkv: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = Field(None, gt=0)
    qk_norm: QKNorm | None = None
    scale: float | None = Field(None, gt=0)
    softcap: float | None = Field(None, gt=0)
    causal: bool = True
    window: PositiveInt | None = None
    rope: positional.RopeConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        head_dim = data.get("head_dim")
        if head_dim is None and isinstance(data.get("d_model"), int) and isinstance(data.get("n_heads"), int) and data["n_heads"] > 0:
            head_dim = data["d_model"] // data["n_heads"]
        return _fill_rope_dim(data, head_dim)

    @model_validator(mode="after")
    def _check(self) -> AttentionConfig:
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.rope is not None and self.rope.head_dim != self.head_dim:
            raise ValueError(f"rope.head_dim ({self.rope.head_dim}) must equal head_dim ({self.head_dim})")
        return self


def attention_params(c: AttentionConfig) -> dict[str, ParamSpec]:
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    out: dict[str, ParamSpec] = {}
    if c.fused_qkv:
        out["wqkv"] = ParamSpec((q + 2 * kv, c.d_model))
        if c.qkv_bias:
            out["bqkv"] = ParamSpec((q + 2 * kv,), init="zeros")
    else:
        out.update(wq=ParamSpec((q, c.d_model)), wk=ParamSpec((kv, c.d_model)), wv=ParamSpec((kv, c.d_model)))
        if c.qkv_bias:
            out.update(bq=ParamSpec((q,), init="zeros"), bk=ParamSpec((kv,), init="zeros"),
                       bv=ParamSpec((kv,), init="zeros"))
    out["wo"] = ParamSpec((c.d_model, q))
    if c.o_bias:
        out["bo"] = ParamSpec((c.d_model,), init="zeros")
    return out


def attention_children(c: AttentionConfig) -> dict[str, tuple[BlockKind, Any]]:
    out: dict[str, tuple[BlockKind, Any]] = {}
    if c.qk_norm is not None:
        norm_cfg = {"type": "rms", "dim": c.head_dim, **c.qk_norm.model_dump(exclude_none=True)}
        out["q_norm"] = (_norm.KIND, norm_cfg)
        out["k_norm"] = (_norm.KIND, norm_cfg)
    if c.rope is not None:
        out["rope"] = (positional.KIND, c.rope)
    return out


def attention_features(c: AttentionConfig) -> set[str]:
    out = set()
    if c.n_kv_heads == 1 and c.n_heads > 1:
        out.add("mqa")
    elif c.n_kv_heads != c.n_heads:
        out.add("gqa")
    flags = {
        "fused_qkv": c.fused_qkv, "qkv_bias": c.qkv_bias, "o_bias": c.o_bias,
        "clip_qkv": c.clip_qkv is not None, "qk_norm": c.qk_norm is not None,
        "softcap": c.softcap is not None, "sliding_window": c.window is not None,
        "non_causal": not c.causal, "rope": c.rope is not None,
    }
    out.update(name for name, on in flags.items() if on)
    return out


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """[B, T, S]: may query t see key s — both real tokens (position >= 0), the key not in the
    query's future (causal), and fewer than `window` positions behind it."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    ok = (qp >= 0) & (kp >= 0)
    if causal:
        ok = ok & (kp <= qp)
    if window is not None:
        ok = ok & (qp - kp < window)
    return ok


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    scale: float,
    softcap: float | None = None,
    causal: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """q [B, H, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], positions [B, T] / [B, S] -> [B, H, T, Dv]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = visible(q_pos, k_pos, causal, window)[:, None]  # [B, 1, T, S]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # rows that see no key
    return torch.matmul(probs.to(v.dtype), v)


Linear = Callable[[Any, str, str | None, torch.Tensor], torch.Tensor]
"""`linear(block, weight_name, bias_name, x)`: how a projection is computed. Impls that store their
weights differently (quantised, re-laid-out) pass their own to `project`/`output`."""


def linear(block: Any, weight: str, bias: str | None, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b with the block's own parameters (nn.Linear's layout)."""
    return F.linear(x, getattr(block, weight), getattr(block, bias) if bias else None)


def project(block: Any, x: torch.Tensor, pos: torch.Tensor,
            lin: Linear = linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, T, d_model], pos [B, T] -> q [B, H, T, D], k and v [B, T, Hkv, D], after clip, QK-norm, RoPE.

    k and v come back token-major ([B, T, ...]), the layout the cache stores."""
    c: AttentionConfig = block.config
    b, t, _ = x.shape
    if c.fused_qkv:
        qkv = lin(block, "wqkv", "bqkv" if c.qkv_bias else None, x)
        q_size, kv_size = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    else:
        bias = c.qkv_bias
        q = lin(block, "wq", "bq" if bias else None, x)
        k = lin(block, "wk", "bk" if bias else None, x)
        v = lin(block, "wv", "bv" if bias else None, x)
    if c.clip_qkv is not None:
        q, k, v = (y.clamp(-c.clip_qkv, c.clip_qkv) for y in (q, k, v))
    q = q.view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
    k = k.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
    if c.qk_norm is not None:
        q, k = block.q_norm(q), block.k_norm(k)
    if c.rope is not None:
        q, k = block.rope(q, pos), block.rope(k, pos)
    return q, k.transpose(1, 2), v.view(b, t, c.n_kv_heads, c.head_dim)


def output(block: Any, o: torch.Tensor, lin: Linear = linear) -> torch.Tensor:
    """o [B, H, T, Dv] -> [B, T, d_model] through W_o (and b_o)."""
    c: AttentionConfig = block.config
    b, _, t, _ = o.shape
    return lin(block, "wo", "bo" if c.o_bias else None, o.transpose(1, 2).reshape(b, t, -1))


def softmax_scale(c: AttentionConfig) -> float:
    return c.scale if c.scale is not None else c.head_dim**-0.5


def attend_output(block: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                  k_pos: torch.Tensor) -> torch.Tensor:
    """The tail of `attention` after the cache: q [B, H, T, D] and k, v token-major
    ([B, S, Hkv, D], as `project` returns and the cache holds them) -> [B, T, d_model]."""
    c: AttentionConfig = block.config
    o = attend(q, k.transpose(1, 2), v.transpose(1, 2), q_pos, k_pos, scale=softmax_scale(c), softcap=c.softcap,
               causal=c.causal, window=c.window)
    return output(block, o)


def attention(
    block: Any, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None
) -> torch.Tensor:
    """x [B, T, d_model], positions [B, T] or [T] -> [B, T, d_model]; extends `cache` if given."""
    b, t, _ = x.shape
    pos = as_positions(positions, b, t)
    q, k, v = project(block, x, pos)
    k_pos = pos
    if cache is not None:
        full, k_pos = cache.extend(pos, k=k, v=v)
        k, v = full["k"], full["v"]
    return attend_output(block, q, k, v, pos, k_pos)


def attention_cost(c: AttentionConfig, context: int) -> Cost:
    """Projections: d * head_dim * (n_heads + 2 n_kv_heads) + n_heads * head_dim * d weights.
    Scores and values: 2 * n_heads * head_dim FLOPs each per attended key, L = min(context, window)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    matmul = c.d_model * (q + 2 * kv) + q * c.d_model
    bias = (q + 2 * kv if c.qkv_bias else 0) + (c.d_model if c.o_bias else 0)
    keys = min(context, c.window) if c.window else context
    return Cost(params=matmul + bias, flops=2 * matmul + 4 * q * keys, kv_values=2 * kv * keys / context)

ATTENTION = BlockKind(
    name="attention",
    version=1,
    config=AttentionConfig,
    params=attention_params,
    reference=attention,
    features=attention_features,
    children=attention_children,
    cost=attention_cost,
    summary="MHA/GQA/MQA: fused or split QKV, biases, clip_qkv, QK-norm, soft-cap, sliding window, RoPE, KV cache",
)


class MLAConfig(BaseModel):
    model_config = _FROZEN

    type: Literal["mla"] = "mla"
    d_model: PositiveInt
    n_heads: PositiveInt
    q_lora_rank: PositiveInt | None = None
    kv_lora_rank: PositiveInt
    qk_nope_head_dim: PositiveInt
    qk_rope_head_dim: PositiveInt
    v_head_dim: PositiveInt
    norm_eps: float = Field(1e-6, gt=0)
    """eps of the RMSNorms on the q and kv latents."""
    scale: float | None = Field(None, gt=0)
    causal: bool = True
    rope: positional.RopeConfig

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if isinstance(data.get("rope"), dict):
                data = {**data, "rope": {"layout": "interleaved", **data["rope"]}}
            return _fill_rope_dim(data, data.get("qk_rope_head_dim"))
        return data

    @model_validator(mode="after")
    def _check(self) -> MLAConfig:
        if self.rope.head_dim != self.qk_rope_head_dim:
            raise ValueError(
                f"rope.head_dim ({self.rope.head_dim}) must equal qk_rope_head_dim ({self.qk_rope_head_dim})"
            )
        return self

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def mla_params(c: MLAConfig) -> dict[str, ParamSpec]:
    out: dict[str, ParamSpec] = {}
    q_out = c.n_heads * c.qk_head_dim
    if c.q_lora_rank is None:
        out["wq"] = ParamSpec((q_out, c.d_model))
    else:
        out["wq_a"] = ParamSpec((c.q_lora_rank, c.d_model))
        out["wq_b"] = ParamSpec((q_out, c.q_lora_rank))
    out["wkv_a"] = ParamSpec((c.kv_lora_rank + c.qk_rope_head_dim, c.d_model))
    out["wkv_b"] = ParamSpec((c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank))
    out["wo"] = ParamSpec((c.d_model, c.n_heads * c.v_head_dim))
    return out


def mla_children(c: MLAConfig) -> dict[str, tuple[BlockKind, Any]]:
    out: dict[str, tuple[BlockKind, Any]] = {}
    if c.q_lora_rank is not None:
        out["q_norm"] = (_norm.KIND, {"dim": c.q_lora_rank, "eps": c.norm_eps})
    out["kv_norm"] = (_norm.KIND, {"dim": c.kv_lora_rank, "eps": c.norm_eps})
    out["rope"] = (positional.KIND, c.rope)
    return out


def mla_features(c: MLAConfig) -> set[str]:
    out = {"rope"}
    if c.q_lora_rank is not None:
        out.add("q_lora")
    if not c.causal:
        out.add("non_causal")
    return out


def mla_project(block: Any, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, T, d_model], pos [B, T] -> q [B, H, T, qk_head_dim] (RoPE on its rope part), the
    normalised latent [B, T, kv_lora_rank] and the rotated shared rope key [B, T, qk_rope_head_dim]:
    what the cache holds per token."""
    c: MLAConfig = block.config
    b, t, _ = x.shape
    if c.q_lora_rank is None:
        q = F.linear(x, block.wq)
    else:
        q = F.linear(block.q_norm(F.linear(x, block.wq_a)), block.wq_b)
    q = q.view(b, t, c.n_heads, c.qk_head_dim).transpose(1, 2)
    q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
    q = torch.cat([q_nope, block.rope(q_rope, pos)], dim=-1)
    latent, k_rope = F.linear(x, block.wkv_a).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
    k_rope = block.rope(k_rope.unsqueeze(1), pos).squeeze(1)  # one rope key shared by all heads
    return q, block.kv_norm(latent), k_rope


def mla_keys(block: Any, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached latent [B, S, kv_lora_rank] and rope key [B, S, qk_rope_head_dim] -> per-head
    k [B, H, S, qk_head_dim] = [k_nope, k_rope] and v [B, H, S, v_head_dim], through Wkv_b."""
    c: MLAConfig = block.config
    b, s, _ = latent.shape
    kv = F.linear(latent, block.wkv_b).view(b, s, c.n_heads, c.qk_nope_head_dim + c.v_head_dim).transpose(1, 2)
    k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
    return torch.cat([k_nope, k_rope[:, None].expand(b, c.n_heads, s, c.qk_rope_head_dim)], dim=-1), v


def mla_scale(c: MLAConfig) -> float:
    return (c.scale if c.scale is not None else c.qk_head_dim**-0.5) * positional.softmax_scale_multiplier(c.rope)


def mla_output(block: Any, o: torch.Tensor) -> torch.Tensor:
    """o [B, H, T, v_head_dim] -> [B, T, d_model] through Wo."""
    b, h, t, dv = o.shape
    return F.linear(o.transpose(1, 2).reshape(b, t, h * dv), block.wo)


def mla(block: Any, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
    """x [B, T, d_model], positions [B, T] or [T] -> [B, T, d_model]; caches the latent and k_rope."""
    c: MLAConfig = block.config
    b, t, _ = x.shape
    pos = as_positions(positions, b, t)
    q, latent, k_rope = mla_project(block, x, pos)
    k_pos = pos
    if cache is not None:
        full, k_pos = cache.extend(pos, latent=latent, k_rope=k_rope)
        latent, k_rope = full["latent"], full["k_rope"]
    k, v = mla_keys(block, latent, k_rope)
    return mla_output(block, attend(q, k, v, pos, k_pos, scale=mla_scale(c), causal=c.causal))


def mla_cost(c: MLAConfig, context: int) -> Cost:
    """Weights of the q path, the kv latent (kv_lora_rank + rope) and its up-projection, and o.
    Attention: 2 * n_heads * (qk_head_dim + v_head_dim) FLOPs per attended key (keys and values
    materialised from the latent, as the reference does). Cache: latent + rope key per token."""
    q_out = c.n_heads * c.qk_head_dim
    q = q_out * c.d_model if c.q_lora_rank is None else c.q_lora_rank * (c.d_model + q_out)
    kv = c.d_model * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * c.n_heads * (c.qk_nope_head_dim + c.v_head_dim)
    matmul = q + kv + c.n_heads * c.v_head_dim * c.d_model
    attend = 2 * c.n_heads * (c.qk_head_dim + c.v_head_dim) * context
    return Cost(params=matmul, flops=2 * matmul + attend, kv_values=c.kv_lora_rank + c.qk_rope_head_dim)

MLA = BlockKind(
    name="mla",
    version=1,
    config=MLAConfig,
    params=mla_params,
    reference=mla,
    features=mla_features,
    children=mla_children,
    cost=mla_cost,
    summary="multi-head latent attention (DeepSeek-V2/V3, Kimi-K2); cache = latent + shared rope key",
)

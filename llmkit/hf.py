"""Hugging Face checkpoint directories: config.json -> spec, safetensors keys -> llmkit's state dict.

A family is a function of the config (transformers' keys, both the long-standing `rope_theta` +
`rope_scaling` and transformers 5's `rope_parameters`) that returns a spec dict and a table of key
rules mapping each tensor name on disk to llmkit's key. Tensors are read lazily from memory-mapped
safetensors (one file or a sharded set with its index.json), one at a time; tensors already in the
model's dtype stay backed by the mapping; per-expert tensors are stacked into llmkit's [E, ...]
expert tensors layer by layer.

Every tensor on disk must be claimed by a rule, except those ignored on purpose (RoPE `inv_freq`
buffers, DeepSeek's multi-token-prediction layers); what cannot be placed is reported by `load`
together with what `assign_state` finds (missing keys, wrong shapes or dtypes), in one error.

Families and the transformers classes they match: llama, mistral, qwen2, mixtral, qwen2_moe, dbrx,
deepseek_v3, gemma, gemma2; plus grok-1 in the layout of the public PyTorch port
(hpcai-tech/grok-1), whose semantics follow xai-org/grok-1 (see presets/grok-1.yaml).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .loading import Checkpoint, CheckpointError

Rules = list[tuple[str, str]]
"""(regex over the disk key, llmkit key template). `{l}` in a template is the layer index; a rule
whose regex has a group named `e` fills expert e of a stacked [E, ...] tensor."""


@dataclass
class _Item:
    """One or more llmkit tensors made from one or more disk tensors by `make`."""

    sources: list[str]
    outputs: list[str]
    make: Callable[[list[torch.Tensor]], list[torch.Tensor]]


class _Config:
    """config.json with typed, located errors (`cfg.get("n_layers", int)`)."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where

    def __contains__(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def get(self, key: str, kind: type, default: Any = ..., *, positive: bool = False) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is ...:
                raise CheckpointError(f"{self.where}: {key!r} is missing")
            return default
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
            isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
        if not ok:
            raise CheckpointError(f"{self.where}: {key!r} must be {kind.__name__}, not {value!r}")
        if positive and value <= 0:
            raise CheckpointError(f"{self.where}: {key!r} must be > 0, not {value!r}")
        return float(value) if kind is float else value

    def sub(self, key: str) -> _Config:
        value = self.data.get(key) or {}
        if not isinstance(value, dict):
            raise CheckpointError(f"{self.where}: {key!r} must be an object, not {value!r}")
        return _Config(value, f"{self.where} {key}")


def _activation(cfg: _Config, key: str, gelu_is_tanh: bool = False, default: str = "silu") -> str:
    name = cfg.raw(key, default)
    if isinstance(name, dict):  # DBRX: ffn_act_fn {"name": "silu"}
        name = name.get("name", "silu")
    table = {"silu": "silu", "swish": "silu", "gelu": "gelu_tanh" if gelu_is_tanh else "gelu",
             "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
    if name not in table:
        raise CheckpointError(f"{cfg.where}: {key} {name!r} is not supported ({', '.join(table)})")
    return table[name]


def _rope(cfg: _Config, head_dim: int, *, default_layout: str = "half") -> dict[str, Any]:
    """RoPE from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older configs).

    Defaults follow transformers' standardize_rope_params: `original_max_position_embeddings`
    falls back to max_position_embeddings; dynamic NTK always scales against max_position_embeddings.
    """
    params = dict(cfg.raw("rope_parameters", {}) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{cfg.where}: per-layer-type rope_parameters ({', '.join(params)}) are not supported")
    scaling = dict(cfg.raw("rope_scaling", {}) or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.raw("rope_theta", 10000.0))
    partial = merged.get("partial_rotary_factor", cfg.raw("partial_rotary_factor", 1.0))
    rope: dict[str, Any] = {"head_dim": head_dim, "theta": float(theta)}
    if partial != 1.0:
        rope["partial"] = float(partial)
    if default_layout != "half":
        rope["layout"] = default_layout
    kind = merged.get("rope_type", merged.get("type", "default"))
    max_pos = cfg.raw("max_position_embeddings")
    orig = merged.get("original_max_position_embeddings", cfg.raw("original_max_position_embeddings", max_pos))
    factor = merged.get("factor")
    if kind == "default":
        return rope
    if factor is None and kind in ("linear", "dynamic", "llama3"):
        raise CheckpointError(f"{cfg.where}: rope scaling {kind!r} needs a factor")
    if kind == "linear":
        rope["scaling"] = {"type": "linear", "factor": float(factor)}
    elif kind == "dynamic":
        rope["scaling"] = {"type": "dynamic", "factor": float(factor), "original_max_position_embeddings": max_pos}
    elif kind == "yarn":
        if factor is None:  # transformers: the ratio of the context lengths
            factor = max_pos / orig
        s: dict[str, Any] = {"type": "yarn", "factor": float(factor), "original_max_position_embeddings": orig}
        for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            if merged.get(name) is not None:
                s[name] = float(merged[name])
        if merged.get("truncate") is not None:
            s["truncate"] = bool(merged["truncate"])
        rope["scaling"] = s
    elif kind == "llama3":
        rope["scaling"] = {"type": "llama3", "factor": float(factor), "original_max_position_embeddings": orig,
                           "low_freq_factor": float(merged.get("low_freq_factor", 1.0)),
                           "high_freq_factor": float(merged.get("high_freq_factor", 4.0))}
    else:
        raise CheckpointError(f"{cfg.where}: rope scaling type {kind!r} is not supported "
                              "(default, linear, dynamic, yarn, llama3)")
    return rope


def _dtype(cfg: _Config) -> str | None:
    name = cfg.raw("dtype", cfg.raw("torch_dtype"))
    return name if name in ("float32", "float16", "bfloat16") else None


def _windows(cfg: _Config, n_layers: int, default_all: bool) -> list[int]:
    """Indices of the sliding-window layers: `layer_types` when given, else the family default."""
    types = cfg.raw("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers:
            raise CheckpointError(f"{cfg.where}: layer_types must list {n_layers} layer types")
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise CheckpointError(f"{cfg.where}: layer_types {unknown} are not supported")
        return [i for i, t in enumerate(types) if t == "sliding_attention"]
    return list(range(n_layers)) if default_all else []


def _base_spec(cfg: _Config, *, n_layers: int, d: int, vocab: int, max_seq: int,
               norm: dict[str, Any], attention: dict[str, Any], mlp: dict[str, Any], tied: bool,
               placement: str = "pre", **extra: Any) -> dict[str, Any]:
    spec = {"vocab_size": vocab, "d_model": d, "n_layers": n_layers, "max_seq_len": max_seq,
            "norm": norm, "layer": {"placement": placement, "attention": attention, "mlp": mlp},
            "head": {"tied": tied}, **extra}
    if (dt := _dtype(cfg)) is not None:
        spec["dtype"] = dt
    return spec


def _add_windows(spec: dict[str, Any], window: int | None, layers: list[int], n_layers: int) -> None:
    if window is None or not layers:
        return
    if len(layers) == n_layers:
        spec["layer"]["attention"]["window"] = window
    else:
        spec.setdefault("overrides", []).append({"layers": layers, "attention": {"window": window}})


# ---------------------------------------------------------------- Llama-like families

_ATTN = [(rf"self_attn\.{p}_proj\.weight", f"attention.w{p}") for p in "qkvo"] + [
    (rf"self_attn\.{p}_proj\.bias", f"attention.b{p}") for p in "qkvo"]
_MLP = [(rf"mlp\.{p}_proj\.weight", f"mlp.w_{p}") for p in ("gate", "up", "down")] + [
    (rf"mlp\.{p}_proj\.bias", f"mlp.b_{p}") for p in ("gate", "up", "down")]
_MOE = [(r"mlp\.gate\.weight", "mlp.router"),
        (r"mlp\.gate\.e_score_correction_bias", "mlp.correction_bias"),
        (r"mlp\.shared_expert_gate\.weight", "mlp.shared_gate")] + [
    (rf"mlp\.experts\.(?P<e>\d+)\.{p}_proj\.weight", f"mlp.w_{p}") for p in ("gate", "up", "down")] + [
    (rf"mlp\.shared_experts?\.{p}_proj\.weight", f"mlp.shared.w_{p}") for p in ("gate", "up", "down")]
_MIXTRAL = [(r"block_sparse_moe\.gate\.weight", "mlp.router")] + [
    (rf"block_sparse_moe\.experts\.(?P<e>\d+)\.{w}\.weight", f"mlp.w_{p}")
    for w, p in (("w1", "gate"), ("w3", "up"), ("w2", "down"))]
_MLA = [(r"self_attn\.q_proj\.weight", "attention.wq"), (r"self_attn\.q_a_proj\.weight", "attention.wq_a"),
        (r"self_attn\.q_a_layernorm\.weight", "attention.q_norm.weight"),
        (r"self_attn\.q_b_proj\.weight", "attention.wq_b"),
        (r"self_attn\.kv_a_proj_with_mqa\.weight", "attention.wkv_a"),
        (r"self_attn\.kv_a_layernorm\.weight", "attention.kv_norm.weight"),
        (r"self_attn\.kv_b_proj\.weight", "attention.wkv_b"), (r"self_attn\.o_proj\.weight", "attention.wo")]
_NORMS = [(r"input_layernorm\.weight", "attn_norm.weight"), (r"post_attention_layernorm\.weight", "mlp_norm.weight")]
_SANDWICH = [(r"input_layernorm\.weight", "attn_norm.weight"),
             (r"post_attention_layernorm\.weight", "post_attn_norm.weight"),
             (r"pre_feedforward_layernorm\.weight", "mlp_norm.weight"),
             (r"post_feedforward_layernorm\.weight", "post_mlp_norm.weight")]


def _llama_rules(layer: Rules) -> Rules:
    return [(r"model\.embed_tokens\.weight", "embedding.weight"), (r"model\.norm\.weight", "norm.weight"),
            (r"lm_head\.weight", "head.weight")] + [
        (rf"model\.layers\.(?P<l>\d+)\.{pattern}", f"layers.{{l}}.{target}") for pattern, target in layer]


def _llama_like(cfg: _Config, family: str) -> dict[str, Any]:
    d = cfg.get("hidden_size", int, positive=True)
    n_heads = cfg.get("num_attention_heads", int, positive=True)
    n_layers = cfg.get("num_hidden_layers", int, positive=True)
    head_dim = cfg.get("head_dim", int, d // n_heads, positive=True)
    gemma = family in ("gemma", "gemma2")
    # transformers: Gemma reads hidden_act, where the legacy "gelu" of the official releases means
    # the tanh approximation; Gemma 2 reads hidden_activation (default gelu_pytorch_tanh) as written
    act_key = "hidden_activation" if family == "gemma2" else "hidden_act"
    attention: dict[str, Any] = {
        "n_heads": n_heads, "n_kv_heads": cfg.get("num_key_value_heads", int, n_heads, positive=True),
        "rope": _rope(cfg, head_dim)}
    if head_dim * n_heads != d:
        attention["head_dim"] = head_dim
    if family == "qwen2" or (family == "qwen2_moe" and cfg.raw("qkv_bias", True)):
        attention["qkv_bias"] = True
    elif cfg.raw("attention_bias", False):
        attention |= {"qkv_bias": True, "o_bias": True}
    mlp: dict[str, Any] = {"hidden": cfg.get("intermediate_size", int, positive=True),
                           "activation": _activation(cfg, act_key, gelu_is_tanh=family == "gemma",
                                                     default="gelu_pytorch_tanh" if gemma else "silu")}
    if cfg.raw("mlp_bias", False):
        mlp["bias"] = True
    norm: dict[str, Any] = {"type": "rms", "eps": cfg.get("rms_norm_eps", float, 1e-6, positive=True)}
    extra: dict[str, Any] = {}
    if gemma:
        norm |= {"unit_offset": True, "cast": "after_weight"}
        extra["embedding"] = {"multiplier": math.sqrt(d), "round_multiplier": True}
    if family == "gemma2":
        attention["scale"] = cfg.get("query_pre_attn_scalar", float, 256.0, positive=True) ** -0.5
        if "attn_logit_softcapping" in cfg:
            attention["softcap"] = cfg.get("attn_logit_softcapping", float, positive=True)
    spec = _base_spec(cfg, n_layers=n_layers, d=d, vocab=cfg.get("vocab_size", int, positive=True),
                      max_seq=cfg.get("max_position_embeddings", int, 4096, positive=True), norm=norm,
                      attention=attention, mlp=mlp, tied=bool(cfg.raw("tie_word_embeddings", gemma)),
                      placement="sandwich" if family == "gemma2" else "pre", **extra)
    if family == "gemma2" and "final_logit_softcapping" in cfg:
        spec["head"]["softcap"] = cfg.get("final_logit_softcapping", float, positive=True)
    window = cfg.get("sliding_window", int, None, positive=True) if cfg.raw("sliding_window") else None
    if family == "qwen2" or family == "qwen2_moe":
        on = cfg.raw("use_sliding_window", False)
        start = cfg.get("max_window_layers", int, n_layers)
        layers = _windows(cfg, n_layers, False) if "layer_types" in cfg else (
            list(range(start, n_layers)) if on else [])
        _add_windows(spec, window if on or "layer_types" in cfg else None, layers, n_layers)
    elif family == "gemma2":
        layers = _windows(cfg, n_layers, False) if "layer_types" in cfg else list(range(0, n_layers, 2))
        _add_windows(spec, window, layers, n_layers)
    elif family in ("mistral", "mixtral"):
        _add_windows(spec, window, _windows(cfg, n_layers, True), n_layers)
    return spec


def _family_llama(cfg: _Config, family: str) -> tuple[dict[str, Any], Rules]:
    layer = _SANDWICH if family == "gemma2" else _NORMS
    return _llama_like(cfg, family), _llama_rules(layer + _ATTN + _MLP)


def _family_mixtral(cfg: _Config, family: str) -> tuple[dict[str, Any], Rules]:
    spec = _llama_like(cfg, family)
    n_experts = cfg.get("num_local_experts", int, positive=True)
    spec["layer"]["mlp"] = {"type": "moe", "n_experts": n_experts,
                            "top_k": cfg.get("num_experts_per_tok", int, positive=True),
                            "hidden": spec["layer"]["mlp"]["hidden"], "activation": spec["layer"]["mlp"]["activation"],
                            "renormalize": "sum"}
    return spec, _llama_rules(_NORMS + _ATTN + _MIXTRAL + _MOE)


def _family_qwen2_moe(cfg: _Config, family: str) -> tuple[dict[str, Any], Rules]:
    spec = _llama_like(cfg, family)
    dense = dict(spec["layer"]["mlp"])
    n_layers = spec["n_layers"]
    n_experts = cfg.get("num_experts", int, 0)
    step = cfg.get("decoder_sparse_step", int, 1, positive=True)
    only = cfg.raw("mlp_only_layers", [])
    moe: dict[str, Any] = {"type": "moe", "n_experts": n_experts or 1,
                           "top_k": cfg.get("num_experts_per_tok", int, 1, positive=True),
                           "hidden": cfg.get("moe_intermediate_size", int, positive=True),
                           "activation": dense["activation"],
                           "renormalize": "sum" if cfg.raw("norm_topk_prob", False) else "none"}
    if cfg.raw("shared_expert_intermediate_size"):
        moe |= {"shared_hidden": cfg.get("shared_expert_intermediate_size", int, positive=True), "shared_gate": True}
    sparse = [i for i in range(n_layers) if n_experts and i not in only and (i + 1) % step == 0]
    spec["layer"]["mlp"] = moe if sparse else dense
    dense_layers = [i for i in range(n_layers) if i not in sparse]
    if sparse and dense_layers:
        spec.setdefault("overrides", []).append({"layers": dense_layers, "mlp": {"type": "mlp", **dense}})
    return spec, _llama_rules(_NORMS + _ATTN + _MLP + _MOE)


def _family_deepseek_v3(cfg: _Config, family: str) -> tuple[dict[str, Any], Rules]:
    if cfg.raw("quantization_config") is not None:
        method = cfg.sub("quantization_config").raw("quant_method", "?")
        raise CheckpointError(f"{cfg.where}: quantised weights ({method}) are not supported; load a bf16 "
                              "conversion (e.g. DeepSeek's fp8_cast_bf16.py) instead")
    spec = _llama_like(cfg, family)
    n_layers = spec["n_layers"]
    rope_dim = cfg.get("qk_rope_head_dim", int, positive=True)
    layout = "interleaved" if cfg.raw("rope_interleave", True) else "half"
    q_lora = cfg.get("q_lora_rank", int, None, positive=True)
    spec["layer"]["attention"] = {
        "type": "mla", "n_heads": cfg.get("num_attention_heads", int, positive=True), "q_lora_rank": q_lora,
        "kv_lora_rank": cfg.get("kv_lora_rank", int, positive=True),
        "qk_nope_head_dim": cfg.get("qk_nope_head_dim", int, positive=True), "qk_rope_head_dim": rope_dim,
        "v_head_dim": cfg.get("v_head_dim", int, positive=True),
        "norm_eps": 1e-6,  # q_a_layernorm / kv_a_layernorm: DeepseekV3RMSNorm's default eps, not rms_norm_eps
        "rope": {k: v for k, v in _rope(cfg, rope_dim, default_layout=layout).items() if k != "head_dim"}}
    scoring = cfg.raw("scoring_func", "sigmoid")
    if scoring not in ("sigmoid", "softmax"):
        raise CheckpointError(f"{cfg.where}: scoring_func {scoring!r} is not supported (sigmoid, softmax)")
    if cfg.raw("topk_method", "noaux_tc") != "noaux_tc":
        raise CheckpointError(f"{cfg.where}: topk_method {cfg.raw('topk_method')!r} is not supported (noaux_tc)")
    dense = {"type": "mlp", **spec["layer"]["mlp"]}
    hidden = cfg.get("moe_intermediate_size", int, positive=True)
    n_group = cfg.get("n_group", int, 1, positive=True)
    moe: dict[str, Any] = {
        "type": "moe", "n_experts": cfg.get("n_routed_experts", int, positive=True),
        "top_k": cfg.get("num_experts_per_tok", int, positive=True), "hidden": hidden,
        "activation": dense["activation"], "scoring": scoring, "correction_bias": True,
        "renormalize": "sum" if cfg.raw("norm_topk_prob", True) else "none",
        "routed_scaling": cfg.get("routed_scaling_factor", float, 1.0, positive=True)}
    if n_group > 1:
        moe |= {"n_group": n_group, "topk_group": cfg.get("topk_group", int, positive=True)}
    if cfg.raw("n_shared_experts"):
        moe["shared_hidden"] = hidden * cfg.get("n_shared_experts", int, positive=True)
    first = cfg.get("first_k_dense_replace", int, 0)
    freq = cfg.get("moe_layer_freq", int, 1, positive=True)
    sparse = [i for i in range(n_layers) if i >= first and i % freq == 0]
    spec["layer"]["mlp"] = moe if sparse else dense
    dense_layers = [i for i in range(n_layers) if i not in sparse]
    if sparse and dense_layers:
        spec.setdefault("overrides", []).append({"layers": dense_layers, "mlp": dense})
    return spec, _llama_rules(_NORMS + _MLA + _MLP + _MOE)


def _family_dbrx(cfg: _Config, family: str) -> tuple[dict[str, Any], Rules]:
    attn, ffn = cfg.sub("attn_config"), cfg.sub("ffn_config")
    d = cfg.get("d_model", int, positive=True)
    n_heads = cfg.get("n_heads", int, positive=True)
    head_dim = d // n_heads
    p = ffn.raw("moe_normalize_expert_weights", 1.0)
    if p not in (None, 1, 1.0):
        raise CheckpointError(f"{cfg.where}: ffn_config.moe_normalize_expert_weights {p} is not supported "
                              "(1: divide by the sum, or null)")
    attention: dict[str, Any] = {"n_heads": n_heads, "n_kv_heads": attn.get("kv_n_heads", int, n_heads, positive=True),
                                 "fused_qkv": True, "rope": {"head_dim": head_dim,
                                                             "theta": attn.get("rope_theta", float, 10000.0)}}
    if "clip_qkv" in attn:
        attention["clip_qkv"] = attn.get("clip_qkv", float, positive=True)
    mlp = {"type": "moe", "n_experts": ffn.get("moe_num_experts", int, positive=True),
           "top_k": ffn.get("moe_top_k", int, positive=True), "hidden": ffn.get("ffn_hidden_size", int, positive=True),
           "activation": _activation(ffn, "ffn_act_fn"), "renormalize": "none" if p is None else "sum"}
    spec = _base_spec(cfg, n_layers=cfg.get("n_layers", int, positive=True), d=d,
                      vocab=cfg.get("vocab_size", int, positive=True),
                      max_seq=cfg.get("max_seq_len", int, 2048, positive=True),
                      norm={"type": "layer", "bias": False, "eps": 1e-5},  # nn.LayerNorm(d, bias=False)
                      attention=attention, mlp=mlp, tied=bool(cfg.raw("tie_word_embeddings", False)))
    b = r"transformer\.blocks\.(?P<l>\d+)\."
    rules = [(r"transformer\.wte\.weight", "embedding.weight"), (r"transformer\.norm_f\.weight", "norm.weight"),
             (r"lm_head\.weight", "head.weight"),
             (b + r"norm_attn_norm\.norm_1\.weight", "layers.{l}.attn_norm.weight"),
             (b + r"norm_attn_norm\.norm_2\.weight", "layers.{l}.mlp_norm.weight"),
             (b + r"norm_attn_norm\.attn\.Wqkv\.weight", "layers.{l}.attention.wqkv"),
             (b + r"norm_attn_norm\.attn\.out_proj\.weight", "layers.{l}.attention.wo"),
             (b + r"ffn\.router\.layer\.weight", "layers.{l}.mlp.router"),
             (b + r"ffn\.experts\.mlp\.w1", "layers.{l}.mlp.w_gate"),
             (b + r"ffn\.experts\.mlp\.v1", "layers.{l}.mlp.w_up"),
             (b + r"ffn\.experts\.mlp\.w2", "layers.{l}.mlp.w_down")]
    return spec, rules


def _family_grok(cfg: _Config, family: str) -> tuple[dict[str, Any], Rules]:
    d = cfg.get("hidden_size", int, positive=True)
    n_heads = cfg.get("num_attention_heads", int, positive=True)
    head_dim = d // n_heads  # hpcai-tech MultiHeadAttention: hidden_size // num_heads
    attention = {"n_heads": n_heads, "n_kv_heads": cfg.get("num_key_value_heads", int, n_heads, positive=True),
                 "scale": cfg.get("attn_output_multiplier", float, head_dim**-0.5, positive=True),
                 "softcap": cfg.get("max_attn_value", float, 30.0, positive=True),
                 "rope": {"head_dim": head_dim, "theta": cfg.get("rope_theta", float, 10000.0, positive=True)}}
    # xai-org/grok-1 model.py: jax.nn.gelu (tanh approximation) in the experts; softmax router whose
    # top-k probabilities are used without renormalisation
    mlp = {"type": "moe", "n_experts": cfg.get("num_experts", int, positive=True),
           "top_k": cfg.get("num_experts_per_tok", int, positive=True),
           "hidden": cfg.get("intermediate_size", int, positive=True), "activation": "gelu_tanh",
           "renormalize": "none"}
    spec = _base_spec(cfg, n_layers=cfg.get("num_hidden_layers", int, positive=True), d=d,
                      vocab=cfg.get("vocab_size", int, positive=True),
                      max_seq=cfg.get("max_position_embeddings", int, 8192, positive=True),
                      norm={"type": "rms", "eps": cfg.get("rms_norm_eps", float, 1e-5, positive=True),
                            "cast": "after_weight"},
                      attention=attention, mlp=mlp, tied=bool(cfg.raw("tie_word_embeddings", True)),
                      placement="sandwich",
                      embedding={"multiplier": cfg.get("embedding_multiplier_scale", float, 1.0, positive=True)})
    spec["head"]["multiplier"] = cfg.get("output_multiplier_scale", float, 1.0, positive=True)
    norm = r"(?:scale|weight)"
    layer = [(rf"pre_attn_norm\.{norm}", "attn_norm.weight"), (rf"post_attn_norm\.{norm}", "post_attn_norm.weight"),
             (rf"pre_moe_norm\.{norm}", "mlp_norm.weight"), (rf"post_moe_norm\.{norm}", "post_mlp_norm.weight"),
             (r"moe_block\.gate\.weight", "mlp.router")] + [
        (rf"attn\.{p}_proj\.weight", f"attention.w{p}") for p in "qkvo"] + [
        (rf"moe_block\.experts\.(?P<e>\d+)\.{w}\.weight", f"mlp.w_{p}")
        for w, p in (("linear", "gate"), ("linear_v", "up"), ("linear_1", "down"))]
    rules = [(r"model\.embed_tokens\.weight", "embedding.weight"), (rf"model\.norm\.{norm}", "norm.weight"),
             (r"lm_head\.weight", "head.weight")] + [
        (rf"model\.layers\.(?P<l>\d+)\.{pattern}", f"layers.{{l}}.{target}") for pattern, target in layer]
    return spec, rules


FAMILIES: dict[str, Callable[[_Config, str], tuple[dict[str, Any], Rules]]] = {
    "llama": _family_llama, "mistral": _family_llama, "qwen2": _family_llama, "gemma": _family_llama,
    "gemma2": _family_llama, "mixtral": _family_mixtral, "qwen2_moe": _family_qwen2_moe,
    "deepseek_v3": _family_deepseek_v3, "dbrx": _family_dbrx, "grok-1": _family_grok,
}

_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$|.*\.rotary_emb\.(cos|sin)_cached$")


# ---------------------------------------------------------------- safetensors files


def _shards(path: Path) -> dict[str, Path]:
    """Disk key -> file, from model.safetensors.index.json when present, else every *.safetensors."""
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    files: list[Path]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index (needs a weight_map object): {exc}") from None
        names = sorted(set(weight_map.values()))
        absent = [n for n in names if not (path / n).is_file()]
        if absent:
            raise CheckpointError(f"{index}: shard(s) listed but not found: {', '.join(absent)}")
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
        weight_map = None
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    where: dict[str, Path] = {}
    for file in files:
        try:  # opening checks the header and that the data section covers every tensor
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc}); it may be truncated or "
                                  "corrupt") from None
        for key in keys:
            if key in where:
                raise CheckpointError(f"{file}: tensor {key!r} is also in {where[key].name}")
            if weight_map is not None and weight_map.get(key) != file.name:
                raise CheckpointError(f"{file}: tensor {key!r} is not listed for this file in {index.name}")
            where[key] = file
    if weight_map is not None:
        lost = sorted(set(weight_map) - set(where))
        if lost:
            raise CheckpointError(f"{index}: tensors listed but not in their shard: {', '.join(lost[:8])}")
    return where


# ---------------------------------------------------------------- key planning

_FUSED = [(r"model\.layers\.(?P<l>\d+)\.mlp\.experts\.gate_up_proj", "layers.{l}.mlp.w_gate|layers.{l}.mlp.w_up"),
          (r"model\.layers\.(?P<l>\d+)\.mlp\.experts\.down_proj", "layers.{l}.mlp.w_down")]
"""transformers 5's in-memory expert layout ([E, 2 * hidden, d] gate rows first, [E, d, hidden]), as
written by `torch.save(model.state_dict())`-style tools; save_pretrained writes per-expert keys."""


def _dbrx_experts(target: str, n_experts: int) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """DBRX stores w1, v1 and w2 as [E * ffn, d]; w2 is applied as x @ w2 (not transposed)."""
    def make(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        w = ts[0].reshape(n_experts, -1, ts[0].shape[-1])
        return [w.transpose(1, 2).contiguous() if target.endswith("w_down") else w]
    return make


def _plan(spec: dict[str, Any], rules: Rules, where: dict[str, Path], family: str, cfg: _Config,
          source: str) -> tuple[list[_Item], list[str], list[str]]:
    """Match every disk key to its llmkit key; returns the items to read, what was ignored on
    purpose, and the keys that cannot be placed (reported by `load` with the other problems)."""
    compiled = [(re.compile(pattern), template) for pattern, template in rules + _FUSED]
    n_layers = spec["n_layers"]
    mlp = spec["layer"]["mlp"]
    n_experts = mlp.get("n_experts", 0) if mlp.get("type") == "moe" else 0
    mtp = cfg.get("num_nextn_predict_layers", int, 0) if family == "deepseek_v3" else 0
    direct: dict[str, str] = {}
    experts: dict[str, dict[int, str]] = {}
    problems: list[str] = []
    ignored: list[str] = []
    mtp_keys = 0
    for key in where:
        if _IGNORED.fullmatch(key):
            ignored.append(key)
            continue
        m_layer = re.match(r"model\.layers\.(\d+)\.", key)
        if mtp and m_layer and n_layers <= int(m_layer.group(1)) < n_layers + mtp:
            mtp_keys += 1
            continue
        for regex, template in compiled:
            m = regex.fullmatch(key)
            if m is None:
                continue
            groups = m.groupdict()
            target = template.format(l=groups.get("l"))
            if groups.get("l") is not None and int(groups["l"]) >= n_layers:
                problems.append(f"unexpected tensor {key!r}: the config has {n_layers} layers")
            elif groups.get("e") is not None:
                e = int(groups["e"])
                if e >= n_experts:
                    problems.append(f"unexpected tensor {key!r}: the config has {n_experts} experts")
                else:
                    experts.setdefault(target, {})[e] = key
            elif target in direct:
                problems.append(f"tensors {direct[target]!r} and {key!r} both map to {target!r}")
            else:
                direct[target] = key
            break
        else:
            problems.append(f"unexpected tensor {key!r} {list(_shape(where, key))}")
    if mtp_keys:
        ignored.append(f"model.layers.{n_layers}.* ({mtp_keys} tensors of the multi-token-prediction module, "
                       "which llmkit does not model)")

    items: list[_Item] = []
    tied = spec["head"].get("tied", False)
    for target, key in direct.items():
        if target == "head.weight" and tied:
            if "embedding.weight" not in direct:
                continue  # reported as missing by assign_state
            items.append(_Item([key, direct["embedding.weight"]], [], _same_as_embedding(key, source)))
            ignored.append(f"{key} (tied to the embedding; checked equal)")
        elif "|" in target:
            items.append(_Item([key], target.split("|"), lambda ts: list(ts[0].chunk(2, dim=1))))
        elif family == "dbrx" and ".mlp.w_" in target:
            items.append(_Item([key], [target], _dbrx_experts(target, n_experts)))
        else:
            items.append(_Item([key], [target], lambda ts: ts))
    for target, by_index in experts.items():
        absent = [i for i in range(n_experts) if i not in by_index]
        if absent:
            some = next(iter(by_index.values()))
            problems.append(f"{target}: expert tensor(s) {absent} missing (have e.g. {some!r})")
            continue
        items.append(_Item([by_index[i] for i in range(n_experts)], [target], lambda ts: [torch.stack(ts)]))
    # the embedding first: a tied head's check reads it again right after
    items.sort(key=lambda item: item.outputs != ["embedding.weight"])
    return items, ignored, problems


def _shape(where: dict[str, Path], key: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(where[key]), framework="pt") as f:
        return tuple(f.get_slice(key).get_shape())


def _same_as_embedding(key: str, source: str) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    def check(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        if ts[0].shape != ts[1].shape or not torch.equal(ts[0], ts[1]):
            raise CheckpointError(f"{source}: config.json ties the LM head to the embedding "
                                  f"(tie_word_embeddings), but {key!r} differs from it")
        return []
    return check


def read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json (an HF checkpoint directory has config.json and "
                              "*.safetensors)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{file}: not UTF-8 text ({exc.reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: must hold a JSON object")
    return data


def hf_spec(path: str | Path) -> tuple[dict[str, Any], Rules, str, _Config]:
    """The spec dict, key rules and family of an HF checkpoint directory, from its config.json."""
    path = Path(path)
    data = read_config(path)
    cfg = _Config(data, str(path / "config.json"))
    family = data.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{cfg.where}: model_type {family!r} is not supported; llmkit reads "
                              f"{', '.join(sorted(FAMILIES))}")
    spec, rules = FAMILIES[family](cfg, family)
    name = data.get("_name_or_path") or path.name
    return {"name": str(name).rstrip("/").split("/")[-1] or path.name, "source": str(path),
            "description": f"HF {family} checkpoint ({', '.join(data.get('architectures') or [family])})",
            **spec}, rules, family, cfg


def read_hf(path: str | Path) -> Checkpoint:
    """An HF checkpoint directory -> `Checkpoint` (spec, lazily read tensors, tokenizer if present)."""
    from safetensors import safe_open

    from .tokenizer import Tokenizer

    path = Path(path)
    source = str(path)
    spec, rules, family, cfg = hf_spec(path)
    where = _shards(path)
    items, ignored, problems = _plan(spec, rules, where, family, cfg, source)
    tokenizer = Tokenizer.from_hf_dir(path)
    if tokenizer is None:
        ignored.append("no tokenizer.json: the model takes token ids only")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        handles: dict[Path, Any] = {}
        try:
            for item in items:
                loaded = []
                for key in item.sources:
                    file = where[key]
                    if file not in handles:
                        handles[file] = safe_open(str(file), framework="pt").__enter__()
                    loaded.append(handles[file].get_tensor(key))
                yield from zip(item.outputs, item.make(loaded), strict=True)
        finally:
            for handle in handles.values():
                handle.__exit__(None, None, None)

    return Checkpoint(spec=spec, tensors=tensors, source=source, tokenizer=tokenizer, ignored=ignored,
                      count=sum(len(item.outputs) for item in items), problems=problems)

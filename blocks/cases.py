"""Certification cases of the built-in kinds: sample inputs, edge configs and hypothesis strategies.

For each kind, as PyTorch's OpInfo does for ops: `sample(config, shape, generator)` draws float64
inputs (the engine rounds them to the storage dtype), `edges()` lists the configs and shapes at the
edges a vendor impl gets wrong (odd lengths, head dims 64-256, GQA ratios 1..all, window edges,
flash chunk boundaries, positions near 2^15 and 2^16, routing ties and skew), `strategy(data)` draws
a config for the open suite and `shapes(config, quick)` the prefill/decode shapes a preset's config
runs with.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from llmkit.kinds import KindCases, Sample, Shape

from . import moe as _moe

LONG = (2**15 - 5, 2**16 - 7)


def _x(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return std * torch.randn(*shape, generator=g, dtype=torch.float64)


def _positions(shape: Shape, padded: bool) -> torch.Tensor:
    n = shape.context + shape.tokens
    pos = torch.arange(shape.start, shape.start + n).expand(shape.batch, n).clone()
    if padded and shape.batch > 1:
        pos[0] -= min(3, n - 1)  # row 0 is left-padded: negative positions are padding
    return pos


def _token_shapes(config: Any, quick: bool) -> list[Shape]:
    return [Shape(2, 24), Shape(1, 1)] if quick else [Shape(2, 24), Shape(1, 1), Shape(3, 7)]


def _cached_shapes(config: Any, quick: bool) -> list[Shape]:
    shapes = [Shape(2, 24), Shape(2, 1, context=24)]
    return shapes if quick else [*shapes, Shape(2, 5, context=11), Shape(2, 9, variant="padded")]


# --- attention, MLA, layer: x [B, T, d_model], positions, cache --------------------------------

def _sequence_sample(config: Any, shape: Shape, g: torch.Generator) -> Sample:
    n = shape.context + shape.tokens
    x = _x(g, shape.batch, n, config.d_model)
    pos = _positions(shape, shape.variant == "padded")
    if shape.context == 0:
        return Sample(calls=[(x, pos)])
    c = shape.context
    return Sample(calls=[(x[:, :c], pos[:, :c]), (x[:, c:], pos[:, c:])], cache=True)


def _attention_edges() -> list[tuple[str, dict[str, Any], list[Shape]]]:
    rope = {"theta": 10000.0}
    out: list[tuple[str, dict[str, Any], list[Shape]]] = []
    window = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "window": 5, "rope": rope}
    out.append(("window 5 edges", window, [Shape(1, t) for t in (6, 11, 4, 5)]
                + [Shape(2, 1, context=5), Shape(2, 1, context=9), Shape(2, 3, context=4)]))
    out.append(("soft-cap 30", {**window, "window": None, "softcap": 30.0},
                [Shape(2, 13), Shape(2, 1, context=13)]))
    out.append(("soft-cap + window", {**window, "softcap": 20.0}, [Shape(2, 11), Shape(2, 1, context=8)]))
    out.append(("flash chunk boundaries", {"d_model": 64, "n_heads": 2, "n_kv_heads": 1, "rope": rope},
                [Shape(1, t) for t in (511, 512, 513)]))
    out.append(("positions near 2^15 and 2^16", {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "rope": rope},
                [Shape(1, 8, start=s) for s in LONG] + [Shape(1, 1, context=8, start=s) for s in LONG]))
    out.append(("qk-norm, clip, biases, fused qkv",
                {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "qk_norm": {"eps": 1e-6}, "clip_qkv": 2.0,
                 "qkv_bias": True, "o_bias": True, "fused_qkv": True, "rope": rope}, [Shape(2, 9)]))
    out.append(("non-causal, scale, no rope",
                {"d_model": 64, "n_heads": 4, "causal": False, "scale": 0.2}, [Shape(2, 9)]))
    for hd in (64, 80, 96, 128, 192, 256):
        out.append((f"head_dim {hd}", {"d_model": 2 * hd, "n_heads": 2, "n_kv_heads": 1, "head_dim": hd,
                                       "rope": rope}, [Shape(1, 9), Shape(1, 1, context=9)]))
    for kv in (8, 4, 2, 1):
        out.append((f"GQA 8/{kv}", {"d_model": 128, "n_heads": 8, "n_kv_heads": kv, "rope": rope},
                    [Shape(2, 13), Shape(2, 1, context=13), Shape(2, 7, variant="padded")]))
    return out


def _attention_strategy(data: Any) -> dict[str, Any]:
    from hypothesis import strategies as st

    hd = data.draw(st.sampled_from([8, 16, 32, 64]), label="head_dim")
    n_kv = data.draw(st.sampled_from([1, 2, 4]), label="n_kv_heads")
    groups = data.draw(st.sampled_from([1, 2, 3]), label="group")
    n_heads = n_kv * groups
    return {
        "d_model": n_heads * hd, "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": hd,
        "window": data.draw(st.one_of(st.none(), st.integers(1, 16)), label="window"),
        "softcap": data.draw(st.one_of(st.none(), st.floats(5.0, 50.0)), label="softcap"),
        "rope": {"theta": data.draw(st.sampled_from([1e4, 5e5]), label="theta")},
    }


def _mla_edges() -> list[tuple[str, dict[str, Any], list[Shape]]]:
    base = {"d_model": 64, "n_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
            "v_head_dim": 16, "rope": {"head_dim": 8, "theta": 10000.0}}
    return [
        ("q_lora_rank 24", {**base, "q_lora_rank": 24}, [Shape(2, 9), Shape(2, 1, context=9)]),
        ("no q lora, positions near 2^16", base, [Shape(1, 8, start=LONG[1]), Shape(2, 3, context=6)]),
    ]


def _layer_edges() -> list[tuple[str, dict[str, Any], list[Shape]]]:
    attn = {"type": "attention", "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "rope": {"theta": 10000.0}}
    mlp = {"type": "mlp", "d_model": 64, "hidden": 96}
    moe = {"type": "moe", "d_model": 64, "n_experts": 4, "top_k": 2, "hidden": 48}
    shapes = [Shape(2, 9), Shape(2, 1, context=9)]
    return [
        ("pre-norm, dense", {"d_model": 64, "attention": attn, "mlp": mlp}, shapes),
        ("sandwich, MoE", {"d_model": 64, "placement": "sandwich", "attention": attn, "mlp": moe}, shapes),
        ("parallel", {"d_model": 64, "parallel": True, "attention": attn, "mlp": mlp}, shapes),
    ]


# --- rope: x [B, H, T, head_dim], positions [B, T] ---------------------------------------------

def _rope_sample(config: Any, shape: Shape, g: torch.Generator) -> Sample:
    x = _x(g, shape.batch, 3, shape.tokens, config.head_dim)
    return Sample(calls=[(x, _positions(Shape(shape.batch, shape.tokens, 0, shape.start), False))])


def _rope_shapes(config: Any, quick: bool) -> list[Shape]:
    return [Shape(2, 24), Shape(1, 1, start=24)]


def _rope_edges() -> list[tuple[str, dict[str, Any], list[Shape]]]:
    long = [Shape(1, 8, start=s) for s in LONG]
    out: list[tuple[str, dict[str, Any], list[Shape]]] = []
    for hd in (64, 80, 128, 256):
        out.append((f"head_dim {hd}", {"head_dim": hd, "theta": 500000.0}, [Shape(2, 9), *long]))
    out += [
        ("interleaved", {"head_dim": 64, "layout": "interleaved"}, [Shape(2, 9), *long]),
        ("partial 0.25", {"head_dim": 64, "partial": 0.25}, [Shape(2, 9)]),
        ("linear scaling", {"head_dim": 64, "scaling": {"type": "linear", "factor": 4.0}}, [Shape(1, 8, start=LONG[0])]),
        ("dynamic NTK", {"head_dim": 64, "scaling": {"type": "dynamic", "factor": 2.0,
                                                     "original_max_position_embeddings": 4096}}, long),
        ("yarn", {"head_dim": 64, "scaling": {"type": "yarn", "factor": 40.0,
                                              "original_max_position_embeddings": 4096}}, long),
        ("llama3", {"head_dim": 128, "theta": 500000.0, "scaling": {
            "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}, long),
    ]
    return out


def _rope_strategy(data: Any) -> dict[str, Any]:
    from hypothesis import strategies as st

    return {
        "head_dim": data.draw(st.sampled_from([16, 32, 64, 96, 128]), label="head_dim"),
        "theta": data.draw(st.sampled_from([1e4, 1e6]), label="theta"),
        "layout": data.draw(st.sampled_from(["half", "interleaved"]), label="layout"),
        "partial": data.draw(st.sampled_from([1.0, 0.5]), label="partial"),
    }


# --- token-wise kinds: norm, mlp, moe, head, embedding ------------------------------------------

def _rows_sample(width: str, config: Any, shape: Shape, g: torch.Generator) -> Sample:
    return Sample(calls=[(_x(g, shape.batch, shape.tokens, getattr(config, width)),)])


def _norm_edges() -> list[tuple[str, dict[str, Any], list[Shape]]]:
    shapes = [Shape(2, 7), Shape(1, 1)]
    return [
        ("rms dim 4096", {"type": "rms", "dim": 4096, "eps": 1e-5}, shapes),
        ("rms odd dim 97", {"type": "rms", "dim": 97}, shapes),
        ("rms 1 + w (gemma)", {"type": "rms", "dim": 64, "unit_offset": True}, shapes),
        ("rms cast before weight", {"type": "rms", "dim": 64, "cast": "before_weight"}, shapes),
        ("layernorm with bias", {"type": "layer", "dim": 80, "bias": True, "eps": 1e-5}, shapes),
    ]


def _norm_strategy(data: Any) -> dict[str, Any]:
    from hypothesis import strategies as st

    return {
        "type": data.draw(st.sampled_from(["rms", "layer"]), label="type"),
        "dim": data.draw(st.integers(2, 300), label="dim"),
        "eps": data.draw(st.sampled_from([1e-6, 1e-5]), label="eps"),
    }


def _mlp_edges() -> list[tuple[str, dict[str, Any], list[Shape]]]:
    shapes = [Shape(2, 7), Shape(1, 1)]
    out = [(f"gated {a}", {"d_model": 64, "hidden": 96, "activation": a}, shapes)
           for a in ("silu", "gelu", "gelu_tanh", "relu")]
    out.append(("ungated gelu with bias", {"d_model": 64, "hidden": 256, "gated": False,
                                            "activation": "gelu", "bias": True}, shapes))
    return out


def _mlp_strategy(data: Any) -> dict[str, Any]:
    from hypothesis import strategies as st

    return {
        "d_model": data.draw(st.integers(8, 160), label="d_model"),
        "hidden": data.draw(st.integers(8, 320), label="hidden"),
        "gated": data.draw(st.booleans(), label="gated"),
        "activation": data.draw(st.sampled_from(["silu", "gelu", "gelu_tanh", "relu"]), label="activation"),
    }


def _moe_sample(config: Any, shape: Shape, g: torch.Generator) -> Sample:
    x = _x(g, shape.batch, shape.tokens, config.d_model)
    if shape.variant not in ("skewed", "ties"):
        return Sample(calls=[(x,)], choices=_moe_choices)
    # an input offset along ones and router row 0 aligned with it: expert 0 wins every token;
    # with "ties" rows 1 and 2 are equal, so every token ties at the k-th place
    ties = shape.variant == "ties"

    def setup(block: Any) -> None:
        d = block.config.d_model
        with torch.no_grad():
            block.router[0] = 1.0 / d**0.5
            if ties:
                block.router[1] = 0.5 / d**0.5
                block.router[2] = block.router[1]

    return Sample(calls=[(0.5 * x + 2.0,)], setup=setup, choices=_moe_choices)


def _moe_choices(block: Any, args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    h = args[0].reshape(-1, block.config.d_model)
    _, scores, _, _ = _moe.route(block, h)
    return block.routing.selected, _moe.choice_scores(block, scores)


def _moe_shapes(config: Any, quick: bool) -> list[Shape]:
    shapes = [Shape(2, 24), Shape(1, 1), Shape(2, 24, variant="skewed")]
    return shapes if quick else [*shapes, Shape(1, 4), Shape(2, 24, variant="ties")]


def _moe_edges() -> list[tuple[str, dict[str, Any], list[Shape]]]:
    base = {"d_model": 64, "n_experts": 8, "top_k": 2, "hidden": 48}
    shapes = [Shape(2, 17), Shape(1, 1), Shape(1, 4), Shape(2, 16, variant="skewed"), Shape(2, 16, variant="ties")]
    return [
        ("softmax top-2, renormalised (mixtral)", base, shapes),
        ("softmax, no renormalisation (grok-1)", {**base, "renormalize": "none", "activation": "gelu_tanh"}, shapes),
        ("sigmoid, correction bias, groups (deepseek-v3)",
         {**base, "scoring": "sigmoid", "correction_bias": True, "n_group": 4, "topk_group": 2,
          "routed_scaling": 2.5, "shared_hidden": 32}, shapes),
        ("shared expert with gate (qwen-moe)", {**base, "top_k": 4, "renormalize": "none", "shared_hidden": 96,
                                               "shared_gate": True}, shapes),
        ("capacity factor 1.0", {**base, "capacity_factor": 1.0}, shapes),
    ]


def _moe_strategy(data: Any) -> dict[str, Any]:
    from hypothesis import strategies as st

    n_experts = data.draw(st.sampled_from([2, 4, 8, 16]), label="n_experts")
    return {
        "d_model": data.draw(st.integers(8, 96), label="d_model"),
        "hidden": data.draw(st.integers(8, 128), label="hidden"),
        "n_experts": n_experts,
        "top_k": data.draw(st.integers(1, min(4, n_experts)), label="top_k"),
        "scoring": data.draw(st.sampled_from(["softmax", "sigmoid"]), label="scoring"),
        "renormalize": data.draw(st.sampled_from(["none", "sum"]), label="renormalize"),
    }


def _head_sample(config: Any, shape: Shape, g: torch.Generator) -> Sample:
    x = _x(g, shape.batch, shape.tokens, config.d_model)
    if config.tied:
        return Sample(calls=[(x, _x(g, config.vocab_size, config.d_model, std=0.1))])
    return Sample(calls=[(x,)])


def _head_edges() -> list[tuple[str, dict[str, Any], list[Shape]]]:
    shapes = [Shape(2, 7), Shape(1, 1)]
    return [
        ("untied", {"d_model": 64, "vocab_size": 1000}, shapes),
        ("tied", {"d_model": 64, "vocab_size": 1000, "tied": True}, shapes),
        ("bias, multiplier, final soft-cap", {"d_model": 64, "vocab_size": 999, "bias": True, "multiplier": 0.5,
                                             "softcap": 30.0}, shapes),
    ]


def _embedding_sample(config: Any, shape: Shape, g: torch.Generator) -> Sample:
    ids = torch.randint(0, config.vocab_size, (shape.batch, shape.tokens), generator=g)
    return Sample(calls=[(ids,)])


def _embedding_edges() -> list[tuple[str, dict[str, Any], list[Shape]]]:
    shapes = [Shape(2, 7), Shape(1, 1)]
    return [
        ("plain", {"vocab_size": 1000, "d_model": 64}, shapes),
        ("multiplier rounded to dtype (gemma)", {"vocab_size": 1000, "d_model": 64, "multiplier": 8.0,
                                                 "round_multiplier": True}, shapes),
    ]


ATTENTION = KindCases(sample=_sequence_sample, edges=_attention_edges, strategy=_attention_strategy,
                      shapes=_cached_shapes)
MLA = KindCases(sample=_sequence_sample, edges=_mla_edges, shapes=_cached_shapes)
LAYER = KindCases(sample=_sequence_sample, edges=_layer_edges, shapes=_cached_shapes)
ROPE = KindCases(sample=_rope_sample, edges=_rope_edges, strategy=_rope_strategy, shapes=_rope_shapes)
NORM = KindCases(sample=partial(_rows_sample, "dim"), edges=_norm_edges, strategy=_norm_strategy, shapes=_token_shapes)
MLP = KindCases(sample=partial(_rows_sample, "d_model"), edges=_mlp_edges, strategy=_mlp_strategy, shapes=_token_shapes)
MOE = KindCases(sample=_moe_sample, edges=_moe_edges, strategy=_moe_strategy, shapes=_moe_shapes)
HEAD = KindCases(sample=_head_sample, edges=_head_edges, shapes=_token_shapes)
EMBEDDING = KindCases(sample=_embedding_sample, edges=_embedding_edges, shapes=_token_shapes)

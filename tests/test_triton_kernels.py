"""The Triton kernels of llmkit_triton (shared by the cuda and rocm backends), run on CPU in Triton's
interpreter (`TRITON_INTERPRET=1`), against the float64 reference under DESIGN.md's precision rule.

Inputs and parameters are rounded to the storage dtype; the float64 reference runs on exactly those
values; the reference in the storage dtype is the naive baseline. A kernel passes when
e_max <= k * e_naive + floor (k = 2 forward, 3 backward; floor = 2 ulps of the output's largest
magnitude, as `llmkit certify`), with no NaN/Inf where the reference is finite. MoE choices must
equal the float64 reference's except where its k-th and (k+1)-th scores lie within the naive error
band. `test_check_detects_*` show each quirk moves the result far past the threshold (the tests
can fail). Shapes are tiny: the interpreter is ~200x slower than eager.
"""

from __future__ import annotations

import os
import sys

# triton.jit decides interpreted vs compiled when it decorates a kernel, i.e. at import
os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']!r}: these tests run Triton's interpreter",
                allow_module_level=True)


def _compiled_kernels_loaded() -> bool:
    """Whether triton.language (or llmkit_triton) was imported before TRITON_INTERPRET=1 was set:
    `triton.jit` picks interpreted or compiled at decoration, and the two cannot be mixed."""
    lang, ours = sys.modules.get("triton.language"), sys.modules.get("llmkit_triton.runtime")
    if lang is not None:
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(lang.sum, InterpretedFunction):
            return True
    return ours is not None and not ours.interpreting()


if _compiled_kernels_loaded():
    pytest.skip("triton was imported (by a module collected earlier) before TRITON_INTERPRET=1 was set, so "
                "its kernels are compiled ones; set TRITON_INTERPRET=1 before any triton import, at the top "
                "of tests/conftest.py", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.4')")
llmkit_triton = pytest.importorskip("llmkit_triton", reason="llmkit-triton-kernels is not installed")

from llmkit import Block  # noqa: E402
from llmkit.cache import LayerCache, StaticLayerCache  # noqa: E402
from llmkit.hookspecs import Impl, Target  # noqa: E402
from llmkit.registry import default_registry  # noqa: E402
from llmkit.testing import bind_reference  # noqa: E402
from llmkit_blocks import attention as ref_attention  # noqa: E402
from llmkit_blocks import moe as ref_moe  # noqa: E402
from llmkit_blocks.mlp import activation as ref_activation  # noqa: E402
from llmkit_triton import blocks as tk  # noqa: E402
from llmkit_triton.activation import gated_activation  # noqa: E402
from llmkit_triton.attention import flash_attention  # noqa: E402
from llmkit_triton.moe import grouped_gemm, moe_align, router_topk  # noqa: E402
from llmkit_triton.norm import rms_norm  # noqa: E402
from llmkit_triton.rope import apply_rope, rope_tables  # noqa: E402

REG = default_registry()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR_ULPS = 2

FORWARDS: dict[str, tuple[Callable[..., Any], Any, Any]] = {
    "norm@1": (tk.norm_forward, tk.norm_unsupported, None),
    "rope@1": (tk.rope_forward, tk.rope_unsupported, tk.rope_prepare),
    "mlp@1": (tk.mlp_forward, tk.mlp_unsupported, None),
    "attention@1": (tk.attention_forward, tk.attention_unsupported, None),
    "moe@1": (tk.moe_forward, tk.moe_unsupported, None),
}


def _impl(kind: str) -> Impl:
    forward, reasons, prepare = FORWARDS[kind]
    return Impl(kind=kind, backend="triton", name="kernels", forward=forward, device_types={"cpu"},
                dtypes=tk.DTYPES, modes=tk.MODES[kind], features=tk.FEATURES[kind],
                not_supported_reasons=reasons, prepare=prepare)


def _target(dtype: torch.dtype, **facts: Any) -> Target:
    return Target(backend="triton", device="cpu", dtype=dtype, facts=facts)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draw(shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float = 1.0) -> torch.Tensor:
    return (std * torch.randn(shape, generator=_gen(seed), dtype=torch.float64)).to(dtype)


def _blocks(kind: str, config: dict[str, Any], dtype: torch.dtype, seed: int = 0,
            std: float = 0.3) -> tuple[Block, Block, Block]:
    """(float64 reference, naive reference in dtype, Triton impl in dtype) on the same values.

    Children of the block under test (an attention's rope and QK-norms, a MoE's shared expert) are
    bound to their Triton impls too, so composition is checked as well."""
    g = _gen(seed)
    under = Block(REG.kind(kind), config, dtype=dtype)
    with torch.no_grad():
        for t in [*under.parameters(), *under.buffers()]:
            t.copy_((std * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype))
        for m in under.modules():  # norm weights near 1 (near 0 with unit_offset), as llmkit.testing.randomize
            if isinstance(m, Block) and m.kind.name == "norm" and not m.config.unit_offset:
                m.weight.add_(1.0)
    exact = copy.deepcopy(under).to(torch.float64)
    naive = copy.deepcopy(under)
    bind_reference(exact, torch.float64)
    bind_reference(naive)
    bind_reference(under)
    for m in under.modules():
        if isinstance(m, Block) and m.kind.id in FORWARDS:
            impl = _impl(m.kind.id)
            assert impl.reasons(m.config, m.kind.features(m.config), _target(dtype)) == []
            m.bind(impl, _target(dtype))
    return exact, naive, under


def _errors(got: torch.Tensor, naive: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
            keep: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(e_max of the impl, e_max of the naive baseline, floor) over the finite reference values."""
    got, naive, exact = got.double(), naive.double(), exact.double()
    mask = torch.isfinite(exact) if keep is None else torch.isfinite(exact) & keep
    e = (got - exact).abs()[mask]
    e_naive = (naive - exact).abs()[mask]
    floor = FLOOR_ULPS * torch.finfo(dtype).eps * max(float(exact[torch.isfinite(exact)].abs().max()), 1e-30)
    return float(e.max()) if e.numel() else 0.0, float(e_naive.max()) if e_naive.numel() else 0.0, floor


def _check(got: torch.Tensor, naive: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, k: float = 2.0,
           keep: torch.Tensor | None = None) -> None:
    assert got.dtype == dtype and got.shape == exact.shape, (got.dtype, got.shape, exact.shape)
    assert not (~torch.isfinite(got) & torch.isfinite(exact)).any(), "NaN/Inf where the reference is finite"
    e, e_naive, floor = _errors(got, naive, exact, dtype, keep)
    assert e <= k * e_naive + floor, f"e_max {e:.3g} > {k} * e_naive {e_naive:.3g} + floor {floor:.3g}"


def _grads(block: Block | None, inputs: list[torch.Tensor], call: Callable[..., torch.Tensor],
           cot: torch.Tensor) -> torch.Tensor:
    """Gradients of (call(*inputs) * cot).sum() w.r.t. the inputs and the block's parameters (if a
    block is given), flattened."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    params = [p for p in block.parameters() if p.is_floating_point()] if block is not None else []
    for p in params:
        p.grad = None
    out = call(*leaves)
    (out * cot.to(out.dtype)).sum().backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (*leaves, *params)]
    return torch.cat([g.reshape(-1).double() for g in grads])


# --- norm@1 ------------------------------------------------------------------------------------

NORMS = [
    {"dim": 48},
    {"dim": 48, "unit_offset": True},
    {"dim": 48, "unit_offset": True, "cast": "after_weight", "eps": 1e-5},
    {"dim": 40, "type": "layer", "bias": True},
    {"dim": 40, "type": "layer", "cast": "before_weight", "bias": True},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", NORMS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_norm_forward_and_backward_match_float64_reference(dtype: torch.dtype, config: dict[str, Any]) -> None:
    exact, naive, under = _blocks("norm", config, dtype)
    x = _draw((2, 5, config["dim"]), dtype, 1, std=2.0) + 0.5
    with torch.no_grad():
        _check(under(x), naive(x), exact(x.double()), dtype)
    cot = _draw((2, 5, config["dim"]), torch.float64, 2)
    _check(_grads(under, [x], under, cot).to(dtype), _grads(naive, [x], naive, cot).to(dtype),
           _grads(exact, [x.double()], exact, cot), dtype, k=3.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_residual_add_norm_returns_the_new_residual_and_its_norm(dtype: torch.dtype) -> None:
    exact, naive, _ = _blocks("norm", {"dim": 64, "unit_offset": True}, dtype)
    x, r = _draw((3, 7, 64), dtype, 3), _draw((3, 7, 64), dtype, 4, std=3.0)
    y, res = rms_norm(x, naive.weight, 1e-6, residual=r, unit_offset=True)
    with torch.no_grad():
        assert torch.equal(res, x + r)  # the residual stream is rounded exactly as the layer's add
        _check(y, naive(x + r), exact(x.double() + r.double()), dtype)

    def fused(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y, res = rms_norm(a, naive.weight, 1e-6, residual=b, unit_offset=True)
        return torch.cat([y, res], dim=-1)

    def unfused(block: Block) -> Callable[..., torch.Tensor]:
        return lambda a, b: torch.cat([block(a + b), a + b], dim=-1)

    cot = _draw((3, 7, 128), torch.float64, 5)
    _check(_grads(naive, [x, r], fused, cot).to(dtype), _grads(naive, [x, r], unfused(naive), cot).to(dtype),
           _grads(exact, [x.double(), r.double()], unfused(exact), cot), dtype, k=3.0)


# --- rope@1 ------------------------------------------------------------------------------------

ROPES = [
    {"head_dim": 16},
    {"head_dim": 16, "layout": "interleaved"},
    {"head_dim": 24, "partial": 0.5},
    {"head_dim": 20, "partial": 0.6, "layout": "interleaved", "theta": 500000.0},
    {"head_dim": 16, "scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    {"head_dim": 16, "scaling": {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}},
    {"head_dim": 32, "scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", ROPES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("offset", [0, 32760], ids=["pos0", "pos2^15"])
def test_rope_forward_and_backward_match_float64_reference(dtype: torch.dtype, config: dict[str, Any],
                                                           offset: int) -> None:
    exact, naive, under = _blocks("rope", config, dtype)
    pos = offset + torch.stack([torch.arange(9), torch.arange(9) * 3 + 1])
    x = _draw((2, 3, 9, config["head_dim"]), dtype, 6)
    with torch.no_grad():
        _check(under(x, pos), naive(x, pos), exact(x.double(), pos), dtype)
    cot = _draw(tuple(x.shape), torch.float64, 7)
    _check(_grads(under, [x], lambda a: under(a, pos), cot).to(dtype),
           _grads(naive, [x], lambda a: naive(a, pos), cot).to(dtype),
           _grads(exact, [x.double()], lambda a: exact(a, pos), cot), dtype, k=3.0)


def test_rope_takes_a_strided_view_as_attention_passes_it() -> None:
    exact, naive, under = _blocks("rope", {"head_dim": 16}, torch.float32)
    x = _draw((2, 7, 3, 16), torch.float32, 8).transpose(1, 2)  # [B, H, T, D] view of [B, T, H, D]
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        _check(under(x, pos), naive(x, pos), exact(x.double(), pos), torch.float32)


# --- the gated activation and mlp@1 ------------------------------------------------------------

ACTS = ["silu", "gelu", "gelu_tanh", "relu"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_gated_activation_forward_and_backward_match_float64_reference(dtype: torch.dtype, act: str) -> None:
    gate, up = _draw((3, 70), dtype, 9, std=3.0), _draw((3, 70), dtype, 10)
    cot = _draw((3, 70), torch.float64, 11)

    def ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ref_activation(act, a) * b

    with torch.no_grad():
        _check(gated_activation(gate, up, act), ref(gate, up), ref(gate.double(), up.double()), dtype)
        _check(gated_activation(gate, None, act), ref_activation(act, gate), ref_activation(act, gate.double()), dtype)
    _check(_grads(None, [gate, up], lambda a, b: gated_activation(a, b, act), cot).to(dtype),
           _grads(None, [gate, up], ref, cot).to(dtype),
           _grads(None, [gate.double(), up.double()], ref, cot), dtype, k=3.0)


MLPS = [
    {"d_model": 32, "hidden": 48},
    {"d_model": 32, "hidden": 48, "activation": "gelu_tanh", "bias": True},
    {"d_model": 32, "hidden": 40, "gated": False, "activation": "gelu"},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", MLPS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_mlp_forward_and_backward_match_float64_reference(dtype: torch.dtype, config: dict[str, Any]) -> None:
    exact, naive, under = _blocks("mlp", config, dtype)
    x = _draw((2, 5, 32), dtype, 12)
    with torch.no_grad():
        _check(under(x), naive(x), exact(x.double()), dtype)
    cot = _draw((2, 5, 32), torch.float64, 13)
    _check(_grads(under, [x], under, cot).to(dtype), _grads(naive, [x], naive, cot).to(dtype),
           _grads(exact, [x.double()], exact, cot), dtype, k=3.0)


# --- attention@1 -------------------------------------------------------------------------------

ATTENTIONS = [
    {"n_kv_heads": 2},
    {"n_kv_heads": 1, "window": 5, "softcap": 2.0},
    {"n_kv_heads": 4, "causal": False, "softcap": 30.0, "scale": 0.5},
    {"n_kv_heads": 2, "window": 16, "qk_norm": {"eps": 1e-6}, "fused_qkv": True, "qkv_bias": True},
]
ATTN = {"d_model": 64, "n_heads": 4, "rope": {"theta": 10000.0}}


def _attention_calls(blocks: tuple[Block, Block, Block], calls: list[tuple[torch.Tensor, torch.Tensor]],
                     dtype: torch.dtype, cached: bool, cache_type: Callable[[], LayerCache] = LayerCache) -> None:
    """Run the calls (x, positions) through one cache per block; check every output."""
    outs: list[list[torch.Tensor]] = [[], [], []]
    for i, block in enumerate(blocks):
        cache = cache_type() if cached else None
        for x, pos in calls:
            x = x.double() if i == 0 else x
            with torch.no_grad():
                outs[i].append(block(x, pos, cache) if cached else block(x, pos))
    exact, naive, got = (torch.cat([o.reshape(-1) for o in out]) for out in outs)
    _check(got, naive, exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("extra", ATTENTIONS, ids=lambda c: ",".join(c))
def test_attention_prefill_matches_float64_reference(dtype: torch.dtype, extra: dict[str, Any]) -> None:
    blocks = _blocks("attention", {**ATTN, **extra}, dtype)
    x = _draw((2, 19, 64), dtype, 14)
    _attention_calls(blocks, [(x, torch.arange(19))], dtype, cached=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("extra", ATTENTIONS[:2], ids=lambda c: ",".join(c))
@pytest.mark.parametrize("cache_type", [LayerCache, lambda: StaticLayerCache(32)], ids=["dynamic", "static"])
def test_attention_decode_over_a_cache_matches_float64_reference(dtype: torch.dtype, extra: dict[str, Any],
                                                                 cache_type: Callable[[], LayerCache]) -> None:
    """Prefill 11 tokens, then 3 one-token steps; the static cache hands out strided views."""
    blocks = _blocks("attention", {**ATTN, **extra}, dtype)
    calls = [(_draw((2, 11, 64), dtype, 15), torch.arange(11))]
    calls += [(_draw((2, 1, 64), dtype, 16 + i), torch.tensor([11 + i])) for i in range(3)]
    _attention_calls(blocks, calls, dtype, cached=True, cache_type=cache_type)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_left_padding_gives_zero_rows_and_matches_reference(dtype: torch.dtype) -> None:
    blocks = _blocks("attention", {**ATTN, "n_kv_heads": 2, "window": 4}, dtype)
    pos = torch.stack([torch.arange(9), torch.cat([torch.full((3,), -1), torch.arange(6)])])
    _attention_calls(blocks, [(_draw((2, 9, 64), dtype, 20), pos)], dtype, cached=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_kernel_decode_offset_gqa_and_tiles_match_attend(dtype: torch.dtype) -> None:
    """Several query and key tiles, 5 queries at the end of 37 keys, 6 query heads on 2 KV heads,
    a head dim (40) that is not a power of two, a window and a soft-cap."""
    q = _draw((1, 6, 5, 40), dtype, 21)
    k, v = _draw((1, 2, 37, 40), dtype, 22), _draw((1, 2, 37, 40), dtype, 23)
    q_pos, k_pos = torch.arange(32, 37)[None], torch.arange(37)[None]
    kw = {"scale": 0.3, "softcap": 5.0, "window": 20}
    got = flash_attention(q, k, v, q_pos, k_pos, **kw)
    naive = ref_attention.attend(q, k, v, q_pos, k_pos, **kw)
    exact = ref_attention.attend(q.double(), k.double(), v.double(), q_pos, k_pos, **kw)
    _check(got, naive, exact, dtype)


# --- moe@1 -------------------------------------------------------------------------------------

def _choices_ok(exact: Block, naive: Block, got: Block, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """DESIGN.md rule 5: choices equal the float64 reference's except at near-ties (the k-th and
    (k+1)-th float64 scores within twice the naive score error + 2 ulps). Returns the tokens whose
    outputs can be compared (same choices as the reference, in the impl and the naive run)."""
    k = exact.config.top_k
    sel_exact = exact.routing.selected.sort(-1).values
    h = x.reshape(-1, exact.config.d_model)
    scores = ref_moe.choice_scores(exact, ref_moe.route(exact, h.double())[1])
    naive_scores = ref_moe.choice_scores(naive, ref_moe.route(naive, h)[1]).double()
    band = 2 * float((naive_scores - scores).abs().max()) + FLOOR_ULPS * torch.finfo(dtype).eps
    top = scores.topk(min(k + 1, scores.shape[-1]), dim=-1).values
    near = (top[:, k - 1] - top[:, k] <= band) if top.shape[-1] > k else torch.zeros(len(top), dtype=torch.bool)
    differs = (got.routing.selected.sort(-1).values != sel_exact).any(-1)
    assert not (differs & ~near).any(), f"choices differ outside near-ties at tokens {torch.nonzero(differs & ~near)}"
    naive_differs = (naive.routing.selected.sort(-1).values != sel_exact).any(-1)
    return ~(differs | naive_differs)


MOES = [
    {"d_model": 32, "n_experts": 4, "top_k": 2, "hidden": 24},
    {"d_model": 32, "n_experts": 6, "top_k": 3, "hidden": 16, "scoring": "sigmoid", "correction_bias": True,
     "routed_scaling": 2.5, "shared_hidden": 24},
    {"d_model": 32, "n_experts": 5, "top_k": 2, "hidden": 16, "renormalize": "none", "shared_hidden": 16,
     "shared_gate": True, "activation": "gelu_tanh"},
    {"d_model": 32, "n_experts": 4, "top_k": 1, "hidden": 20, "gated": False, "activation": "gelu",
     "expert_bias": True, "capacity_factor": 0.5, "load_balance_coef": 0.01, "z_loss_coef": 0.001},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", MOES, ids=lambda c: ",".join(c))
def test_moe_forward_matches_float64_reference(dtype: torch.dtype, config: dict[str, Any]) -> None:
    exact, naive, under = _blocks("moe", config, dtype, std=0.5)
    x = _draw((2, 9, 32), dtype, 24)
    with torch.no_grad():
        outs = [b(xx) for b, xx in ((exact, x.double()), (naive, x), (under, x))]
        keep = _choices_ok(exact, naive, under, x, dtype)
    assert keep.float().mean() > 0.5, "too few comparable tokens for a meaningful check"
    _check(outs[2], outs[1], outs[0], dtype, keep=keep.view(2, 9, 1).expand(2, 9, 32))
    if bool(keep.all()):  # same choices everywhere: the routing statistics must agree too
        got, ref, base = under.routing, exact.routing, naive.routing
        assert got.dropped == ref.dropped and torch.equal(got.tokens_per_expert, ref.tokens_per_expert)
        for name, loss in ref.losses.items():
            _check(got.losses[name].reshape(1), base.losses[name].reshape(1), loss.reshape(1), torch.float32)


def test_router_topk_ties_at_the_boundary_pick_the_lower_expert() -> None:
    """Exact ties at the k-th place: the kernel takes the lowest expert id (documented), and its
    weights are the tied scores either way, so they equal the float64 reference's."""
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5, 0.5], [-1.0, 4.0, 4.0, 4.0, 1.0]])
    scores, selected, weights = router_topk(logits, 2)
    assert selected.tolist() == [[0, 2], [0, 1], [1, 2]]
    ref = logits.double().softmax(-1)
    top = ref.topk(2).values
    torch.testing.assert_close(weights.double(), top / top.sum(-1, keepdim=True), rtol=1e-6, atol=0)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scoring,renormalize,bias", [("softmax", True, False), ("sigmoid", True, True),
                                                      ("sigmoid", False, False)])
def test_router_topk_matches_route_on_tie_free_scores(scoring: str, renormalize: bool, bias: bool) -> None:
    n, e, k = 40, 8, 3
    # a permutation per token, spaced by 0.25: no near-tie anywhere
    logits = torch.stack([torch.randperm(e, generator=_gen(i)).double() * 0.25 for i in range(n)]).float()
    corr = _draw((e,), torch.float32, 25, std=0.05) if bias else None
    scores, selected, weights = router_topk(logits, k, scoring=scoring, correction_bias=corr,
                                            renormalize=renormalize, routed_scaling=1.5)
    cfg = {"d_model": 4, "n_experts": e, "top_k": k, "hidden": 4, "scoring": scoring, "correction_bias": bias,
           "renormalize": "sum" if renormalize else "none", "routed_scaling": 1.5}
    block = Block(REG.kind("moe"), cfg, dtype=torch.float64)
    if bias:
        block.correction_bias.copy_(corr)
    ref_scores = logits.double().softmax(-1) if scoring == "softmax" else logits.double().sigmoid()
    ref_sel = ref_moe.choice_scores(block, ref_scores).topk(k).indices
    ref_w = ref_scores.gather(-1, ref_sel)
    ref_w = (ref_w / ref_w.sum(-1, keepdim=True) if renormalize else ref_w) * 1.5
    assert torch.equal(selected, ref_sel)
    torch.testing.assert_close(weights.double(), ref_w, rtol=4e-7, atol=0)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=4e-7, atol=0)


@pytest.mark.parametrize("n,k,e,block_m,capacity", [(9, 2, 4, 16, None), (300, 2, 5, 16, None),
                                                    (300, 2, 5, 16, 70), (7, 3, 8, 32, 2)])
def test_moe_align_groups_assignments_by_expert_stably_with_padding_and_capacity(
        n: int, k: int, e: int, block_m: int, capacity: int | None) -> None:
    """300 tokens x 2 slots spans several alignment chunks (256 assignments each): the prefix over
    chunks must keep token order inside every expert."""
    selected = torch.stack([torch.randperm(e, generator=_gen(100 + i))[:k] for i in range(n)])
    if n == 300:
        selected[:200, 0] = 1  # skew: expert 1 overflows the capacity
    a = moe_align(selected, e, block_m, capacity)
    flat = selected.reshape(-1)
    assert torch.equal(a.counts, torch.bincount(flat, minlength=e))
    ids, experts = a.sorted_ids.long(), a.expert_ids.long()
    padded = int(a.padded)
    assert padded % block_m == 0 and bool((ids[padded:] == n * k).all())
    start = 0
    for ex in range(e):
        mine = torch.nonzero(flat == ex).flatten()  # in assignment (token, slot) order
        if capacity is not None:
            mine = mine[:capacity]
        run = -(-len(mine) // block_m) * block_m
        assert torch.equal(ids[start:start + len(mine)], mine)
        assert bool((ids[start + len(mine):start + run] == n * k).all())
        assert bool((experts[start // block_m:(start + run) // block_m] == ex).all())
        start += run
    assert start == padded and bool((experts[padded // block_m:] == -1).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [True, False])
def test_grouped_gemm_matches_per_expert_linears(dtype: torch.dtype, gated: bool) -> None:
    n, k, e, d, hidden = 11, 2, 4, 40, 24
    selected = torch.stack([torch.randperm(e, generator=_gen(200 + i))[:k] for i in range(n)])
    x = _draw((n, d), dtype, 26)
    w, wg = _draw((e, hidden, d), dtype, 27, 0.3), _draw((e, hidden, d), dtype, 28, 0.3)
    b, bg = _draw((e, hidden), dtype, 29, 0.3), _draw((e, hidden), dtype, 30, 0.3)
    scale = _draw((n * k,), torch.float32, 31).abs()
    got = grouped_gemm(x, w, moe_align(selected, e, 16), a_div=k, bias=b, gate=wg if gated else None,
                       gate_bias=bg if gated else None, activation="silu", row_scale=scale)

    def ref(xx: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        rows = []
        for a in range(n * k):
            ex, xa = int(selected.view(-1)[a]), xx[a // k]
            up = torch.nn.functional.linear(xa, w[ex].to(dt), b[ex].to(dt))
            h = (ref_activation("silu", torch.nn.functional.linear(xa, wg[ex].to(dt), bg[ex].to(dt))) * up if gated
                 else ref_activation("silu", up))
            rows.append(h * scale[a].to(dt))
        return torch.stack(rows)

    _check(got, ref(x, dtype), ref(x.double(), torch.float64), dtype)


# --- declared capabilities and reasons ---------------------------------------------------------

def test_impls_built_from_the_package_declarations_are_valid_and_cover_the_catalogue() -> None:
    everything = {
        "norm@1": [{"dim": 8, "unit_offset": True, "cast": "after_weight"}, {"dim": 8, "type": "layer", "bias": True}],
        "rope@1": [{"head_dim": 8, "layout": "interleaved", "partial": 0.5,
                    "scaling": {"type": "linear", "factor": 2.0}}],
        "mlp@1": [{"d_model": 8, "hidden": 8, "bias": True, "activation": a} for a in ACTS]
                 + [{"d_model": 8, "hidden": 8, "gated": False}],
        "attention@1": [{"d_model": 64, "n_heads": 4, "n_kv_heads": 1, "fused_qkv": True, "qkv_bias": True,
                         "o_bias": True, "clip_qkv": 1.0, "qk_norm": {}, "softcap": 5.0, "window": 8,
                         "causal": False, "rope": {}}],
        "moe@1": [{"d_model": 8, "n_experts": 4, "top_k": 2, "hidden": 8, "scoring": "sigmoid",
                   "correction_bias": True, "routed_scaling": 2.0, "jitter": 0.1, "capacity_factor": 1.0,
                   "shared_hidden": 8, "shared_gate": True, "expert_bias": True, "gated": False,
                   "renormalize": "none", "load_balance_coef": 0.1, "z_loss_coef": 0.1,
                   "seq_balance_coef": 0.1}],
    }
    for kind_id, configs in everything.items():
        kind = REG.kind(kind_id.split("@")[0])
        impl = _impl(kind_id)
        for raw in configs:
            config = kind.config.model_validate(raw)
            assert impl.reasons(config, kind.features(config), _target(torch.bfloat16)) == [], (kind_id, raw)
        assert impl.reasons(kind.config.model_validate(configs[0]), frozenset(), _target(torch.float64)) != []


def test_unsupported_configs_are_refused_with_precise_reasons() -> None:
    moe = REG.kind("moe").config.model_validate(
        {"d_model": 8, "n_experts": 8, "top_k": 2, "hidden": 8, "n_group": 4, "topk_group": 2})
    f32 = _target(torch.float32)
    assert any("group-limited routing (n_group=4, topk_group=2)" in r for r in tk.moe_unsupported(moe, f32))
    assert any("group_limited" in r for r in _impl("moe@1").reasons(moe, REG.kind("moe").features(moe), f32))
    attn = REG.kind("attention").config.model_validate({"d_model": 512, "n_heads": 1})
    assert any("head_dim 512 exceeds 256" in r for r in tk.attention_unsupported(attn, f32))
    train = Target(backend="triton", device="cpu", dtype=torch.float32, mode="train")
    assert any("mode 'train' not declared" in r for r in _impl("attention@1").reasons(attn, frozenset(), train))
    quant = _target(torch.float32, quant="int8")
    mlp = REG.kind("mlp").config.model_validate({"d_model": 8, "hidden": 8})
    for reasons in (tk.mlp_unsupported(mlp, quant), tk.attention_unsupported(attn, quant), tk.moe_unsupported(moe, quant)):
        assert any("quant='int8'" in r for r in reasons)
    norm = REG.kind("norm").config.model_validate({"dim": 65536})
    assert any("dim 65536 exceeds 32768" in r for r in tk.norm_unsupported(norm, f32))
    assert list(tk.norm_unsupported(REG.kind("norm").config.model_validate({"dim": 4096}), f32)) == []
    with pytest.raises(TypeError, match="float64"):
        rms_norm(torch.ones(2, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 1e-6)


# --- the checks can fail: each quirk moves the result far past the threshold --------------------

def _fails(got: torch.Tensor, naive: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> bool:
    e, e_naive, floor = _errors(got, naive, exact, dtype)
    return e > 10 * (2 * e_naive + floor)


def test_check_detects_a_missing_softcap_or_a_window_off_by_one() -> None:
    dtype = torch.float32
    q, k = _draw((1, 2, 12, 16), dtype, 40, 2.0), _draw((1, 2, 12, 16), dtype, 41, 2.0)
    v = _draw((1, 2, 12, 16), dtype, 42)
    pos = torch.arange(12)[None]
    kw = {"scale": 0.5, "softcap": 2.0, "window": 4}
    naive = ref_attention.attend(q, k, v, pos, pos, **kw)
    exact = ref_attention.attend(q.double(), k.double(), v.double(), pos, pos, **kw)
    assert not _fails(flash_attention(q, k, v, pos, pos, **kw), naive, exact, dtype)
    assert _fails(flash_attention(q, k, v, pos, pos, **{**kw, "softcap": None}), naive, exact, dtype)
    assert _fails(flash_attention(q, k, v, pos, pos, **{**kw, "window": 5}), naive, exact, dtype)


def test_check_detects_a_wrong_rope_layout_or_norm_offset() -> None:
    dtype = torch.float32
    exact, naive, under = _blocks("rope", {"head_dim": 16, "layout": "interleaved"}, dtype)
    x, pos = _draw((1, 2, 6, 16), dtype, 43), torch.arange(3, 9)[None]
    cos, sin = rope_tables(under.config, pos)
    with torch.no_grad():
        assert _fails(apply_rope(x, cos, sin, interleaved=False), naive(x, pos), exact(x.double(), pos), dtype)
    exact, naive, under = _blocks("norm", {"dim": 16, "unit_offset": True}, dtype)
    x = _draw((3, 16), dtype, 44)
    with torch.no_grad():
        wrong = rms_norm(x, naive.weight, 1e-6, unit_offset=False)
        assert _fails(wrong, naive(x), exact(x.double()), dtype)

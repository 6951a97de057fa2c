"""The CPU backend's impls against the float64 reference, under DESIGN.md's precision rule.

Inputs and parameters are rounded to the storage dtype; the float64 reference runs on exactly
those values; the reference impl run in the storage dtype is the naive baseline. An impl passes
when e_max(impl) <= 2 * e_max(naive) + floor, floor = 8 ulps of the output's magnitude, with no
NaN/Inf where the reference is finite. Cases cover what the impls claim: GQA ratios 1..all,
sliding windows, soft-cap (flash), odd lengths and chunk boundaries, padding, decode over a cache,
positions near 2^15 and 2^16, every declared dtype; MoE routing with ties at the top-k boundary.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmkit
from llmkit import Block
from llmkit.cache import LayerCache, StaticLayerCache
from llmkit.registry import default_registry
from llmkit.testing import bind_reference
from llmkit_backend_cpu import attention as cpu_attention
from llmkit_backend_cpu import kernels, quant
from llmkit_backend_cpu import moe as cpu_moe
from llmkit_blocks import moe as moe_blocks

REG = default_registry()
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _blocks(kind: str, config: dict[str, Any], dtype: torch.dtype, impl: str, seed: int = 0,
            std: float = 0.3) -> tuple[Block, Block, Block]:
    """(float64 reference, naive reference in dtype, impl under test in dtype) on the same values."""
    g = torch.Generator().manual_seed(seed)
    under = Block(REG.kind(kind), config, dtype=dtype)
    with torch.no_grad():
        for t in under.parameters():
            t.copy_((std * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype))
    exact = copy.deepcopy(under).to(torch.float64)
    naive = copy.deepcopy(under)
    bind_reference(exact, torch.float64)
    bind_reference(naive)
    bind_reference(under)
    under.bind(REG.impl(f"{kind}@1", f"cpu.{impl}"), REG.target("cpu", dtype=dtype))
    return exact, naive, under


def _check(got: torch.Tensor, naive: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == exact.shape
    assert torch.isfinite(got).all()
    e_impl = (got.double() - exact).abs().max().item()
    e_naive = (naive.double() - exact).abs().max().item()
    floor = 8 * torch.finfo(dtype).eps * max(exact.abs().max().item(), 1e-30)
    assert e_impl <= 2 * e_naive + floor, f"e_max {e_impl:.3g} > 2 * naive {e_naive:.3g} + floor {floor:.3g}"


def _run(blocks: tuple[Block, Block, Block], x: torch.Tensor, *args: Any) -> None:
    exact, naive, under = blocks
    dtype = x.dtype
    with torch.no_grad():
        _check(under(x, *args), naive(x, *args), exact(x.double(), *args), dtype)


ATTN = {"d_model": 64, "n_heads": 8, "rope": {"theta": 10000.0}}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["sdpa", "flash"])
@pytest.mark.parametrize("extra", [
    {"n_kv_heads": 8}, {"n_kv_heads": 2}, {"n_kv_heads": 1}, {"n_kv_heads": 4, "window": 5},
    {"n_kv_heads": 2, "fused_qkv": True, "clip_qkv": 0.5, "qkv_bias": True}, {"n_kv_heads": 2, "causal": False},
    {"n_kv_heads": 2, "qk_norm": {"eps": 1e-6}, "o_bias": True},
], ids=lambda e: ",".join(e))
def test_attention_prefill(dtype, impl, extra) -> None:
    blocks = _blocks("attention", {**ATTN, **extra}, dtype, impl)
    x = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    _run(blocks, x, torch.arange(19))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 7])
def test_flash_soft_cap_and_sdpa_refuses_it(dtype, window) -> None:
    config = {**ATTN, "n_kv_heads": 2, "softcap": 1.5, "window": window}
    _run(_blocks("attention", config, dtype, "flash", std=1.0), torch.randn(2, 23, 64).to(dtype), torch.arange(23))
    reasons = REG.impl("attention@1", "cpu.sdpa").reasons(
        REG.kind("attention").config(**config), frozenset(REG.kind("attention").features(
            REG.kind("attention").config(**config))), REG.target("cpu", dtype=dtype))
    assert any("softcap" in r for r in reasons)


@pytest.mark.parametrize("impl", ["sdpa", "flash"])
@pytest.mark.parametrize("t", [1, 511, 512, 513, 1100])
def test_chunk_boundaries_and_long_positions(monkeypatch, impl, t) -> None:
    """Lengths around the flash chunk (512) and SDPA's mask blocks; positions past 2^15 and 2^16."""
    monkeypatch.setattr(cpu_attention, "_MASK_ELEMENTS", 1000 * 64)  # force several mask blocks
    blocks = _blocks("attention", {**ATTN, "n_kv_heads": 2, "window": 300}, torch.float32, impl)
    x = torch.randn(1, t, 64, generator=torch.Generator().manual_seed(2))
    for start in (0, 2**15 - 7, 2**16 - 300):
        _run(blocks, x, torch.arange(start, start + t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl, decode", [("sdpa", "sdpa"), ("sdpa", "gemm"), ("sdpa", "fused"), ("flash", None)])
@pytest.mark.parametrize("static", [False, True])
def test_a_half_precision_cache_read_straight_into_float32_gives_what_the_models_dtype_gives(
        monkeypatch, dtype, impl, decode, static) -> None:
    """The cpu impls take a float16 cache's keys and values in its storage dtype
    (`extend_stored`) and convert them themselves: bitwise the output of the same impl reading
    them through `extend` (converted back to the model's dtype first), for the prefill and each
    decode path."""
    if decode != "sdpa":
        monkeypatch.setattr(cpu_attention, "_DECODE_GEMM_KEYS", 0)
    if decode == "fused":
        real = cpu_attention._decode
        monkeypatch.setattr(cpu_attention, "_decode", lambda *a, **kw: real(*a, **{**kw, "compiled": True}))
    base = StaticLayerCache if static else LayerCache

    class ModelDtype(base):  # the cache as `extend` hands it out: back in the dtype it came in
        def extend_stored(self, positions, **new):
            full, full_pos = super().extend_stored(positions, **new)
            return {k: v.to(new[k].dtype) for k, v in full.items()}, full_pos

    under = _blocks("attention", {**ATTN, "n_kv_heads": 2}, dtype, impl)[2]
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    outs = []
    for cls in (base, ModelDtype):
        cache = cls(40, dtype=torch.float16) if static else cls(dtype=torch.float16)
        with torch.no_grad():
            steps = [under(x[:, :30], torch.arange(30)[None], cache)]
            steps += [under(x[:, t:t + 1], torch.tensor([[t]]), cache) for t in range(30, 40)]
        assert cache.tensors["k"].dtype == torch.float16
        outs.append(torch.cat(steps, 1))
    assert outs[0].dtype == dtype and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["sdpa", "flash"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("decode", ["sdpa", "gemm", "fused"])
def test_decode_over_a_cache_with_padding(monkeypatch, dtype, impl, window, static, decode) -> None:
    """Left-padded prompts (negative positions), then one token at a time through a cache; sdpa's
    decode runs through SDPA for short caches and two grouped GEMMs for long ones (forced here), and
    inside a compiled step as products and reductions (run eagerly here; the compiled-generation
    tests run it through inductor)."""
    if decode != "sdpa":
        monkeypatch.setattr(cpu_attention, "_DECODE_GEMM_KEYS", 0)
    if decode == "fused":
        real = cpu_attention._decode
        monkeypatch.setattr(cpu_attention, "_decode", lambda *a, **kw: real(*a, **{**kw, "compiled": True}))
    exact, naive, under = _blocks("attention", {**ATTN, "n_kv_heads": 2, "window": window}, dtype, impl)
    pos = torch.tensor([[-1, -1, -1, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(3)).to(dtype)

    def cache() -> LayerCache:
        return StaticLayerCache(12, max_tokens=window) if static else LayerCache(max_tokens=window)

    caches = [cache(), cache(), cache()]
    with torch.no_grad():
        outs = [[m(x[:, :6].double() if m is exact else x[:, :6], pos, c)]
                for m, c in zip((under, naive, exact), caches)]
        for step in range(6):
            p = pos[:, -1:] + 1 + step
            for out, m, c in zip(outs, (under, naive, exact), caches):
                xin = x[:, 6 + step:7 + step]
                out.append(m(xin.double() if m is exact else xin, p, c))
    got, nv, ex = (torch.cat(o, 1) for o in outs)
    assert (got[0, :3] == 0).all()  # padding queries see nothing
    _check(got, nv, ex, dtype)


def test_sdpa_memory_stays_linear_in_the_masked_path(monkeypatch) -> None:
    """With a window the mask path runs; its blocks never exceed _MASK_ELEMENTS booleans."""
    seen = []
    real = cpu_attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            seen.append(attn_mask.shape[-2] * attn_mask.shape[-1])
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(cpu_attention, "_MASK_ELEMENTS", 64 * 300)
    monkeypatch.setattr(cpu_attention.F, "scaled_dot_product_attention", spy)
    _, _, under = _blocks("attention", {**ATTN, "n_kv_heads": 2, "window": 16}, torch.float32, "sdpa")
    with torch.no_grad():
        under(torch.randn(1, 300, 64), torch.arange(300))
    assert seen and max(seen) <= 64 * 300 and len(seen) >= 5


# ---------------------------------------------------------------- MoE

MOE = {"d_model": 32, "n_experts": 8, "top_k": 2, "hidden": 48}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("extra", [
    {}, {"renormalize": "none", "activation": "gelu_tanh"},
    {"scoring": "sigmoid", "correction_bias": True, "n_group": 4, "topk_group": 2, "routed_scaling": 2.5,
     "shared_hidden": 16},
    {"shared_hidden": 24, "shared_gate": True, "gated": False, "expert_bias": True, "activation": "relu"},
    {"capacity_factor": 0.5},
], ids=lambda e: ",".join(e) or "mixtral")
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_moe_grouped(dtype, extra, tokens, monkeypatch) -> None:
    together = []
    # the grouped path's branches at every size, whatever this CPU's moe_decode limit
    monkeypatch.setattr(cpu_moe, "decode_max_tokens", lambda dtype: cpu_moe.GEMV_MAX_ROWS)
    monkeypatch.setattr(cpu_moe, "_experts_together", lambda *a: together.append(a[3]) or _experts_together(*a))
    blocks = _blocks("moe", {**MOE, **extra}, dtype, "grouped")
    if "correction_bias" in extra:
        for b in blocks:
            b.correction_bias.copy_(0.3 * torch.randn(8, generator=torch.Generator().manual_seed(9)))
    x = torch.randn(2, tokens, 32, generator=torch.Generator().manual_seed(4)).to(dtype)
    exact, naive, under = blocks
    # at 1 token a row (2 in all) the layer is moe_decode's; at 3 (6 in all) the active experts'
    # products are the GEMV kernel's; at 64 (128) one moe_experts call takes every expert's slice
    assert under._cpu_gemv == (dtype in (torch.float32, torch.bfloat16))
    with torch.no_grad():
        got, nv = under(x), naive(x)
        ex = exact(x.double())
    prefill = tokens == 64 and under._cpu_gemv and not (dtype == torch.bfloat16 and quant.WIDEN_BF16)
    assert len(together) == prefill
    assert all(len(chosen) >= 2 and all(end - start > cpu_moe.GEMV_MAX_ROWS for _, start, end in chosen)
               for chosen in together)
    # the PyTorch path routes exactly as the naive reference in the same dtype (the same routing
    # code); moe_decode routes in float32, here as float64 does
    same = exact if under._cpu_gemv and tokens == 1 else naive
    assert torch.equal(under.routing.selected, same.routing.selected)
    assert torch.equal(under.routing.tokens_per_expert, same.routing.tokens_per_expert)
    assert under.routing.dropped == same.routing.dropped
    if torch.equal(naive.routing.selected, exact.routing.selected):
        _check(got, nv, ex, dtype)
    else:  # a near-tie flipped a choice in low precision: compare with the naive baseline instead
        assert dtype in (torch.bfloat16, torch.float16)
        torch.testing.assert_close(got, nv, rtol=2e-2, atol=2e-2)


def _assert_float32_sums(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got = x @ w^T as a float32 [M, N] with float32 sums: within K 2^-23 |x| |w|^T of float64."""
    assert got.dtype == torch.float32 and got.shape == (x.shape[0], w.shape[0])
    want = x.double() @ w.double().T
    bound = x.shape[1] * 2.0**-23 * (x.double().abs() @ w.double().abs().T)
    assert ((got.double() - want).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("path", ["float32-avx512", "float32-avx2", "bfloat16"])
@pytest.mark.parametrize("rows, k, n", [(1, 1, 1), (2, 7, 5), (3, 1024, 3584), (4, 3584, 1027), (5, 48, 9),
                                         (1, 1050, 12), (2, 16, 4), (3, 1050, 12), (8, 100, 13)])
def test_gemv_kernel_is_x_times_the_weights_in_float32(rows, k, n, path) -> None:
    """`llmkit_cpu::gemv` against float64: the weights as stored (bfloat16 widened exactly), float32
    sums (rows of x in pairs and a single one, whole steps of 32 channels, bfloat16's split blocks
    of 16 channels and the scalar tail; float32 with 4+ rows on a CPU with AVX-512F: groups of 4
    rows of W in steps of 32 and 16 channels, the rows after the last group as without it)."""
    dtype = torch.bfloat16 if path == "bfloat16" else torch.float32
    gen = torch.Generator().manual_seed(k + n)
    w = (torch.randn(n, k, generator=gen) * torch.linspace(0.01, 3, n)[:, None]).to(dtype)
    x = torch.randn(rows, k, generator=gen)
    assert kernels.ready()
    library = kernels._library()
    avx512 = path == "float32-avx512"
    if library.llmkit_gemv_avx512(int(avx512)) != avx512:
        pytest.skip("this CPU has no AVX-512F")
    try:
        got = torch.ops.llmkit_cpu.gemv.default(x, w)
    finally:
        library.llmkit_gemv_avx512(1)
    _assert_float32_sums(got, x, w)


ROW_KERNEL_PATHS = ["float32", "float32-avx2", "bfloat16-vdpbf16ps", "bfloat16-widened"]


@contextlib.contextmanager
def _row_kernel_path(path: str) -> Iterator[torch.dtype]:
    """The row kernels' path `path` (float32 with or without the AVX-512F row groups; bfloat16 by
    vdpbf16ps or widened) for the with block, skipped where this CPU lacks it; yields its dtype."""
    assert kernels.ready()
    library = kernels._library()
    dtype = torch.float32 if path.startswith("float32") else torch.bfloat16
    native = path.endswith("vdpbf16ps")
    if dtype == torch.bfloat16 and library.llmkit_gemv_native_bf16(int(native)) != native:
        pytest.skip("this CPU has no AVX512_BF16")
    library.llmkit_gemv_avx512(int(path != "float32-avx2"))
    try:
        yield dtype
    finally:
        library.llmkit_gemv_native_bf16(1)
        library.llmkit_gemv_avx512(1)


@pytest.mark.parametrize("path", ["bfloat16-vdpbf16ps", "bfloat16-widened"])
@pytest.mark.parametrize("rows, k, n", [(1, 1, 1), (2, 31, 5), (3, 1024, 3584), (4, 3584, 1027), (5, 200, 9),
                                         (1, 1050, 12), (2, 100, 8), (8, 96, 13), (4, 40, 4)])
def test_gemv_kernel_with_bfloat16_x_is_the_product_in_float32(rows, k, n, path) -> None:
    """x and w both bfloat16: AVX512_BF16's vdpbf16ps where the CPU has it (single rows of W in
    steps of 128 and 32 channels; 2-8 rows of x over groups of 4 rows of W in steps of 64 and 32;
    the scalar tails), else x widened and the float32-x path; float64 is the oracle."""
    with _row_kernel_path(path):
        gen = torch.Generator().manual_seed(k + n)
        w = (torch.randn(n, k, generator=gen) * torch.linspace(0.01, 3, n)[:, None]).bfloat16()
        x = torch.randn(rows, k, generator=gen).bfloat16()
        got = torch.ops.llmkit_cpu.gemv.default(x, w)
    _assert_float32_sums(got, x, w)


def test_gemv_kernel_refuses_operands_it_cannot_read_with_what_is_wrong() -> None:
    assert kernels.ready()
    op = torch.ops.llmkit_cpu.gemv.default
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="gemv: x must be a contiguous 2-d CPU float32 or bfloat16 tensor"):
        op(x.half(), w)
    with pytest.raises(RuntimeError, match=r"gemv: w must be a contiguous 2-d CPU bfloat16 \(as x is\) tensor"):
        op(x.bfloat16(), w)
    with pytest.raises(RuntimeError, match="gemv: w must be a contiguous 2-d CPU float32 or bfloat16 tensor"):
        op(x, w.half())
    with pytest.raises(RuntimeError, match="gemv: w must be a contiguous 2-d CPU float32 or bfloat16 tensor"):
        op(x, torch.randn(16, 8).T)
    with pytest.raises(RuntimeError, match=r"gemv: shapes x \[M, K\], w \[N, K\] expected, got K=16, w \[8, 12\]"):
        op(x, torch.randn(8, 12))


MOE_DECODE = {"d_model": 40, "n_experts": 8, "top_k": 2, "hidden": 72}  # 40, 72: whole steps, split blocks, tails
@pytest.mark.parametrize("path", ROW_KERNEL_PATHS)
@pytest.mark.parametrize("extra", [
    {}, {"renormalize": "none", "activation": "gelu_tanh"},
    {"scoring": "sigmoid", "correction_bias": True, "n_group": 4, "topk_group": 2, "routed_scaling": 2.5},
    {"gated": False, "expert_bias": True, "activation": "relu"},
    {"expert_bias": True, "activation": "gelu", "top_k": 3}, {"capacity_factor": 0.5},
], ids=lambda e: ",".join(e) or "mixtral")
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 9, 16])
def test_moe_decode_kernel_is_the_layer_against_float64(path, extra, tokens, monkeypatch) -> None:
    """A few tokens: the whole layer is one `llmkit_cpu::moe_decode` call, which routes as the
    float64 reference (no near-ties here), with its weights and counts, and whose output passes the
    precision rule; logits are float32 sums and scores their softmax or sigmoid. 9 and 16 tokens:
    experts with more rows of x than one pass of the row kernels takes."""
    calls = []
    monkeypatch.setattr(cpu_moe, "_decode", lambda *a: calls.append(1) or _decode(*a))
    monkeypatch.setattr(cpu_moe, "decode_max_tokens", lambda dtype: 16)
    with _row_kernel_path(path) as dtype:
        exact, naive, under = _blocks("moe", {**MOE_DECODE, **extra}, dtype, "grouped", seed=tokens)
        if "correction_bias" in extra:
            for b in (exact, naive, under):
                b.correction_bias.copy_(0.3 * torch.randn(8, generator=torch.Generator().manual_seed(9)))
        x = torch.randn(1, tokens, 40, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        with torch.no_grad():
            got, nv, ex = under(x), naive(x), exact(x.double())
    assert calls == [1]
    r, want = under.routing, exact.routing
    assert torch.equal(r.selected, want.selected) and torch.equal(r.tokens_per_expert, want.tokens_per_expert)
    assert r.dropped == want.dropped and (r.dropped > 0 or "capacity_factor" not in extra or tokens < 4)
    torch.testing.assert_close(r.weights.double(), want.weights, rtol=1e-5, atol=1e-6)
    _check(got, nv, ex, dtype)
    logits, scores = _decode(under, x.reshape(-1, 40), None)[1:3]
    _assert_float32_sums(logits, x.reshape(-1, 40), under.router)
    want_scores = logits.double().softmax(-1) if "scoring" not in extra else logits.double().sigmoid()
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-6, atol=1e-7)


_decode = cpu_moe._decode
_experts_together = cpu_moe._experts_together


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extra", [{}, {"capacity_factor": 0.5}, {"load_balance_coef": 0.01, "z_loss_coef": 0.001},
                                   {"seq_balance_coef": 0.1, "capacity_factor": 0.5}], ids=lambda e: ",".join(e) or "none")
def test_moe_decode_sets_record_routings_statistics(dtype, extra, monkeypatch) -> None:
    """The routing statistics of a moe_decode call (set from its outputs where no loss has a
    coefficient, else by the catalogue's record_routing) are record_routing's on the same routing:
    every field, exactly."""
    calls = []
    monkeypatch.setattr(cpu_moe, "_decode", lambda *a: calls.append(1) or _decode(*a))
    monkeypatch.setattr(cpu_moe, "decode_max_tokens", lambda dtype: 16)
    under = _blocks("moe", {**MOE_DECODE, **extra}, dtype, "grouped", seed=5)[2]
    x = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(5)).to(dtype)
    capacity = None if "capacity_factor" not in extra else 1  # ceil(0.5 * 6 tokens * top-2 / 8 experts)
    with torch.no_grad():
        under(x)
        got = under.routing
        logits, scores = _decode(under, x.reshape(-1, 40), capacity)[1:3]
        moe_blocks.record_routing(under, x, logits, scores, got.selected, got.weights, capacity, got.tokens_per_expert)
    want = under.routing
    assert calls == [1]
    assert (got.dropped > 0) == (capacity is not None) and got.imbalance > 1.0
    assert torch.equal(got.selected, want.selected) and torch.equal(got.weights, want.weights)
    assert torch.equal(got.tokens_per_expert, want.tokens_per_expert)
    assert (got.dropped, got.imbalance) == (want.dropped, want.imbalance)
    assert got.aux_loss.dtype == want.aux_loss.dtype == torch.float32 and torch.equal(got.aux_loss, want.aux_loss)
    assert list(got.losses) == list(want.losses) == [k.removesuffix("_coef") for k in extra if k.endswith("_coef")]
    assert all(torch.equal(got.losses[k], want.losses[k]) for k in want.losses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ties", ["zero router", "equal rows"])
def test_moe_decode_kernel_leaves_exact_ties_to_pytorchs_topk(dtype, ties, monkeypatch) -> None:
    """Where an exact tie decides a pick, moe_decode says so and the call is routed by the
    catalogue's code (PyTorch's topk), so decode routes as prefill does: the same choices as the
    PyTorch path, and its output."""
    exact, naive, under = _blocks("moe", MOE_DECODE, dtype, "grouped")
    with torch.no_grad():
        for b in (naive, under):
            if ties == "zero router":
                b.router.zero_()
            else:
                b.router[1:] = b.router[1].clone()  # seven equal experts: every top-2 ties
    x = torch.randn(1, 3, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    tied = []
    monkeypatch.setattr(cpu_moe, "_decode", lambda *a: tied.append(bool((r := _decode(*a))[6][0])) or r)
    with torch.no_grad():
        got, want = under(x), naive(x)
    assert tied == [True]
    assert torch.equal(under.routing.selected, naive.routing.selected)
    torch.testing.assert_close(got, want)  # the experts' products are the GEMV kernel's there


@pytest.mark.parametrize("capability, native, limits", [("AVX512", True, (512, 64)), ("AVX512", False, (512, 4)),
                                                       ("AVX2", False, (4, 4))])
def test_moe_decode_takes_more_tokens_where_the_row_kernels_take_several_rows(capability, native, limits,
                                                                             monkeypatch) -> None:
    """moe_decode's token limit: DECODE_MAX_TOKENS where the row kernels take several rows of x in
    one pass (float32: AVX-512F; bfloat16: vdpbf16ps), GEMV_MAX_ROWS elsewhere, as `llmkit info`
    lists it; a call at the limit takes the kernel, one token more the grouped path."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(quant, "WIDEN_BF16", not native)
    cpu_moe.decode_max_tokens.cache_clear()
    try:
        assert (cpu_moe.decode_max_tokens(torch.float32), cpu_moe.decode_max_tokens(torch.bfloat16)) == limits
        facts = REG.backend("cpu").device_facts("cpu")
        assert facts["moe_decode_tokens"] == [f"float32 <= {limits[0]}", f"bfloat16 <= {limits[1]}"]
        calls = []
        monkeypatch.setattr(cpu_moe, "_decode", lambda *a: calls.append(a[1].shape[0]) or _decode(*a))
        under = _blocks("moe", MOE_DECODE, torch.float32, "grouped")[2]
        with torch.no_grad():
            for n in (limits[0], limits[0] + 1):
                under(torch.randn(1, n, 40, generator=torch.Generator().manual_seed(n)))
        assert calls == [limits[0]]
    finally:
        cpu_moe.decode_max_tokens.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moe_decode_kernel_does_not_depend_on_the_thread_count(dtype) -> None:
    """Each output value is summed by one thread in expert order: 1 and 2 threads agree bitwise."""
    under = _blocks("moe", {**MOE_DECODE, "d_model": 1024, "hidden": 1000}, dtype, "grouped")[2]
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(3)).to(dtype)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(_decode(under, x, None))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("path", ROW_KERNEL_PATHS)
def test_moe_decode_kernel_with_four_tokens_on_the_same_two_experts(path) -> None:
    """Four equal tokens: each of their two experts multiplies four rows of x (with AVX-512, the
    row kernels' groups of 4 rows of W, their channel steps and the rows after the last group),
    against float64 under the precision rule."""
    with _row_kernel_path(path) as dtype:
        exact, naive, under = _blocks("moe", {**MOE_DECODE, "d_model": 240, "hidden": 138}, dtype, "grouped")
        x = torch.randn(1, 1, 240, generator=torch.Generator().manual_seed(5)).repeat(1, 4, 1).to(dtype)
        with torch.no_grad():
            got, nv, ex = under(x), naive(x), exact(x.double())
    assert sorted(under.routing.tokens_per_expert.tolist())[-2:] == [4, 4]
    _check(got, nv, ex, dtype)


def test_moe_decode_kernel_refuses_operands_it_cannot_read_with_what_is_wrong() -> None:
    assert kernels.ready()
    under = _blocks("moe", MOE_DECODE, torch.float32, "grouped")[2]
    none = torch.empty(0)
    x = torch.randn(2, 40)
    args = [x, under.router, none, under.w_gate, under.w_up, under.w_down, none, none, none, 2, 0, 0, 0, 1, 1.0, -1, 0]

    def call(**change: Any) -> None:
        names = ["x", "router", "correction_bias", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down", "top_k",
                 "scoring", "n_group", "topk_group", "renormalize", "routed_scaling", "capacity", "activation"]
        torch.ops.llmkit_cpu.moe_decode.default(*[change.get(n, a) for n, a in zip(names, args)])

    with pytest.raises(RuntimeError, match="moe_decode: x must be a contiguous 2-d CPU float32 or bfloat16 tensor"):
        call(x=x.half())
    with pytest.raises(RuntimeError, match=r"moe_decode: w_up must be a contiguous 3-d CPU bfloat16 \(as x is\)"):
        call(x=x.bfloat16(), router=under.router.bfloat16(), w_gate=under.w_gate.bfloat16(),
             w_down=under.w_down.bfloat16())
    with pytest.raises(RuntimeError, match=r"moe_decode: w_down must have shape \[8, 40, 72\], got \[8, 72, 40\]"):
        call(w_down=under.w_down.transpose(1, 2).contiguous())
    with pytest.raises(RuntimeError, match=r"moe_decode: b_up must have shape \[8, 72\] \(or be empty: absent\)"):
        call(b_up=torch.zeros(8, 40))
    with pytest.raises(RuntimeError, match=r"moe_decode: correction_bias must be a contiguous 1-d CPU float32"):
        call(correction_bias=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"moe_decode: options out of range: top_k 9 \(1..8\)"):
        call(top_k=9)
    with pytest.raises(RuntimeError, match=r"n_group 3 / topk_group 1 \(0 / 0, or groups of >= 2 experts\)"):
        call(n_group=3, topk_group=1)
    with pytest.raises(RuntimeError, match=r"activation 4 \(0 silu, 1 gelu, 2 gelu_tanh, 3 relu\)"):
        call(activation=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extra", [
    {}, {"activation": "gelu_tanh", "expert_bias": True}, {"activation": "gelu", "expert_bias": True},
    {"gated": False, "expert_bias": True, "activation": "relu"},
], ids=lambda e: ",".join(e) or "mixtral")
def test_moe_experts_kernel_is_each_expert_against_float64(dtype, extra) -> None:
    """`llmkit_cpu::moe_experts`: each group of rows through its expert (any order of experts, an
    empty group, one row, groups split over the threads), under the precision rule against the
    float64 expert and beside the catalogue's expert in the same dtype."""
    exact, naive, under = _blocks("moe", {**MOE_DECODE, **extra}, dtype, "grouped", seed=7)
    experts, counts = [5, 0, 2, 7, 3], [9, 1, 0, 17, 6]
    x = torch.randn(sum(counts), 40, generator=torch.Generator().manual_seed(8)).to(dtype)
    c = under.config
    none = torch.empty(0)
    with torch.no_grad():
        got = torch.ops.llmkit_cpu.moe_experts.default(
            x, torch.tensor(experts), torch.tensor(counts), under.w_gate if c.gated else none, under.w_up,
            under.w_down, under.b_gate if c.gated and c.expert_bias else none,
            under.b_up if c.expert_bias else none, under.b_down if c.expert_bias else none,
            cpu_moe._ACTIVATION[c.activation])
        assert got.dtype == dtype and got.shape == x.shape
        start = 0
        for e, n in zip(experts, counts):
            rows = slice(start, start + n)
            if n:
                _check(got[rows], moe_blocks.expert(naive, e, x[rows]),
                       moe_blocks.expert(exact, e, x[rows].double()), dtype)
            start += n


def test_moe_experts_kernel_refuses_operands_it_cannot_read_with_what_is_wrong() -> None:
    assert kernels.ready()
    under = _blocks("moe", MOE_DECODE, torch.float32, "grouped")[2]
    none = torch.empty(0)
    args = [torch.randn(5, 40), torch.tensor([1, 4]), torch.tensor([2, 3]), under.w_gate, under.w_up, under.w_down,
            none, none, none, 0]

    def call(**change: Any) -> None:
        names = ["x", "experts", "counts", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down", "activation"]
        torch.ops.llmkit_cpu.moe_experts.default(*[change.get(n, a) for n, a in zip(names, args)])

    with pytest.raises(RuntimeError, match="moe_experts: x must be a contiguous 2-d CPU float32 or bfloat16 tensor"):
        call(x=args[0].double())
    with pytest.raises(RuntimeError, match=r"moe_experts: w_down must be a contiguous 3-d CPU bfloat16 \(as x is\)"):
        call(x=args[0].bfloat16(), w_gate=under.w_gate.bfloat16(), w_up=under.w_up.bfloat16())
    with pytest.raises(RuntimeError, match=r"moe_experts: counts must have shape \[2\], got \[3\]"):
        call(counts=torch.tensor([1, 2, 2]))
    with pytest.raises(RuntimeError, match=r"experts\[1\] = 8 \(0..7\) with counts\[1\] = 3 \(>= 0\) expected"):
        call(experts=torch.tensor([1, 8]))
    with pytest.raises(RuntimeError, match=r"the counts must sum to x's 5 rows \(they sum to 4\)"):
        call(counts=torch.tensor([2, 2]))
    with pytest.raises(RuntimeError, match=r"b_up must have shape \[8, 72\] \(or be empty: absent\)"):
        call(b_up=torch.zeros(8, 40))
    with pytest.raises(RuntimeError, match="activation 4 must be 0 silu, 1 gelu, 2 gelu_tanh or 3 relu"):
        call(activation=4)


@pytest.mark.parametrize("threads, counts, together", [
    (2, [130, 120, 140, 4, 0, 125, 110, 5], [2, 0, 5, 1, 6, 7]),  # 4 rows: the GEMV kernel's
    (2, [600, 10, 12, 30, 0, 0, 0, 0], [3, 2, 1]),  # 600 rows on both threads; 30 of 52 left: kept
    (2, [300, 290, 10, 0, 0, 0, 0, 0], [0, 1, 2]),
    (4, [300, 100, 100, 100, 100, 100, 0, 0], [1, 2, 3, 4, 5]),
    (4, [300, 290, 100, 0, 0, 0, 0, 0], []),  # each in turn more than 1.2 shares of what is left
    (1, [600, 10, 12, 30, 0, 0, 0, 0], [0, 3, 2, 1]),
])
def test_moe_prefill_spreads_the_experts_over_the_threads_unless_one_outweighs_a_share(threads, counts,
                                                                                     together) -> None:
    slices, start = [], 0
    for e, n in enumerate(counts):
        if n:
            slices.append((e, start, start + n))
        start += n
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chosen = cpu_moe._together(torch.empty(1, 32), slices)
    finally:
        torch.set_num_threads(before)
    assert [e for e, _, _ in chosen] == together


def test_moe_grouped_takes_pytorch_gemms_where_the_kernels_cannot_be_built(monkeypatch) -> None:
    """No C++ compiler: the experts run F.linear, with the same routing and output."""
    with_kernel = _blocks("moe", MOE, torch.float32, "grouped")[2]
    monkeypatch.setenv("CXX", "no-such-cxx")
    without = _blocks("moe", MOE, torch.float32, "grouped")[2]
    assert with_kernel._cpu_gemv and not without._cpu_gemv
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(with_kernel(x), without(x), rtol=1e-6, atol=1e-6)


def test_moe_ties_at_the_top_k_boundary() -> None:
    """Identical router rows for experts 1 and 2: both impls pick the same one (the same topk)."""
    exact, naive, under = _blocks("moe", MOE, torch.float32, "grouped")
    with torch.no_grad():
        for b in (exact, naive, under):
            b.router[2] = b.router[1]
        x = torch.randn(40, 32, generator=torch.Generator().manual_seed(5))
        _check(under(x), naive(x), exact(x.double()), torch.float32)
    assert torch.equal(under.routing.selected, naive.routing.selected)


@settings(max_examples=25, deadline=None)
@given(n_experts=st.sampled_from([2, 4, 6, 8]), top_k=st.integers(1, 2), tokens=st.integers(0, 9),
       seed=st.integers(0, 2**16))
def test_moe_grouped_equals_reference_property(n_experts, top_k, tokens, seed) -> None:
    config = {"d_model": 16, "n_experts": n_experts, "top_k": top_k, "hidden": 8}
    exact, naive, under = _blocks("moe", config, torch.float32, "grouped", seed=seed)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(under(x), naive(x), rtol=1e-5, atol=1e-6)
    assert under.routing.tokens_per_expert.sum() == tokens * top_k


# ---------------------------------------------------------------- RoPE


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope", [
    {"theta": 10000.0}, {"theta": 5e5, "layout": "interleaved", "partial": 0.5},
    {"scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16}},
    {"scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 16}},
], ids=lambda r: ",".join(r))
def test_rope_cached(dtype, rope) -> None:
    blocks = _blocks("rope", {"head_dim": 16, **rope}, dtype, "cached")
    x = torch.randn(2, 3, 9, 16).to(dtype)
    _run(blocks, x, torch.arange(2**16 - 4, 2**16 + 5).expand(2, -1))
    # the same buffer rewritten in place with other positions must not reuse the old tables
    pos = torch.arange(9).expand(2, -1).clone()
    under, naive = blocks[2], blocks[1]
    first = under(x, pos)
    pos += 100
    assert not torch.equal(under(x, pos), first)
    torch.testing.assert_close(under(x, pos), naive(x, pos))


def test_rope_refuses_dynamic_scaling_with_a_reason() -> None:
    cfg = REG.kind("rope").config(head_dim=16, scaling={"type": "dynamic", "factor": 2.0,
                                                        "original_max_position_embeddings": 8})
    reasons = REG.impl("rope@1", "cpu.cached").reasons(cfg, frozenset(), REG.target("cpu", dtype=torch.float32))
    assert any("dynamic NTK" in r for r in reasons)


# ---------------------------------------------------------------- whole models


@pytest.mark.parametrize("preset", ["tiny-llama-3-8b", "tiny-grok-1", "tiny-mixtral-8x7b", "tiny-dbrx",
                                    "tiny-mistral-7b-v0.1", "tiny-qwen1.5-moe-a2.7b"])
def test_models_on_cpu_match_the_reference_backend(preset) -> None:
    ref = llmkit.build(preset, dtype="float32", policy="reference")
    with pytest.warns(llmkit.errors.FallbackWarning):  # norms, MLPs, embedding, head stay reference
        cpu = llmkit.build(preset, dtype="float32")
    cpu.load_state_dict(ref.state_dict())
    used = {e.resolution.impl.qualname for e in cpu.plan.entries}
    assert {"cpu.cached"} <= used and used & {"cpu.sdpa", "cpu.flash"}
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(cpu(ids), ref(ids), rtol=1e-4, atol=1e-4)
        assert torch.equal(cpu.generate(ids[:, :8], max_new_tokens=12), ref.generate(ids[:, :8], max_new_tokens=12))


# ---------------------------------------------------------------- norm, MLP, head


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [
    {"type": "rms", "eps": 1e-5}, {"type": "rms", "unit_offset": True, "cast": "after_weight"},
    {"type": "layer", "bias": True}, {"type": "layer", "cast": "before_weight"},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_norm_fused(dtype, config) -> None:
    blocks = _blocks("norm", {"dim": 48, **config}, dtype, "fused")
    for b in blocks:  # weights around 1 (or 0 for 1 + w), as trained norms are
        with torch.no_grad():
            b.weight.add_(0.0 if config.get("unit_offset") else 1.0)
    _run(blocks, (3 * torch.randn(2, 5, 48) + 1).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [{"gated": True, "activation": "silu"},
                                    {"gated": False, "activation": "gelu", "bias": True}],
                         ids=["swiglu", "gelu_bias"])
def test_mlp_unquantised_is_the_reference(dtype, config) -> None:
    _run(_blocks("mlp", {"d_model": 32, "hidden": 64, **config}, dtype, "linear"), torch.randn(2, 7, 32).to(dtype))


@pytest.mark.parametrize("widen", [True, False])
def test_prefill_sized_bfloat16_products_widened_to_float32_meet_the_precision_rule(monkeypatch, widen) -> None:
    """Without bf16 instructions (`WIDEN_BF16`), a bfloat16 MLP, tied head or MoE at prefill size multiplies in
    float32 and rounds each product once to bfloat16; either way the precision rule holds."""
    monkeypatch.setattr(quant, "WIDEN_BF16", widen)
    calls = []
    wide_linear = quant.wide_linear
    monkeypatch.setattr(quant, "wide_linear", lambda *a: calls.append(1) or wide_linear(*a))
    x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(3)).bfloat16()  # 40 rows: not decode
    exact, naive, under = _blocks("mlp", {"d_model": 32, "hidden": 64, "gated": True, "activation": "silu"},
                                  torch.bfloat16, "linear")
    with torch.no_grad():
        got = under(x)
        _check(got, naive(x), exact(x.double()), torch.bfloat16)
        wide = [F.linear(v.float(), w.float()).bfloat16() for v, w in ((x, under.w_gate), (x, under.w_up))]
        want = F.linear((F.silu(wide[0]) * wide[1]).float(), under.w_down.float()).bfloat16()
    assert torch.equal(got, want) and len(calls) == (3 if widen else 0)
    exact, naive, under = _blocks("head", {"d_model": 32, "vocab_size": 50, "tied": True}, torch.bfloat16, "linear")
    tied = 0.3 * torch.randn(50, 32, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.no_grad():  # a tied head's matrix arrives with the call: the same widening
        got = under(x, tied)
        _check(got, naive(x, tied), exact(x.double(), tied.double()), torch.bfloat16)
    assert torch.equal(got, F.linear(x.float(), tied.float()).bfloat16()) and len(calls) == (4 if widen else 0)
    exact, naive, under = _blocks("moe", MOE, torch.bfloat16, "grouped")
    x = torch.randn(4, 40, 32, generator=torch.Generator().manual_seed(4)).bfloat16()  # ~40 tokens an expert
    with torch.no_grad():
        _check(under(x), naive(x), exact(x.double()), torch.bfloat16)
    assert (len(calls) > 4) == widen  # the experts with more than 16 tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind, config", [
    ("mlp", {"d_model": 200, "hidden": 360, "activation": "silu", "bias": True}),
    ("mlp", {"d_model": 64, "hidden": 512, "activation": "silu"}),
    ("mlp", {"d_model": 200, "hidden": 360, "gated": False, "activation": "gelu"}),
    ("head", {"d_model": 200, "vocab_size": 500, "bias": True}), ("head", {"d_model": 200, "vocab_size": 500, "tied": True}),
    ("head", {"d_model": 40, "vocab_size": 50}),
], ids=["mlp-gated", "mlp-32k", "mlp", "head", "head-tied", "head-small"])
def test_decode_sized_products_take_the_gemv_kernel(dtype, kind, config, monkeypatch) -> None:
    """Unpacked float32 / bfloat16 weights of GEMV_MIN_WEIGHTS or more, at most GEMV_MAX_ROWS rows,
    no autograd: every product is the GEMV kernel's, within the precision rule; more rows,
    autograd or a small weight take F.linear."""
    exact, naive, under = _blocks(kind, config, dtype, "linear")
    assert under._cpu_gemv
    calls = []
    real = quant.gemv_linear
    monkeypatch.setattr(quant, "gemv_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    d = config["d_model"]
    tied = 0.3 * torch.randn(500, d, generator=torch.Generator().manual_seed(5)) if config.get("tied") else None
    args = () if kind == "mlp" else (None if tied is None else tied.to(dtype),)
    want = () if kind == "mlp" else (None if tied is None else tied.to(dtype).double(),)
    for rows, grad, used in ((1, False, True), (4, False, True), (5, False, False), (2, True, False)):
        x = torch.randn(1, rows, d, generator=torch.Generator().manual_seed(rows)).to(dtype)
        calls.clear()
        with torch.set_grad_enabled(grad):
            got = under(x, *args)
        with torch.no_grad():
            _check(got.detach(), naive(x, *args), exact(x.double(), *want), dtype)
        used = used and d * config.get("hidden", config.get("vocab_size")) >= quant.GEMV_MIN_WEIGHTS[dtype]
        assert bool(calls) == used and len(calls) in ((3 if config.get("gated", True) else 2) if kind == "mlp" else 1, 0)


@pytest.mark.parametrize("kind, impl, config", [("mlp", "linear", {"d_model": 64, "hidden": 1024}),
                                                 ("moe", "grouped", {**MOE, "hidden": 2048})], ids=["mlp", "moe"])
def test_a_block_converted_to_float64_after_binding_leaves_the_float32_kernels(kind, impl, config) -> None:
    """Bound in float32 (its products prepared for the kernels), then `.double()` (as an oracle copy
    of a model is made): every token count runs PyTorch's float64 products instead of handing
    float64 operands to a float32 kernel."""
    exact, _, under = _blocks(kind, config, torch.float32, impl)
    assert under._cpu_gemv
    under.double()
    for tokens in (1, 3, 64):
        x = torch.randn(2, tokens, config["d_model"], generator=torch.Generator().manual_seed(tokens)).double()
        with torch.no_grad():
            torch.testing.assert_close(under(x), exact(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [{"tied": False, "bias": True, "softcap": 3.0}, {"tied": True, "multiplier": 0.5}],
                         ids=["untied", "tied"])
def test_head_unquantised_is_the_reference(dtype, config) -> None:
    exact, naive, under = _blocks("head", {"d_model": 32, "vocab_size": 50, **config}, dtype, "linear")
    x = torch.randn(2, 3, 32).to(dtype)
    tied = 0.3 * torch.randn(50, 32).to(dtype) if config["tied"] else None
    with torch.no_grad():
        _check(under(x, tied), naive(x, tied), exact(x.double(), None if tied is None else tied.double()), dtype)


# ---------------------------------------------------------------- packed (quantised) linears
MODES = ["int8", "int4", "w4a8", "fp16"]
WEIGHT_ONLY = ["int8", "int4", "fp16"]  # w4a8 rounds the activations too: tested on its own below


def _dequantised(entry: quant.Packed, in_features: int) -> torch.Tensor:
    """What the kernel multiplies by, read back through it: x = I gives dequant(W)^T."""
    dtype = torch.float32 if entry.scales is None else entry.scales.dtype
    return quant.matmul(entry, torch.eye(in_features, dtype=dtype)).T.float()


@pytest.mark.parametrize("mode", MODES)
def test_quantised_weights_are_within_half_a_step(mode) -> None:
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 96)[:, None]
    entry = quant.pack(w, mode, torch.float32)
    err = (_dequantised(entry, 128) - w).abs()
    if mode == "int8":
        step = w.abs().amax(1, keepdim=True) / 127
    elif mode in ("int4", "w4a8"):  # x = I passes w4a8's activation rounding exactly
        g = w.view(96, -1, quant.GROUP)
        step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(quant.GROUP, dim=1)
    else:  # half's spacing at |w| (normal range): 2^(floor(log2|w|) - 10)
        step = torch.exp2(torch.floor(torch.log2(w.abs())) - 10)
    assert (err <= step / 2 + 1e-6 * w.abs().max()).all()
    assert err.max() > 0  # it is quantised


@pytest.mark.parametrize("mode", WEIGHT_ONLY)
@pytest.mark.parametrize("preset", ["tiny-smollm2-135m", "tiny-qwen1.5-0.5b"])
def test_quantised_model_equals_the_model_with_dequantised_weights(mode, preset) -> None:
    """At decode sizes the packed kernels compute x @ dequant(W)^T: a model carrying those
    dequantised weights in float32, on the reference impls, gives the same logits. At prefill
    sizes the float weights are used: the unquantised model's logits. q/k/v and gate/up are packed
    as one matrix each (one GEMM at decode): their rows are split back here."""
    with pytest.warns(llmkit.errors.FallbackWarning):
        model = llmkit.build(preset, dtype="float32", quant=mode, seed=3)
    twin = llmkit.build(preset, dtype="float32", policy="reference", seed=3)
    long_ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(long_ids), twin(long_ids), rtol=1e-5, atol=1e-5)
    state = twin.state_dict()
    groups = set()
    for name, m in model.named_modules():
        for key, entry in getattr(m, "_cpu_quant", {}).items():
            names = key.split("+")
            groups.add(tuple(names))
            rows = [getattr(m, n).shape[0] for n in names]
            for n, w in zip(names, _dequantised(entry, getattr(m, names[0]).shape[1]).split(rows)):
                state[f"{name}.{n}"] = w
    assert {("wq", "wk", "wv"), ("w_gate", "w_up"), ("wo",), ("w_down",)} <= groups
    tied = model.spec.tied
    if tied:  # the tied head packs the embedding at its first call
        ids = torch.zeros(1, 1, dtype=torch.long)
        model(ids)
        state["embedding.weight"] = model.embedding.weight.detach().clone()
        twin_head = _dequantised(model.head._cpu_tied[1], model.spec.d_model)
    twin.load_state_dict(state)
    ids = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(1))  # 16 rows: packed
    with torch.no_grad():
        want = twin(ids) if not tied else _finish_with(twin, ids, twin_head)
        torch.testing.assert_close(model(ids), want, rtol=1e-4, atol=1e-4)
    assert {m.quantized for m in model.modules() if getattr(m, "quantized", None)} == {mode}


def _int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as w4a8 rounds it, as float64: per block of 32, e = max|x| / 127, x ~ e round(x (127 / max|x|)),
    with e, 127 / max|x| and the product in float32 as the kernel has them (bfloat16 inputs land
    on ties often: rounding x / e in float64 instead would move some by one step)."""
    g = x.float().view(x.shape[0], -1, quant.GROUP)
    amax = g.abs().amax(-1, keepdim=True)
    # full_like: `127 / amax` would be computed as 127 * (1 / amax), rounded twice
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    return (torch.round(g * inv).double() * (amax / 127).double()).view(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, k, n", [(1, 32, 1), (3, 96, 33), (16, 576, 300), (5, 1536, 17)])
def test_w4a8_multiplies_the_dequantised_weights_by_int8_blocks_of_the_activations(rows, k, n, dtype) -> None:
    """The kernel against its formula in float64: dequant(W) unpacked here from the tiles of 8 rows
    (n not a multiple of 8: the last tile padded), d and m, activations rounded per block of 32
    (one block all zero, one with an outlier). A bfloat16 model's activations are upcast exactly,
    the output rounded once to bfloat16."""
    gen = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.01, 1, n)[:, None]
    x = torch.randn(rows, k, generator=gen)
    x[0, :32] = 0
    x[-1, -1] = 50.0
    x = x.to(dtype)
    entry = quant.pack(w, "w4a8", dtype)
    tiles = -(-n // 8)
    # byte [t, g, h, r, i]: q[8t + r, g, 8h + i] low, q[8t + r, g, 8h + 4 + i] high (w4a8.c)
    b = entry.weight.view(tiles, k // quant.GROUP, 4, 8, 4).long().permute(0, 3, 1, 2, 4)
    q = torch.stack([b & 15, b >> 4], dim=-2).reshape(8 * tiles, k // quant.GROUP, quant.GROUP)
    d, m = entry.scales.double().permute(2, 0, 3, 1).reshape(2, 8 * tiles, k // quant.GROUP)
    assert not q[n:].any() and not d[n:].any() and not m[n:].any()  # padding rows are zero
    q, d, m = q[:n], d[:n], m[:n]
    dequant = (d[..., None] * q + m[..., None]).view(n, k)
    assert (dequant - w).abs().max() <= d.max() / 2 + 1e-6  # and through the kernel: test above
    want = _int8_blocks(x) @ dequant.T
    got = quant.matmul(entry, x)
    assert got.dtype == dtype
    bound = 1e-6 * (_int8_blocks(x).abs() @ dequant.abs().T)  # float32 sums
    if dtype == torch.bfloat16:
        bound = bound + want.abs() * 2.0**-8  # round to nearest, 8 significant bits
    assert ((got.double() - want).abs() <= bound + 1e-30).all()
    assert (got - x.double() @ w.double().T).abs().max() > 0  # it is quantised


@settings(max_examples=25, deadline=None)
@given(st.integers(-20, 20), st.integers(0, 2**16))
def test_w4a8_commutes_with_a_power_of_two_scale_of_the_activations(exponent, seed) -> None:
    """Block scales are max|x| / 127: x * 2^j rounds to the same int8 values with scales * 2^j,
    so the output scales by exactly 2^j (no float rounding differs)."""
    gen = torch.Generator().manual_seed(seed)
    entry = quant.pack(torch.randn(24, 64, generator=gen), "w4a8", torch.float32)
    x = torch.randn(2, 64, generator=gen)
    assert torch.equal(quant.matmul(entry, x * 2.0**exponent), quant.matmul(entry, x) * 2.0**exponent)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, k, n", [(1, 1, 1), (3, 33, 9), (16, 576, 300), (5, 1538, 17)])
def test_fp16_multiplies_the_half_rounded_weights_in_float32(rows, k, n, dtype) -> None:
    """The kernel against its formula in float64: W rounded to half, read back from the tiles of 8
    rows (n not a multiple of 8: the last tile padded with zero rows; k not a multiple of 4: the
    kernel's tail loop), times x exactly; the only other error is float32's in the sums."""
    gen = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.01, 3, n)[:, None]
    x = torch.randn(rows, k, generator=gen).to(dtype)
    entry = quant.pack(w, "fp16", dtype)
    tiles = -(-n // 8)
    assert entry.weight.shape == (tiles, k, 8) and entry.weight.dtype == torch.float16
    unpacked = entry.weight.transpose(1, 2).reshape(8 * tiles, k).double()  # [t, k, r] = W[8t + r, k]
    assert not unpacked[n:].any()
    assert torch.equal(unpacked[:n], w.half().double())
    want = x.double() @ unpacked[:n].T
    got = quant.matmul(entry, x)
    assert got.dtype == dtype and got.shape == (rows, n)
    bound = k * 2.0**-23 * (x.double().abs() @ unpacked[:n].abs().T)  # float32 sums of k products
    if dtype == torch.bfloat16:
        bound = bound + want.abs() * 2.0**-8
    assert ((got.double() - want).abs() <= bound + 1e-30).all()


def test_fp16_refuses_weights_beyond_half_precision() -> None:
    w = torch.ones(8, 32)
    w[3, 5] = -7e4
    with pytest.raises(llmkit.errors.LlmkitError, match=r"quant fp16: a weight of magnitude 70000 is beyond "
                                                        r"half precision's range \(max 65504\)"):
        quant.pack(w, "fp16", torch.float32)
    w[3, 5] = -65504.0  # half's largest finite value is kept
    assert quant.pack(w, "fp16", torch.float32).weight.isfinite().all()


def test_fp16_packing_in_a_bfloat16_block_meets_the_precision_rule() -> None:
    """bf16 weights are exact in half precision, so an fp16-packed bfloat16 MLP (activations
    upcast to float32 around each GEMM) meets the precision rule against the float64 reference."""
    exact, naive, under = _blocks("mlp", {"d_model": 64, "hidden": 96, "gated": True, "activation": "silu"},
                                  torch.bfloat16, "linear")
    under.bind(under.impl, REG.target("cpu", dtype=torch.bfloat16, quant="fp16"))
    assert under.quantized == "fp16"
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        _check(under(x), naive(x), exact(x.double()), torch.bfloat16)


def test_a_mode_the_backend_lacks_is_refused_by_name() -> None:
    with pytest.raises(llmkit.errors.LlmkitError,
                       match=r"quant 'int2' is not supported by the cpu backend \(int8, int4, w4a8, fp16\)"):
        llmkit.build("tiny-smollm2-135m", dtype="float32", quant="int2")


@pytest.mark.parametrize("mode", ["w4a8", "fp16"])
@pytest.mark.parametrize("cxx, capability, reason", [
    ("no-such-cxx", "AVX2", "quant {mode} builds its kernel with a C\\+\\+ compiler at first use; 'no-such-cxx' was not found"),
    ("false", "AVX2", "quant {mode}: building its kernel with .*false failed"),
    (None, "DEFAULT", r"quant {mode} needs an x86 CPU with AVX2 and FMA \(PyTorch reports DEFAULT\)"),
])
def test_a_kernel_mode_without_its_kernel_is_refused_with_the_reason(monkeypatch, tmp_path, mode, cxx, capability,
                                                                      reason) -> None:
    reason = reason.format(mode=mode)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built yet
    if cxx is not None:
        monkeypatch.setenv("CXX", cxx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    kernels._library.cache_clear()
    try:
        # `llmkit info` (the backend's facts) names what is missing without building; a compiler
        # that exists but fails shows only when the build is tried
        modes = REG.backend("cpu").device_facts("cpu")["quant_modes"]
        listed = mode if cxx == "false" else next(m for m in modes if m.startswith(f"{mode}: "))
        assert listed in modes and (cxx == "false" or re.search(reason, listed))
        with pytest.raises(llmkit.errors.LlmkitError, match=reason):
            llmkit.build("tiny-smollm2-135m", dtype="float32", quant=mode)
        assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))
    finally:
        kernels._library.cache_clear()


def test_the_kernels_are_built_once_into_the_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels._library.cache_clear()
    try:
        assert kernels.unavailable("w4a8") is None
        (built,) = tmp_path.glob("llmkit/cpu-kernels/kernels-*.so")
        stamp = built.stat().st_mtime_ns
        kernels._library.cache_clear()
        assert kernels.unavailable("fp16") is None and built.stat().st_mtime_ns == stamp
    finally:
        kernels._library.cache_clear()


def test_the_kernel_ops_refuse_operands_they_cannot_read_with_what_is_wrong() -> None:
    """The dispatcher kernel (C++) checks dtype, layout and shapes before reading any pointer."""
    entry = quant.pack(torch.randn(8, 64), "w4a8", torch.float32)
    op = torch.ops.llmkit_cpu.linear_w4a8.default
    x = torch.randn(2, 64)
    assert op(x, entry.weight, entry.scales).shape == (2, 8)  # one tile of 8 rows
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-d CPU float32 tensor"):
        op(x.double(), entry.weight, entry.scales)
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-d CPU float32 tensor"):
        op(torch.randn(64, 2).T, entry.weight, entry.scales)
    with pytest.raises(RuntimeError, match="w must be a contiguous 2-d CPU uint8 tensor"):
        op(x, entry.weight.int(), entry.scales)
    with pytest.raises(RuntimeError, match=r"got K=64, w \[1, 256\], s \[1, 2, 2, 4\]"):
        op(x, entry.weight, entry.scales[..., :4].contiguous())
    with pytest.raises(RuntimeError, match=r"K a multiple of 32 expected, got K=48"):
        op(torch.randn(2, 48), entry.weight[:, :192].contiguous(), entry.scales)
    entry = quant.pack(torch.randn(8, 64), "fp16", torch.float32)
    op = torch.ops.llmkit_cpu.linear_f16.default
    assert op(x, entry.weight).shape == (2, 8)
    with pytest.raises(RuntimeError, match="linear_f16: x must be a contiguous 2-d CPU float32 tensor"):
        op(x.half(), entry.weight)
    with pytest.raises(RuntimeError, match="linear_f16: w must be a contiguous 3-d CPU float16 tensor"):
        op(x, entry.weight.float())
    with pytest.raises(RuntimeError, match="linear_f16: w must be a contiguous 3-d CPU float16 tensor"):
        op(x, torch.randn(1, 8, 64).half().transpose(1, 2))  # the right shape, not contiguous
    with pytest.raises(RuntimeError, match=r"linear_f16: shapes x \[M, K\], w \[N/8, K, 8\] expected, got K=64, "
                                           r"w \[1, 32, 8\]"):
        op(x, entry.weight[:, :32].contiguous())


@pytest.mark.parametrize("mode", ["fp16", "w4a8"])
def test_compiled_packed_decode_is_one_graph_with_eagers_tokens(mode) -> None:
    """The C kernels cannot be traced: the compiled step reaches them through the
    `llmkit_cpu::linear_f16` / `linear_w4a8` ops, so the graph does not break; the tied head packs
    eagerly."""
    import torch._dynamo

    with pytest.warns(llmkit.errors.FallbackWarning):
        model = llmkit.build("tiny-smollm2-135m", dtype="float32", quant=mode, seed=5)
    ids = torch.randint(0, model.spec.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    eager = model.generate(ids, 6, eos=False)
    model.head._cpu_tied = None  # so the first compiled step brings the tied matrix
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(ids, 6, eos=False, compile=True)
    assert torch.equal(compiled, eager)
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_moe_decode_is_one_graph_with_eagers_tokens_and_routing(dtype) -> None:
    """A compiled step reaches a MoE layer through `llmkit_cpu::moe_layer`, one opaque op, so the
    graph does not break on the routing; the layer's routing statistics are the last step's, as
    eager's; a second generate traces nothing again (the statistics are not part of the model's
    digest); a deep copy of the model, run eagerly first by generate's prefill, compiles with the
    copy's own weights; an op call for a block never bound nor run is an error."""
    import torch._dynamo

    with pytest.warns(llmkit.errors.FallbackWarning):
        model = llmkit.build("tiny-qwen1.5-moe-a2.7b", dtype=dtype, seed=5)  # a shared, gated expert
    ids = torch.randint(0, model.spec.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    eager = model.generate(ids, 6, eos=False)
    moe = [m for m in model.modules() if getattr(m, "kind", None) is not None and m.kind.name == "moe"]
    want = [m.routing.selected for m in moe]
    torch._dynamo.utils.counters.clear()
    assert torch.equal(model.generate(ids, 6, eos=False, compile=True), eager)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert all(torch.equal(m.routing.selected, w) and m.routing.selected.shape[0] == 2 for m, w in zip(moe, want))
    frames = torch._dynamo.utils.counters["frames"]["total"]
    model.generate(ids, 6, eos=False, compile=True)
    assert torch._dynamo.utils.counters["frames"]["total"] == frames
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for m in twin.modules():
            if getattr(m, "kind", None) is not None and m.kind.name == "moe":
                m.w_down.mul_(-30.0)
    twin_eager = twin.generate(ids, 6, eos=False)
    assert not torch.equal(twin_eager, eager)
    assert torch.equal(twin.generate(ids, 6, eos=False, compile=True), twin_eager)
    with pytest.raises(RuntimeError, match="moe_layer: no cpu.grouped block with id 0 was bound or run"):
        torch.ops.llmkit_cpu.moe_layer(torch.zeros(1, 8), 0)


def _finish_with(model, ids: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """The model's logits with the head's matrix replaced (a tied head quantises its own copy)."""
    h = model.embedding(ids)
    for layer in model.layers:
        h = layer(h, torch.arange(ids.shape[1]))
    return model.head(model.norm(h), head_weight)


def test_blocks_left_unquantised_are_named() -> None:
    with pytest.warns(llmkit.errors.FallbackWarning) as caught:
        llmkit.build("tiny-mixtral-8x7b", dtype="bfloat16", quant="int8")
    messages = [str(w.message) for w in caught if "quant=" in str(w.message)]
    assert len(messages) == 1 and "quant=int8: 2 blocks stay" in messages[0]
    assert "moe@1 (cpu.grouped) x2, e.g. layers.0.mlp" in messages[0]


@pytest.mark.parametrize("mode, dtype, agree", [("int8", "bfloat16", 0.9), ("int4", "bfloat16", 0.85),
                                               ("w4a8", "float32", 0.85), ("fp16", "float32", 0.98)])
def test_smollm2_quantised_accuracy(mode, dtype, agree) -> None:
    """Next-token agreement with the unquantised model in the same dtype on real text (documented
    cost), the quantised model fed one token at a time through its cache, as in decoding."""
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
            "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
            "from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece "
            "of the 1889 World's Fair.")
    with pytest.warns(llmkit.errors.FallbackWarning):
        base = llmkit.load("smollm2-135m", dtype=dtype)
        quantised = llmkit.load("smollm2-135m", dtype=dtype, quant=mode)
    ids = torch.tensor([base.tokenizer.encode(text)])
    with torch.inference_mode():
        a = base(ids).float()
        cache = quantised.new_cache(capacity=ids.shape[1])
        b = torch.cat([quantised(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])], dim=1).float()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    print(f"\nSmolLM2 {mode}: top-1 agreement {top1:.3f} over {ids.shape[1]} tokens, KL {kl.item() / ids.shape[1]:.4f}")
    assert top1 >= agree


def test_smollm2_half_precision_kv_cache_accuracy() -> None:
    """The documented cost of a float16 KV cache (`cache_dtype`, llama.cpp's default): next-token
    agreement and KL of a float32 SmolLM2 fed one token at a time through a float16 cache, against
    the same model's forward over the whole text."""
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
            "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
            "from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece "
            "of the 1889 World's Fair.")
    with pytest.warns(llmkit.errors.FallbackWarning):
        model = llmkit.load("smollm2-135m", dtype="float32")
    ids = torch.tensor([model.tokenizer.encode(text)])
    with torch.inference_mode():
        a = model(ids)
        cache = model.new_cache(capacity=ids.shape[1], dtype=torch.float16)
        b = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    err = (a - b).abs().max().item()
    print(f"\nSmolLM2 float16 KV cache: top-1 agreement {top1:.3f} over {ids.shape[1]} tokens, "
          f"KL {kl.item() / ids.shape[1]:.2e}, max logit error {err:.3f}")
    assert top1 >= 0.98 and 0 < err < 0.5

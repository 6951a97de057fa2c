"""attention@1, mla@1 and rope@1: invariants, cache equivalences, and parity with transformers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from llmkit import Block
from llmkit.cache import LayerCache
from llmkit.testing import bind_reference, randomize
from llmkit_blocks import attention as A
from llmkit_blocks import positional as P


def make(config: dict, dtype: torch.dtype = torch.float64, seed: int = 0) -> Block:
    kind = A.MLA if config.get("type") == "mla" else A.ATTENTION
    return bind_reference(randomize(Block(kind, config, dtype=dtype), seed))


def rope_block(config: dict) -> Block:
    return bind_reference(Block(P.KIND, config, dtype=torch.float64))


GQA = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "rope": {"theta": 10000.0}}
QUIRKY = {"d_model": 32, "n_heads": 4, "n_kv_heads": 1, "head_dim": 12, "fused_qkv": True, "qkv_bias": True,
          "o_bias": True, "clip_qkv": 0.3, "qk_norm": {"eps": 1e-6}, "softcap": 2.0,
          "rope": {"theta": 500.0, "partial": 0.5}}
WINDOW = {**GQA, "window": 3}
MLA_CFG = {"type": "mla", "d_model": 32, "n_heads": 4, "q_lora_rank": 12, "kv_lora_rank": 10,
           "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 5,
           "rope": {"theta": 10000.0, "scaling": {"type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                                  "original_max_position_embeddings": 16}}}
CONFIGS = {"gqa": GQA, "quirky": QUIRKY, "window": WINDOW, "mla": MLA_CFG}


def x_and_pos(b: int = 2, t: int = 9, d: int = 32, seed: int = 1):
    x = torch.randn(b, t, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x, torch.arange(t)


@pytest.mark.parametrize("name", CONFIGS)
def test_changing_future_tokens_never_changes_earlier_outputs(name: str) -> None:
    block = make(CONFIGS[name])
    x, pos = x_and_pos()
    out = block(x, pos)
    for j in range(x.shape[1]):
        y = x.clone()
        y[:, j:] += torch.randn_like(y[:, j:])
        torch.testing.assert_close(block(y, pos)[:, :j], out[:, :j], rtol=0, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(window=st.integers(1, 6), t=st.integers(2, 10), i=st.integers(0, 9), seed=st.integers(0, 1000))
def test_sliding_window_sees_exactly_w_keys_including_itself(window: int, t: int, i: int, seed: int) -> None:
    i = i % t
    block = make({**GQA, "window": window}, seed=seed)
    x, pos = x_and_pos(1, t, seed=seed)
    out = block(x, pos)[0, i]
    for j in range(i + 1):
        y = x.clone()
        y[0, j] += 1.0
        moved = (block(y, pos)[0, i] - out).abs().max().item()
        if i - window < j:
            assert moved > 1e-6, (j, i, window)
        else:
            assert moved == 0.0, (j, i, window)


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    gqa = make(GQA)
    mha = make({**GQA, "n_kv_heads": 4})
    with torch.no_grad():
        mha.wq.copy_(gqa.wq)
        mha.wo.copy_(gqa.wo)
        for name in ("wk", "wv"):
            w = getattr(gqa, name).view(2, 8, 32)
            getattr(mha, name).copy_(w.repeat_interleave(2, dim=0).reshape(32, 32))
    x, pos = x_and_pos()
    torch.testing.assert_close(gqa(x, pos), mha(x, pos), rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_with_cache_token_by_token_equals_full_forward(name: str) -> None:
    cfg = CONFIGS[name]
    block = make(cfg)
    x, pos = x_and_pos(t=11)
    full = block(x, pos)
    cache = LayerCache(max_tokens=cfg.get("window"))
    steps = [block(x[:, i:i + 1], pos[i:i + 1], cache) for i in range(x.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-13)
    if "window" in cfg:
        assert len(cache) == cfg["window"]  # a windowed layer never holds more than W keys


@pytest.mark.parametrize("name", CONFIGS)
def test_chunked_prefill_equals_one_shot_prefill(name: str) -> None:
    cfg = CONFIGS[name]
    block = make(cfg)
    x, pos = x_and_pos(t=12)
    full = block(x, pos)
    cache = LayerCache(max_tokens=cfg.get("window"))
    outs, start = [], 0
    for size in (5, 1, 4, 2):
        outs.append(block(x[:, start:start + size], pos[start:start + size], cache))
        start += size
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-13)


def test_mla_cache_holds_only_the_latent_and_the_rope_key() -> None:
    block = make(MLA_CFG)
    x, pos = x_and_pos(t=7)
    cache = LayerCache()
    block(x, pos, cache)
    assert sorted(cache.tensors) == ["k_rope", "latent"]
    assert cache.values_per_token() == MLA_CFG["kv_lora_rank"] + MLA_CFG["qk_rope_head_dim"] == 14
    assert cache.tensors["latent"].shape == (2, 7, 10)
    std = LayerCache()
    make(GQA)(x, pos, std)
    assert std.values_per_token() == 2 * 2 * 8  # k and v, n_kv_heads * head_dim each


@pytest.mark.parametrize("name", CONFIGS)
def test_left_padding_marked_by_negative_positions_is_ignored(name: str) -> None:
    block = make(CONFIGS[name])
    x, pos = x_and_pos(b=1, t=6)
    alone = block(x, pos)
    padded = torch.cat([torch.randn(1, 3, 32, dtype=torch.float64), x], dim=1)
    ppos = torch.cat([torch.full((3,), -1), pos]).unsqueeze(0)
    out = block(padded, ppos)
    torch.testing.assert_close(out[:, 3:], alone, rtol=0, atol=1e-13)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ RoPE

@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("shift", [2**15, 2**16, 10**5])
def test_rope_scores_depend_only_on_relative_position(layout: str, shift: int) -> None:
    rope = rope_block({"head_dim": 16, "theta": 10000.0, "layout": layout, "partial": 0.75})
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 5, 16, dtype=torch.float64, generator=g) for _ in range(2))
    pos = torch.tensor([[0, 3, 7, 100, 1000]])

    def scores(p):
        return rope(q, p) @ rope(k, p).transpose(-1, -2)

    torch.testing.assert_close(scores(pos + shift), scores(pos), rtol=0, atol=1e-10)
    assert (scores(pos * 2) - scores(pos)).abs().max() > 1e-2  # test of the test


@pytest.mark.parametrize("name", ["gqa", "mla"])
def test_attention_output_is_invariant_to_shifting_all_positions(name: str) -> None:
    cfg = CONFIGS[name] if name == "gqa" else {**MLA_CFG, "rope": {"theta": 10000.0}}  # no YaRN ramp
    block = make(cfg)
    x, pos = x_and_pos()
    assert (block(x, pos * 3) - block(x, pos)).abs().max() > 1e-3  # positions do matter
    for shift in (2**15, 2**16, 10**5):
        torch.testing.assert_close(block(x, pos + shift), block(x, pos), rtol=0, atol=1e-10)


def test_rope_angles_are_not_computed_in_low_precision() -> None:
    """bf16 storage at positions near 2^16: error vs float64 stays at bf16 rounding level."""
    rope64 = rope_block({"head_dim": 64})
    rope16 = bind_reference(Block(P.KIND, {"head_dim": 64}, dtype=torch.bfloat16))
    x = torch.randn(1, 1, 4, 64, dtype=torch.float64).to(torch.bfloat16)
    pos = torch.tensor([[2**16 - 1, 2**16, 2**16 + 1, 70001]])
    err = (rope16(x, pos).double() - rope64(x.double(), pos)).abs().max().item()
    assert err < 0.05, err
    # what a bf16 angle computation would give: positions themselves are not representable
    w = P.inv_freq(P.RopeConfig(head_dim=64)).to(torch.bfloat16)
    bad_angle = pos.to(torch.bfloat16)[:, None, :, None] * w
    assert (bad_angle.double() - pos.double()[:, None, :, None] * w.double()).abs().max() > 10


def _closed_form_inv_freq(theta: float, d: int) -> list[float]:
    return [1.0 / theta ** (2 * i / d) for i in range(d // 2)]


def test_inv_freq_formulas_by_hand() -> None:
    d, theta = 64, 500000.0
    base = _closed_form_inv_freq(theta, d)
    lin = P.inv_freq(P.RopeConfig(head_dim=d, theta=theta, scaling={"type": "linear", "factor": 4.0}))
    assert lin.tolist() == pytest.approx([w / 4.0 for w in base], rel=1e-15)
    l3 = P.inv_freq(P.RopeConfig(head_dim=d, theta=theta, scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    for w, got in zip(base, l3.tolist()):
        wavelen = 2 * math.pi / w
        if wavelen < 8192 / 4:
            assert got == pytest.approx(w, rel=1e-15)
        elif wavelen > 8192 / 1:
            assert got == pytest.approx(w / 8, rel=1e-15)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            assert got == pytest.approx((1 - smooth) * w / 8 + smooth * w, rel=1e-12)
    dyn = P.inv_freq(P.RopeConfig(head_dim=d, theta=theta, scaling={
        "type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 1000}), seq_len=3000)
    new_base = theta * (2.0 * 3000 / 1000 - 1.0) ** (d / (d - 2))
    assert dyn.tolist() == pytest.approx(_closed_form_inv_freq(new_base, d), rel=1e-12)
    short = P.inv_freq(P.RopeConfig(head_dim=d, theta=theta, scaling={
        "type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 1000}), seq_len=10)
    assert short.tolist() == pytest.approx(base, rel=1e-12)


def test_yarn_blends_extrapolation_and_interpolation() -> None:
    d, theta, factor, orig = 64, 10000.0, 16.0, 4096
    cfg = P.RopeConfig(head_dim=d, theta=theta, scaling={"type": "yarn", "factor": factor,
                                                          "original_max_position_embeddings": orig})
    w = torch.tensor(_closed_form_inv_freq(theta, d), dtype=torch.float64)
    got = P.inv_freq(cfg)

    def corr(rot):
        return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = math.floor(corr(32)), math.ceil(corr(1))
    for i in range(d // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        expected = (w[i] / factor) * ramp + w[i] * (1 - ramp)
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-12)
    assert got[0] == w[0] and got[-1] == pytest.approx(w[-1] / factor)
    assert P.attention_factor(cfg) == pytest.approx(0.1 * math.log(16) + 1)


ROPE_CASES = {
    "default": ({}, {}),
    "linear": ({"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32},
               {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707,
              "mscale_all_dim": 1.3},
             {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707,
              "mscale_all_dim": 1.3}),
}


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_inv_freq_and_attention_factor_match_transformers(case: str, partial: float) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf, ours = ROPE_CASES[case]
    rope_type = hf.get("rope_type", "default")
    params = {"rope_theta": 5000.0, "partial_rotary_factor": partial, "rope_type": rope_type, **hf}
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=64, rope_parameters=params)
    if rope_type == "default":
        from transformers import GPTNeoXConfig
        from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

        cfg = GPTNeoXConfig(hidden_size=128, num_attention_heads=2, rope_parameters=params)
        ref, factor = GPTNeoXRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        kwargs = {"seq_len": 200} if rope_type == "dynamic" else {}
        ref, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", **kwargs)
    mine = P.RopeConfig(head_dim=64, theta=5000.0, partial=partial, scaling=ours or None)
    torch.testing.assert_close(P.inv_freq(mine, seq_len=200), ref.double(), rtol=1e-6, atol=0)  # transformers computes in float32
    assert P.attention_factor(mine) == pytest.approx(factor, rel=1e-12)


def test_interleaved_layout_rotates_adjacent_pairs_as_complex_numbers() -> None:
    rope = rope_block({"head_dim": 8, "layout": "interleaved", "theta": 100.0})
    x = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    p = 37
    out = rope(x, torch.tensor([[p]]))
    z = torch.view_as_complex(x.view(4, 2).contiguous())
    w = P.inv_freq(P.RopeConfig(head_dim=8, theta=100.0))
    expected = torch.view_as_real(z * torch.exp(1j * p * w)).reshape(1, 1, 1, 8)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------ config validation

@pytest.mark.parametrize(("config", "message"), [
    ({"d_model": 32, "n_heads": 4, "n_kv_heads": 3}, "n_heads (4) must be a multiple of n_kv_heads (3)"),
    ({"d_model": 30, "n_heads": 4}, "d_model (30) is not divisible by n_heads (4); set head_dim explicitly"),
    ({"d_model": 32, "n_heads": 4, "rope": {"head_dim": 16}}, "rope.head_dim (16) must equal head_dim (8)"),
    ({"d_model": 32, "n_heads": 4, "head_dim": 6, "rope": {"partial": 0.5}}, "rotary dim int(head_dim * partial) = int(6 * 0.5) = 3 must be even"),
    ({"d_model": 32, "n_heads": 4, "window": 0}, "window"),
    ({"d_model": 32, "n_heads": 4, "rope": {"scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                                     "high_freq_factor": 1.0, "original_max_position_embeddings": 8}}},
     "high_freq_factor (1.0) must exceed low_freq_factor (4.0)"),
    ({"d_model": 32, "n_heads": 4, "rope": {"scaling": {"type": "ntk", "factor": 2.0}}}, "does not match any of the expected tags"),
])
def test_attention_config_errors(config: dict, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        A.AttentionConfig.model_validate(config)
    assert message in str(err.value)


# ------------------------------------------------------------------ gradients and dtypes

@pytest.mark.parametrize("name", CONFIGS)
def test_gradcheck_float64(name: str) -> None:
    cfg = dict(CONFIGS[name], d_model=8)
    cfg.update({"n_heads": 2, "n_kv_heads": 1} if name != "mla" else {"n_heads": 2})
    if name == "quirky":
        cfg.update(head_dim=4, clip_qkv=10.0)  # clamp is not differentiable at the boundary
    block = make(cfg)
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(4)

    def fn(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x, pos))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_runs_in_low_precision_without_nan(name: str, dtype: torch.dtype) -> None:
    block = make(CONFIGS[name], dtype=dtype)
    x, pos = x_and_pos()
    out = block(x.to(dtype), pos)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_gradcheck_float64(layout: str) -> None:
    rope = rope_block({"head_dim": 8, "layout": layout, "partial": 0.5,
                       "scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}})
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: rope(x, torch.arange(5)[None] * 7), (x,))

"""Reference semantics of the first catalogue blocks: norm, mlp, embedding, head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from llmkit import Block, Registry
from llmkit.testing import randomize

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def ref_block(registry: Registry, kind: str, config: dict, dtype=torch.float64, seed: int = 0) -> Block:
    k = registry.kind(kind)
    block = Block(k, config, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    block.bind(registry.impl(k.id, "reference.eager"), registry.target("cpu", dtype=dtype))
    return block


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry.load(allow=["blocks", "cpu"])


def test_rmsnorm_hand_computed(reg) -> None:
    b = ref_block(reg, "norm", {"dim": 2, "eps": 1e-6})
    x = torch.tensor([3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(b(x), x / math.sqrt(12.5 + 1e-6), rtol=0, atol=1e-15)


def test_rmsnorm_and_layernorm_match_torch_functional_in_float64(reg) -> None:
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    rms = randomize(ref_block(reg, "norm", {"dim": 16, "eps": 1e-5}))
    torch.testing.assert_close(rms(x), F.rms_norm(x, (16,), rms.weight, eps=1e-5), rtol=0, atol=1e-14)
    ln = randomize(ref_block(reg, "norm", {"type": "layer", "dim": 16, "eps": 1e-5, "bias": True}))
    torch.testing.assert_close(ln(x), F.layer_norm(x, (16,), ln.weight, ln.bias, eps=1e-5), rtol=0, atol=1e-14)
    nob = randomize(ref_block(reg, "norm", {"type": "layer", "dim": 16}))
    assert "bias" not in dict(nob.named_parameters())
    torch.testing.assert_close(nob(x), F.layer_norm(x, (16,), nob.weight, None, eps=1e-6), rtol=0, atol=1e-14)


def test_unit_offset_scales_by_one_plus_weight(reg) -> None:
    b = ref_block(reg, "norm", {"dim": 8, "unit_offset": True})
    assert torch.count_nonzero(b.weight) == 0  # initialised so that the scale starts at 1
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(b(x), F.rms_norm(x, (8,), eps=1e-6))
    with torch.no_grad():
        b.weight.fill_(0.5)
    torch.testing.assert_close(b(x), 1.5 * F.rms_norm(x, (8,), eps=1e-6))


def test_cast_position_follows_llama_and_gemma(reg) -> None:
    """Llama: weight * normed.to(bf16); Gemma: (normed * (1 + w.float())).to(bf16). Bits differ."""
    x = torch.randn(64, 32, dtype=torch.float32).to(torch.bfloat16)
    w = (1 + 0.3 * torch.randn(32)).to(torch.bfloat16)
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    before = ref_block(reg, "norm", {"dim": 32}, dtype=torch.bfloat16)
    after = ref_block(reg, "norm", {"dim": 32, "cast": "after_weight"}, dtype=torch.bfloat16)
    with torch.no_grad():
        before.weight.copy_(w)
        after.weight.copy_(w)
    llama = w * normed.to(torch.bfloat16)
    gemma_style = (normed * w.float()).to(torch.bfloat16)
    assert torch.equal(before(x), llama) and torch.equal(after(x), gemma_style)
    assert not torch.equal(llama, gemma_style)  # the distinction is observable


def test_norm_config_validation(reg) -> None:
    kind = reg.kind("norm")
    with pytest.raises(ValidationError, match="bias applies to LayerNorm only"):
        kind.parse_config({"dim": 8, "bias": True})
    with pytest.raises(ValidationError, match="unit_offset applies to RMSNorm only"):
        kind.parse_config({"type": "layer", "dim": 8, "unit_offset": True})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        kind.parse_config({"dim": 8, "epsilon": 1e-5})
    with pytest.raises(ValidationError, match="greater than 0"):
        kind.parse_config({"dim": 0})


@pytest.mark.parametrize(("activation", "fn"), [
    ("silu", lambda t: t / (1 + math.exp(-t))),
    ("gelu", lambda t: 0.5 * t * (1 + math.erf(t / math.sqrt(2)))),
    ("gelu_tanh", lambda t: 0.5 * t * (1 + math.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))),
    ("relu", lambda t: max(t, 0.0)),
])
def test_gated_mlp_scalar_case_by_hand(reg, activation, fn) -> None:
    b = ref_block(reg, "mlp", {"d_model": 1, "hidden": 1, "activation": activation, "bias": True})
    vals = {"w_gate": 0.7, "w_up": -1.3, "w_down": 0.9, "b_gate": 0.1, "b_up": 0.2, "b_down": -0.05}
    with torch.no_grad():
        for name, v in vals.items():
            getattr(b, name).fill_(v)
    x = 1.7
    expected = 0.9 * fn(0.7 * x + 0.1) * (-1.3 * x + 0.2) - 0.05
    assert b(torch.tensor([x], dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-12)


def test_ungated_mlp_matches_two_linears(reg) -> None:
    b = randomize(ref_block(reg, "mlp", {"d_model": 6, "hidden": 10, "gated": False, "activation": "gelu", "bias": True}))
    assert "w_gate" not in dict(b.named_parameters())
    x = torch.randn(3, 6, dtype=torch.float64)
    up, down = torch.nn.Linear(6, 10).double(), torch.nn.Linear(10, 6).double()
    with torch.no_grad():
        up.weight.copy_(b.w_up), up.bias.copy_(b.b_up), down.weight.copy_(b.w_down), down.bias.copy_(b.b_down)
    torch.testing.assert_close(b(x), down(F.gelu(up(x))), rtol=0, atol=1e-14)


def test_embedding_multiplier_exact_or_rounded_to_dtype(reg) -> None:
    d = 3072
    ids = torch.tensor([[1, 5]])
    grok = ref_block(reg, "embedding", {"vocab_size": 8, "d_model": d, "multiplier": d**0.5}, dtype=torch.bfloat16)
    gemma = ref_block(reg, "embedding", {"vocab_size": 8, "d_model": d, "multiplier": d**0.5, "round_multiplier": True},
                      dtype=torch.bfloat16)
    with torch.no_grad():
        gemma.weight.copy_(grok.weight)
    rows = grok.weight[ids]
    assert torch.equal(grok(ids), rows * d**0.5)
    # Gemma: torch.tensor(sqrt(3072), dtype=bf16) == 55.5, not 55.4256...
    assert torch.equal(gemma(ids), rows * torch.tensor(55.5, dtype=torch.bfloat16))
    assert not torch.equal(grok(ids), gemma(ids))


def test_head_tied_multiplier_and_softcap(reg) -> None:
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    emb = torch.randn(11, 8, dtype=torch.float64)
    tied = ref_block(reg, "head", {"d_model": 8, "vocab_size": 11, "tied": True, "multiplier": 0.5773502691896257})
    assert list(dict(tied.named_parameters())) == []
    torch.testing.assert_close(tied(x, emb), (x @ emb.T) * 0.5773502691896257)
    with pytest.raises(ValueError, match="needs the embedding matrix"):
        tied(x)
    capped = ref_block(reg, "head", {"d_model": 8, "vocab_size": 11, "softcap": 30.0})
    raw = x @ capped.weight.T * 1e4
    torch.testing.assert_close(capped(x * 1e4), 30.0 * torch.tanh(raw / 30.0))
    assert capped(x * 1e4).abs().max() <= 30.0


CONFIGS = [
    ("norm", {"dim": 8}, lambda: (torch.randn(2, 3, 8),)),
    ("norm", {"type": "layer", "dim": 8, "bias": True}, lambda: (torch.randn(2, 3, 8),)),
    ("norm", {"dim": 8, "unit_offset": True, "cast": "after_weight"}, lambda: (torch.randn(2, 3, 8),)),
    ("mlp", {"d_model": 8, "hidden": 12, "activation": "gelu_tanh", "bias": True}, lambda: (torch.randn(2, 3, 8),)),
    ("mlp", {"d_model": 8, "hidden": 12, "gated": False, "activation": "relu"}, lambda: (torch.randn(2, 3, 8),)),
    ("embedding", {"vocab_size": 16, "d_model": 8, "multiplier": 2.5}, lambda: (torch.randint(0, 16, (2, 3)),)),
    ("head", {"d_model": 8, "vocab_size": 16, "softcap": 5.0, "bias": True}, lambda: (torch.randn(2, 3, 8),)),
]


@pytest.mark.parametrize(("kind", "config", "inputs"), CONFIGS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CONFIGS)])
def test_gradcheck_float64(reg, kind, config, inputs) -> None:
    block = randomize(ref_block(reg, kind, config))
    args = [a.double().requires_grad_() if a.is_floating_point() else a for a in inputs()]
    params = list(block.parameters())
    names = [n for n, _ in block.named_parameters()]

    def fn(*tensors):
        xs, ps = tensors[: len(args)], tensors[len(args):]
        return torch.func.functional_call(block, dict(zip(names, ps)), tuple(xs))

    assert torch.autograd.gradcheck(fn, (*args, *[p.detach().requires_grad_() for p in params]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "config", "inputs"), CONFIGS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CONFIGS)])
def test_runs_in_every_float_dtype_without_nan(reg, kind, config, inputs, dtype) -> None:
    block = randomize(ref_block(reg, kind, config, dtype=dtype))
    args = [a.to(dtype) if a.is_floating_point() else a for a in inputs()]
    out = block(*args)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-3, 1e3), shift=st.floats(-100, 100), seed=st.integers(0, 2**16))
def test_norm_invariances(reg, scale: float, shift: float, seed: int) -> None:
    """RMSNorm is invariant to positive scaling of x; LayerNorm also to shifting it (eps -> 0)."""
    x = torch.randn(4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    rms = randomize(ref_block(reg, "norm", {"dim": 32, "eps": 1e-300}), seed)
    torch.testing.assert_close(rms(x * scale), rms(x), rtol=1e-12, atol=1e-12)
    ln = randomize(ref_block(reg, "norm", {"type": "layer", "dim": 32, "eps": 1e-300, "bias": True}), seed)
    torch.testing.assert_close(ln(x * scale + shift), ln(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_rmsnorm_is_bit_exact_with_transformers_in_bfloat16(reg, family: str) -> None:
    """Where the cast to bf16 happens changes bits; each config must match its model's norm exactly."""
    if family == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as HFNorm

        config = {"dim": 64, "eps": 1e-5}
    else:
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as HFNorm

        config = {"dim": 64, "eps": 1e-5, "unit_offset": True, "cast": "after_weight"}
    hf = HFNorm(64, eps=1e-5).to(torch.bfloat16)
    ours = ref_block(reg, "norm", config, dtype=torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(64) * 0.3 + (0 if family == "gemma" else 1))
        ours.weight.copy_(hf.weight)
    x = torch.randn(8, 64).to(torch.bfloat16) * 3
    assert torch.equal(ours(x), hf(x))
    other = ref_block(reg, "norm", {**config, "cast": "before_weight" if family == "gemma" else "after_weight"},
                      dtype=torch.bfloat16)
    with torch.no_grad():
        other.weight.copy_(hf.weight)
    assert not torch.equal(other(x), hf(x))  # the cast position is what makes it exact

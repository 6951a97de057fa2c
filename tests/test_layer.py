"""layer@1: residual structure, norm placement, cache equivalence, parity with transformers layers."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from llmkit import Block
from llmkit.cache import LayerCache
from llmkit.testing import bind_reference, randomize
from llmkit_blocks import layer as L

ATTN = {"n_heads": 4, "n_kv_heads": 2, "rope": {"theta": 10000.0}}
MLA = {"type": "mla", "n_heads": 4, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
       "v_head_dim": 6, "rope": {"theta": 10000.0}}
MLP = {"hidden": 40}
MOE = {"type": "moe", "n_experts": 4, "top_k": 2, "hidden": 24}


def make(config: dict, dtype=torch.float64, seed: int = 0) -> Block:
    return bind_reference(randomize(Block(L.KIND, {"d_model": 32, **config}, dtype=dtype), seed))


def x_pos(t: int = 9):
    return torch.randn(2, t, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5)), torch.arange(t)


@pytest.mark.parametrize(("placement", "parallel"), [("pre", False), ("sandwich", False), ("pre", True)])
def test_residual_structure(placement: str, parallel: bool) -> None:
    block = make({"attention": ATTN, "mlp": MLP, "placement": placement, "parallel": parallel})
    x, pos = x_pos()
    a = block.attention(block.attn_norm(x), pos)
    if parallel:
        expected = x + a + block.mlp(block.mlp_norm(x))
    elif placement == "sandwich":
        h = x + block.post_attn_norm(a)
        expected = h + block.post_mlp_norm(block.mlp(block.mlp_norm(h)))
    else:
        h = x + a
        expected = h + block.mlp(block.mlp_norm(h))
    torch.testing.assert_close(block(x, pos), expected, rtol=0, atol=0)
    names = {n for n, _ in block.named_children()}
    assert ("post_attn_norm" in names) == (placement == "sandwich")


@pytest.mark.parametrize(("attention", "mlp"), [(ATTN, MLP), ({**ATTN, "window": 3}, MOE), (MLA, MOE)],
                         ids=["dense", "window-moe", "mla-moe"])
def test_decode_with_cache_equals_full_forward(attention: dict, mlp: dict) -> None:
    block = make({"attention": attention, "mlp": mlp, "placement": "sandwich"})
    x, pos = x_pos(10)
    full = block(x, pos)
    cache = LayerCache(max_tokens=attention.get("window"))
    steps = torch.cat([block(x[:, i:i + 1], pos[i:i + 1], cache) for i in range(10)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-12)


def test_slots_pick_the_child_kind_from_the_type_tag() -> None:
    block = make({"attention": MLA, "mlp": MOE})
    assert block.attention.kind.id == "mla@1" and block.mlp.kind.id == "moe@1"
    block = make({"attention": ATTN, "mlp": MLP})
    assert block.attention.kind.id == "attention@1" and block.mlp.kind.id == "mlp@1"
    assert block.attn_norm.config.dim == 32 and block.attention.config.d_model == 32


@pytest.mark.parametrize(("config", "message"), [
    ({"attention": ATTN, "mlp": MLP, "placement": "sandwich", "parallel": True}, "parallel layers use pre-norm placement"),
    ({"attention": {**ATTN, "d_model": 64}, "mlp": MLP}, "attention.d_model (64) must equal the layer's d_model (32)"),
    ({"attention": {**ATTN, "type": "flash"}, "mlp": MLP}, "does not match any of the expected tags: 'attention', 'mla'"),
    ({"attention": ATTN, "mlp": MLP, "norm": {"type": "layer", "unit_offset": True}}, "norm: "),
    ({"attention": ATTN, "mlp": {"hiden": 3}}, "Extra inputs are not permitted"),
])
def test_layer_config_errors(config: dict, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        L.LayerConfig.model_validate({"d_model": 32, **config})
    assert message in str(err.value)


def _load_hf_layer(hf_layer, ours: Block, mapping: dict[str, str]) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf_layer.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.2 * noise if "norm" in name else 0.1 * noise)  # Gemma norms scale by 1 + w
    state = {ours_name: dict(hf_layer.named_parameters())[hf_name] for ours_name, hf_name in mapping.items()}
    assert set(state) == set(ours.state_dict())
    ours.load_state_dict(state)


def test_gemma2_decoder_layer_sandwich_norms() -> None:
    from transformers.models.gemma2.configuration_gemma2 import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer, Gemma2RotaryEmbedding

    cfg = Gemma2Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=50.0, rms_norm_eps=1e-6)
    cfg._attn_implementation = "eager"
    hf = Gemma2DecoderLayer(cfg, layer_idx=1).eval()  # layer 1: full attention
    norm = {"unit_offset": True, "cast": "after_weight", "eps": 1e-6}
    ours = Block(L.KIND, {"d_model": 32, "placement": "sandwich", "norm": norm,
                          "attention": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "scale": 8**-0.5,
                                        "softcap": 50.0, "rope": {"theta": 10000.0}},
                          "mlp": {"hidden": 48, "activation": "gelu_tanh"}}, dtype=torch.float32)
    _load_hf_layer(hf, ours, {
        "attn_norm.weight": "input_layernorm.weight", "post_attn_norm.weight": "post_attention_layernorm.weight",
        "mlp_norm.weight": "pre_feedforward_layernorm.weight", "post_mlp_norm.weight": "post_feedforward_layernorm.weight",
        "attention.wq": "self_attn.q_proj.weight", "attention.wk": "self_attn.k_proj.weight",
        "attention.wv": "self_attn.v_proj.weight", "attention.wo": "self_attn.o_proj.weight",
        "mlp.w_gate": "mlp.gate_proj.weight", "mlp.w_up": "mlp.up_proj.weight", "mlp.w_down": "mlp.down_proj.weight"})
    bind_reference(ours)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    pos = torch.arange(7)
    cos, sin = Gemma2RotaryEmbedding(cfg)(x, pos[None].expand(2, -1))
    mask = torch.zeros(7, 7).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))[None, None]
    with torch.no_grad():
        expected = hf(x, position_embeddings=(cos, sin), attention_mask=mask)
        expected = expected[0] if isinstance(expected, tuple) else expected
        torch.testing.assert_close(ours(x, pos), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("attention", "mlp"), [(ATTN, MLP), (MLA, MOE)], ids=["dense", "mla-moe"])
def test_gradcheck_float64(attention: dict, mlp: dict) -> None:
    small_mlp = {**mlp, "hidden": 6}
    block = Block(L.KIND, {"d_model": 8, "placement": "sandwich", "attention": {**attention, "n_heads": 2, **(
        {"n_kv_heads": 1} if "type" not in attention else {"kv_lora_rank": 4})}, "mlp": small_mlp}, dtype=torch.float64)
    block = bind_reference(randomize(block))
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x, torch.arange(3)))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_runs_in_low_precision_without_nan(dtype: torch.dtype) -> None:
    block = make({"attention": MLA, "mlp": {**MOE, "shared_hidden": 16}, "placement": "sandwich"}, dtype=dtype)
    x, pos = x_pos()
    out = block(x.to(dtype), pos)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None)

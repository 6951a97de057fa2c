"""attention@1 and mla@1 against transformers' attention modules on identical weights.

Each family's quirk (GQA + llama3 RoPE, qkv bias, soft-cap + query_pre_attn_scalar, fused Wqkv +
clip_qkv, QK-norm, MLA + YaRN mscale) is checked in float32 against the transformers module, and
removing the quirk from our config must move the output by far more than the tolerance (a test
of the test). transformers builds the mask from the model; here the additive mask is built from
the same positions (causal, and the window where one is set).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from llmkit import Block
from llmkit.testing import bind_reference
from llmkit_blocks import attention as A

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _hf(family: str, config_kwargs: dict):
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cfg_mod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    prefix = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama", "gemma2": "Gemma2", "dbrx": "Dbrx",
              "deepseek_v3": "DeepseekV3"}[family]
    config = getattr(cfg_mod, f"{prefix}Config")(**config_kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = getattr(mod, f"{prefix}Attention")(config, layer_idx=0).eval()
    rotary = getattr(mod, f"{prefix}RotaryEmbedding")(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return attn, rotary


def _mask(t: int, window: int | None = None) -> torch.Tensor:
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    ok = j <= i
    if window is not None:
        ok &= i - j < window
    return torch.zeros(t, t).masked_fill(~ok, float("-inf"))[None, None]


def _ours(config: dict, weights: dict[str, torch.Tensor], exact: bool = True) -> Block:
    kind = A.MLA if config.get("type") == "mla" else A.ATTENTION
    block = Block(kind, config, dtype=torch.float32)
    state = block.state_dict()
    if exact:
        assert set(weights) == set(state), (sorted(weights), sorted(state))
    block.load_state_dict({k: v for k, v in weights.items() if k in state})
    return bind_reference(block)


def _compare(attn, rotary, ours: dict, weights: dict, t: int = 12, window: int | None = None, quirk: dict | None = None):
    x = torch.randn(2, t, attn.config.hidden_size if hasattr(attn.config, "hidden_size") else attn.config.d_model,
                    generator=torch.Generator().manual_seed(2))
    pos = torch.arange(t)
    cos, sin = rotary(x, pos[None].expand(2, -1))
    with torch.no_grad():
        expected = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=_mask(t, window))[0]
        got = _ours(ours, weights)(x, pos)
        torch.testing.assert_close(got, expected, **TOL)
        if quirk is not None:
            without = _ours({**ours, **quirk}, weights, exact=False)(x, pos)
            assert (without - expected).abs().max() > 100 * TOL["atol"], f"removing {quirk} changes nothing"


def test_llama_gqa_with_llama3_rope() -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 4}
    attn, rotary = _hf("llama", dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                     max_position_embeddings=32, rope_parameters=rope))
    ours = {"d_model": 64, "n_heads": 8, "n_kv_heads": 2, "rope": {"theta": 500000.0, "scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 4}}}
    w = {"wq": attn.q_proj.weight, "wk": attn.k_proj.weight, "wv": attn.v_proj.weight, "wo": attn.o_proj.weight}
    _compare(attn, rotary, ours, w, quirk={"rope": {"theta": 500000.0}})


def test_qwen2_bias_on_qkv_not_on_o() -> None:
    attn, rotary = _hf("qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    ours = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "qkv_bias": True, "rope": {"theta": 1e6}}
    w = {"wq": attn.q_proj.weight, "wk": attn.k_proj.weight, "wv": attn.v_proj.weight, "wo": attn.o_proj.weight,
         "bq": attn.q_proj.bias, "bk": attn.k_proj.bias, "bv": attn.v_proj.bias}
    _compare(attn, rotary, ours, w)


@pytest.mark.parametrize("window", [None, 4])
def test_gemma2_softcap_scalar_and_window(window) -> None:
    attn, rotary = _hf("gemma2", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      query_pre_attn_scalar=24, attn_logit_softcapping=0.5, sliding_window=4))
    ours = {"d_model": 48, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "scale": 24**-0.5, "softcap": 0.5,
            "window": window, "rope": {"theta": 10000.0}}
    w = {"wq": attn.q_proj.weight, "wk": attn.k_proj.weight, "wv": attn.v_proj.weight, "wo": attn.o_proj.weight}
    _compare(attn, rotary, ours, w, window=window, quirk={"softcap": None})


def test_dbrx_fused_wqkv_and_clip() -> None:
    # transformers' rotary reads rope_parameters, not attn_config.rope_theta, when built from kwargs
    attn, rotary = _hf("dbrx", dict(d_model=64, n_heads=4, max_seq_len=32,
                                    attn_config={"kv_n_heads": 2, "clip_qkv": 0.08, "rope_theta": 500000.0},
                                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    ours = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "fused_qkv": True, "clip_qkv": 0.08,
            "rope": {"theta": 500000.0}}
    w = {"wqkv": attn.Wqkv.weight, "wo": attn.out_proj.weight}
    _compare(attn, rotary, ours, w, quirk={"clip_qkv": None})


def test_qwen3_qk_norm_before_rope() -> None:
    attn, rotary = _hf("qwen3", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     rms_norm_eps=1e-6))
    ours = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "qk_norm": {"eps": 1e-6},
            "rope": {"theta": attn.config.rope_parameters["rope_theta"]}}
    w = {"wq": attn.q_proj.weight, "wk": attn.k_proj.weight, "wv": attn.v_proj.weight, "wo": attn.o_proj.weight,
         "q_norm.weight": attn.q_norm.weight, "k_norm.weight": attn.k_norm.weight}
    _compare(attn, rotary, ours, w, quirk={"qk_norm": None})


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_deepseek_v3_mla_with_yarn_mscale(q_lora_rank) -> None:
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 8}
    attn, rotary = _hf("deepseek_v3", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                           q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
                                           qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=320,
                                           rope_parameters=rope, rope_interleave=True, rms_norm_eps=1e-6))
    ours = {"type": "mla", "d_model": 64, "n_heads": 4, "q_lora_rank": q_lora_rank, "kv_lora_rank": 16,
            "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12, "norm_eps": 1e-6,
            "rope": {"theta": 10000.0, "scaling": {"type": "yarn", "factor": 40.0, "mscale": 1.0,
                                                   "mscale_all_dim": 1.0, "original_max_position_embeddings": 8}}}
    w = {"wkv_a": attn.kv_a_proj_with_mqa.weight, "kv_norm.weight": attn.kv_a_layernorm.weight,
         "wkv_b": attn.kv_b_proj.weight, "wo": attn.o_proj.weight}
    if q_lora_rank is None:
        w["wq"] = attn.q_proj.weight
    else:
        w.update({"wq_a": attn.q_a_proj.weight, "q_norm.weight": attn.q_a_layernorm.weight, "wq_b": attn.q_b_proj.weight})
    _compare(attn, rotary, ours, w, quirk={"rope": {"theta": 10000.0}})

"""Every shipped preset: loads, builds on meta, and its figures equal the published ones and
transformers' own parameter count for the same published config."""

from __future__ import annotations

import pytest
import torch

from llmkit import FallbackWarning, Registry, build, inspect, load_spec, preset_names

NAMES = ["llama-2-7b", "llama-2-70b", "llama-3-8b", "llama-3.1-8b", "mistral-7b-v0.1", "mixtral-8x7b",
         "mixtral-8x22b", "qwen1.5-0.5b", "qwen1.5-1.8b", "qwen1.5-4b", "qwen1.5-7b", "qwen1.5-14b",
         "qwen1.5-72b", "qwen1.5-moe-a2.7b", "dbrx", "grok-1", "deepseek-v3", "kimi-k2", "gemma-7b",
         "smollm2-135m"]

# The figures the issue names (published model cards / transformers counts). Active counts include
# the embedding and head; grok-1 and deepseek-v3 active are "about" figures, checked to 0.5%.
PUBLISHED = {
    "llama-3-8b": 8_030_261_248, "llama-2-7b": 6_738_415_616, "mistral-7b-v0.1": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704, "qwen1.5-0.5b": 463_987_712, "qwen1.5-7b": 7_721_324_544,
    "qwen1.5-moe-a2.7b": 14_315_784_192, "dbrx": 131_596_523_520, "deepseek-v3": 671_026_404_352,
    "gemma-7b": 8_537_680_896, "smollm2-135m": 134_515_008,
}
ABOUT = {"grok-1": ("params_total", 316e9), "deepseek-v3": ("params_active", 37.5e9)}
ACTIVE = {"mixtral-8x7b": 12_879_925_248}
KV_BF16 = {"llama-3-8b": 131_072, "deepseek-v3": 70_272}

# The published configs, transcribed independently of the presets, as transformers config kwargs.
def llama(v, h, i, l, nh, kv, mp, eps, theta, tie, **kw):
    return dict(model_type="llama", vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=l,
                num_attention_heads=nh, num_key_value_heads=kv, max_position_embeddings=mp, rms_norm_eps=eps,
                rope_theta=theta, tie_word_embeddings=tie, **kw)

def qwen(v, h, i, l, nh, theta, tie):
    return dict(model_type="qwen2", vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=l,
                num_attention_heads=nh, num_key_value_heads=nh, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_theta=theta, tie_word_embeddings=tie)

CFGS = {
 "llama-2-7b": llama(32000, 4096, 11008, 32, 32, 32, 4096, 1e-5, 10000.0, False),
 "llama-2-70b": llama(32000, 8192, 28672, 80, 64, 8, 4096, 1e-5, 10000.0, False),
 "llama-3-8b": llama(128256, 4096, 14336, 32, 32, 8, 8192, 1e-5, 500000.0, False),
 "llama-3.1-8b": llama(128256, 4096, 14336, 32, 32, 8, 131072, 1e-5, 500000.0, False,
     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
 "smollm2-135m": llama(49152, 576, 1536, 30, 9, 3, 8192, 1e-5, 100000.0, True),
 "mistral-7b-v0.1": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
 "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False),
 "mixtral-8x22b": dict(model_type="mixtral", vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
     num_attention_heads=48, num_key_value_heads=8, max_position_embeddings=65536, rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False),
 "qwen1.5-0.5b": qwen(151936, 1024, 2816, 24, 16, 1e6, True),
 "qwen1.5-1.8b": qwen(151936, 2048, 5504, 24, 16, 1e6, False),
 "qwen1.5-4b": qwen(151936, 2560, 6912, 40, 20, 5e6, False),
 "qwen1.5-7b": qwen(151936, 4096, 11008, 32, 32, 1e6, False),
 "qwen1.5-14b": qwen(152064, 5120, 13696, 40, 40, 1e6, False),
 "qwen1.5-72b": qwen(152064, 8192, 24576, 80, 64, 1e6, False),
 "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
     shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, num_hidden_layers=24,
     num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1e6, decoder_sparse_step=1, tie_word_embeddings=False),
 "dbrx": dict(model_type="dbrx", vocab_size=100352, d_model=6144, n_heads=48, n_layers=40, max_seq_len=32768,
     attn_config={"clip_qkv": 8.0, "kv_n_heads": 8, "rope_theta": 500000.0}, ffn_config={"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4, "moe_jitter_eps": 0.0, "moe_normalize_expert_weights": 1.0}, tie_word_embeddings=False),
 "deepseek-v3": dict(model_type="deepseek_v3", vocab_size=129280, num_nextn_predict_layers=0,
     rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
     max_position_embeddings=163840, rope_theta=10000.0),
 "kimi-k2": dict(model_type="deepseek_v3", vocab_size=163840, num_nextn_predict_layers=0, num_attention_heads=64, num_key_value_heads=64,
     n_routed_experts=384, n_group=1, topk_group=1, routed_scaling_factor=2.827, first_k_dense_replace=1, rope_theta=50000.0,
     rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
     max_position_embeddings=131072),
 "gemma-7b": dict(model_type="gemma", vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
     num_key_value_heads=16, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="gelu"),
}



@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry.load(allow=["blocks", "cpu"])


def test_every_preset_and_its_tiny_variant_is_shipped() -> None:
    assert sorted(preset_names()) == sorted(NAMES + [f"tiny-{n}" for n in NAMES])


@pytest.fixture(scope="module")
def figures(reg) -> dict[str, dict]:
    return {name: inspect(name, registry=reg) for name in NAMES}


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_equals_the_published_figure(figures, name) -> None:
    assert figures[name]["params_total"] == PUBLISHED[name]


def test_active_and_approximate_figures(figures) -> None:
    for name, active in ACTIVE.items():
        assert figures[name]["params_active"] == active
    for name, (key, about) in ABOUT.items():
        assert abs(figures[name][key] - about) / about < 0.005, (name, figures[name][key])
    for name, kv in KV_BF16.items():
        assert figures[name]["kv_cache_bytes_per_token"] == kv


@pytest.mark.parametrize("name", sorted(CFGS))
def test_parameter_count_equals_transformers_on_meta(figures, name) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(CFGS[name])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert figures[name]["params_total"] == sum(p.numel() for p in model.parameters())


def test_sliding_window_caps_the_cache(reg) -> None:
    full = inspect("mistral-7b-v0.1", context=4096, registry=reg)["kv_cache_bytes_per_token"]
    assert full == 32 * 2 * 8 * 128 * 2
    assert inspect("mistral-7b-v0.1", context=16384, registry=reg)["kv_cache_bytes_per_token"] == full * 4096 / 16384


@pytest.mark.parametrize("name", NAMES)
def test_preset_builds_on_meta_with_a_plan(reg, name) -> None:
    with pytest.warns(FallbackWarning):  # the cpu backend has no impls of its own yet
        model = build(name, device="meta", registry=reg)
    assert all(p.is_meta for p in model.parameters())
    assert len(model.plan.entries) > model.spec.n_layers


@pytest.mark.parametrize("name", NAMES)
def test_tiny_preset_keeps_the_structure_and_runs_forward_and_backward(reg, name) -> None:
    tiny, full = load_spec(f"tiny-{name}", reg), load_spec(name, reg)
    model = build(tiny, policy="reference", registry=reg, seed=1)
    assert sum(p.numel() for p in model.parameters()) <= 3_000_000
    # same structure: the same sequence of sublayer kinds, norm placement and quirks
    def shape(spec):
        return [(c.attention.type, c.mlp.type, c.placement, c.parallel, getattr(c.attention, "window", None) is not None)
                for c in spec.layers]
    assert sorted(set(shape(tiny))) == sorted(set(shape(full)))
    assert (tiny.tied, type(tiny.head).__name__) == (full.tied, type(full.head).__name__)
    ids = torch.randint(0, tiny.vocab_size, (2, 9))
    logits = model(ids)
    assert logits.shape == (2, 9, tiny.vocab_size) and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)

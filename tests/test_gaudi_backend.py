"""The `gaudi` backend plugin without Gaudi hardware or habana_frameworks: it loads, reports itself
unavailable with the reason, and its capability logic answers injected facts (Gaudi 1/2/3, MoE op
present or not). The impls are written against the SynapseAI API and not yet certified on hardware."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

import llmkit_backend_gaudi
from llmkit.hookspecs import Target
from llmkit.info import collect
from llmkit.registry import Registry
from llmkit_backend_gaudi import UNCERTIFIED
from llmkit_backend_gaudi.backend import GaudiBackend, _generation, declared_peak

REG = Registry.load([("gaudi", llmkit_backend_gaudi)], environ={"LLMKIT_DISABLE_PLUGIN_AUTOLOAD": "1",
                                                              "LLMKIT_PLUGINS": "blocks"})
HABANA = importlib.util.find_spec("habana_frameworks") is not None
ATTN = {"d_model": 128, "n_heads": 8, "n_kv_heads": 2, "window": 32}
MOE = {"d_model": 64, "n_experts": 8, "top_k": 2, "hidden": 32}


def _target(dtype: torch.dtype = torch.bfloat16, **facts: Any) -> Target:
    return REG.target("gaudi", device="meta", dtype=dtype, facts=facts)


def _reasons(qualname: str, kind: str, config: dict[str, Any], target: Target) -> list[str]:
    k = REG.kind(kind)
    cfg = k.parse_config(config)
    return REG.impl(k.id, qualname).reasons(cfg, k.required_features(cfg), target)


def _chosen(kind: str, config: dict[str, Any], target: Target) -> str:
    return REG.resolve(kind, config, target).impl.qualname


@pytest.mark.skipif(HABANA, reason="checks the machine without habana_frameworks")
def test_unavailable_without_habana_frameworks() -> None:
    reasons = GaudiBackend().available()
    assert len(reasons) == 1 and reasons[0].startswith("habana_frameworks not installed")
    entry = next(b for b in collect(REG)["backends"] if b["name"] == "gaudi")
    assert entry["available"] is False and entry["device_type"] == "hpu"
    assert entry["reasons"][0].startswith("habana_frameworks not installed")
    with pytest.raises(Exception, match="habana_frameworks not installed"):
        REG.target("gaudi")


def test_every_impl_says_it_is_uncertified() -> None:
    own = [i for k in REG.kinds for i in REG.impls_for(k) if i.backend == "gaudi"]
    assert sorted(i.name for i in own) == ["fused_rms", "fused_rope", "fused_sdpa", "moe_op"]
    assert all(UNCERTIFIED in i.summary for i in own) and UNCERTIFIED in GaudiBackend.summary


@pytest.mark.parametrize("gen", ["gaudi2", "gaudi3"])
def test_gaudi2_and_3_take_the_fused_ops(gen) -> None:
    t = _target(generation=gen, moe_op=True)
    assert _chosen("attention", ATTN, t) == "gaudi.fused_sdpa"
    assert _chosen("norm", {"dim": 64, "unit_offset": True, "cast": "after_weight"}, t) == "gaudi.fused_rms"
    assert _chosen("rope", {"head_dim": 64, "layout": "interleaved", "partial": 0.5}, t) == "gaudi.fused_rope"
    assert _chosen("moe", {**MOE, "scoring": "sigmoid", "correction_bias": True, "n_group": 4, "topk_group": 2}, t) \
        == "gaudi.moe_op"


def test_first_generation_gaudi_keeps_only_the_norm() -> None:
    t = _target(generation="gaudi", moe_op=True)
    assert any("declared for gaudi2+ only, the target is gaudi" in r
               for r in _reasons("gaudi.fused_sdpa", "attention", ATTN, t))
    assert _chosen("attention", ATTN, t) == "reference.eager"
    assert _chosen("norm", {"dim": 64}, t) == "gaudi.fused_rms"


def test_moe_op_needs_the_op_and_gated_silu_or_relu_experts() -> None:
    gaudi3 = _target(generation="gaudi3", moe_op=True)
    missing = _reasons("gaudi.moe_op", "moe", MOE, _target(generation="gaudi3", moe_op=False))
    assert any("does not register torch.ops.hpu.mixture_of_experts" in r for r in missing)
    for extra, feature in [({"gated": False}, "ungated"), ({"activation": "gelu_tanh"}, "act_gelu_tanh"),
                           ({"expert_bias": True}, "expert_bias"), ({"capacity_factor": 1.25}, "capacity")]:
        reasons = _reasons("gaudi.moe_op", "moe", {**MOE, **extra}, gaudi3)
        assert any(feature in r for r in reasons), (extra, reasons)


def test_unclaimed_things_are_refused() -> None:
    gaudi2 = _target(generation="gaudi2", moe_op=True)
    assert any("softcap" in r for r in _reasons("gaudi.fused_sdpa", "attention", {**ATTN, "softcap": 50.0}, gaudi2))
    assert any("layernorm" in r for r in _reasons("gaudi.fused_rms", "norm", {"type": "layer", "dim": 64}, gaudi2))
    assert any("dtype float16 not declared" in r
               for r in _reasons("gaudi.fused_rms", "norm", {"dim": 64}, _target(torch.float16, generation="gaudi2")))
    assert any("no Gaudi generation" in r for r in _reasons("gaudi.fused_rms", "norm", {"dim": 64}, _target()))


def test_peaks_from_the_white_paper() -> None:
    g2, g3 = declared_peak("gaudi2", torch.bfloat16), declared_peak("gaudi3", torch.bfloat16)
    assert g2.flops_per_s == pytest.approx(432e12) and g2.bytes_per_s == pytest.approx(2.46e12)
    assert g3.flops_per_s == pytest.approx(1835e12) and g3.bytes_per_s == pytest.approx(3.7e12)
    assert "Gaudi 3 AI Accelerator White Paper" in g3.source
    assert declared_peak("gaudi3", torch.float32) is None  # not in the paper: measured on the device
    assert [_generation(n) for n in ("GAUDI2", "GAUDI3", "GAUDI", "unknown")] == ["gaudi2", "gaudi3", "gaudi", None]

"""The `rocm` backend plugin: availability (a ROCm torch selects it), capability ranges per gfx
architecture with injected facts (gfx90a / gfx942 / gfx950 / gfx1100 / gfx908), ROCm's exclusions as
reasons, and the AMD peak table with datasheet sources and per-GCD / per-partition scaling.
Not run on AMD hardware: these pin the declarations, a ROCm certificate will test the claims."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend

import llmkit_backend_rocm
from llmkit.hookspecs import Target
from llmkit.registry import Registry
from llmkit_backend_rocm import ROCM_SDPA_KERNELS, capability, peaks
from llmkit_backend_rocm.backend import RocmBackend

REG = Registry.load([("rocm", llmkit_backend_rocm)], environ={"LLMKIT_DISABLE_PLUGIN_AUTOLOAD": "1",
                                                            "LLMKIT_PLUGINS": "blocks"})
ATTN = {"d_model": 128, "n_heads": 8, "n_kv_heads": 2}


def _target(dtype: torch.dtype = torch.bfloat16, **facts: Any) -> Target:
    return REG.target("rocm", device="meta", dtype=dtype, facts=facts)


def _reasons(qualname: str, kind: str, config: dict[str, Any], target: Target) -> list[str]:
    k = REG.kind(kind)
    cfg = k.parse_config(config)
    return REG.impl(k.id, qualname).reasons(cfg, k.required_features(cfg), target)


def _chosen(kind: str, config: dict[str, Any], target: Target) -> str:
    return REG.resolve(kind, config, target).impl.qualname


def test_plugin_loads_with_the_same_triton_kernels_as_cuda() -> None:
    assert any(r.name == "rocm" and r.status == "ok" for r in REG.plugins)
    own = sorted(i.name for k in REG.kinds for i in REG.impls_for(k) if i.backend == "rocm")
    assert own == ["fused", "grouped", "sdpa", "triton_flash", "triton_glu", "triton_moe", "triton_norm",
                   "triton_rope"]
    assert REG.backend("rocm").device_type == "cuda"  # a ROCm torch keeps torch's "cuda" device type


def test_selected_only_by_a_rocm_torch(monkeypatch) -> None:
    if not getattr(torch.version, "hip", None):
        assert "not a ROCm build (torch.version.hip is None)" in RocmBackend().available()[0]
    monkeypatch.setattr(torch.version, "hip", "6.3.42131", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no ROCm device visible" in RocmBackend().available()[0]


def test_mi300_runs_the_fused_paths() -> None:
    mi300 = _target(gcn_arch="gfx942:sramecc+:xnack-")
    assert _reasons("rocm.sdpa", "attention", ATTN, mi300) == []
    assert _chosen("attention", ATTN, mi300) == "rocm.sdpa"
    assert _chosen("attention", {**ATTN, "softcap": 30.0}, mi300) == "rocm.triton_flash"
    assert _chosen("attention", ATTN, _target(torch.float32, gcn_arch="gfx942")) == "rocm.triton_flash"
    assert _chosen("moe", {"d_model": 64, "n_experts": 4, "top_k": 2, "hidden": 32}, mi300) == "rocm.grouped"
    assert SDPBackend.CUDNN_ATTENTION not in ROCM_SDPA_KERNELS


def test_rdna_sdpa_is_experimental_unless_switched_on() -> None:
    rdna = _reasons("rocm.sdpa", "attention", ATTN, _target(gcn_arch="gfx1100"))
    assert any("experimental" in r and capability.EXPERIMENTAL_ENV in r for r in rdna)
    assert _reasons("rocm.sdpa", "attention", ATTN, _target(gcn_arch="gfx1100", aotriton_experimental=True)) == []
    assert _reasons("rocm.triton_flash", "attention", ATTN, _target(gcn_arch="gfx1100")) == []


def test_mi100_and_unknown_archs_are_refused_with_reasons() -> None:
    mi100 = _target(gcn_arch="gfx908")
    assert any("no fused SDPA" in r for r in _reasons("rocm.sdpa", "attention", ATTN, mi100))
    assert any("CDNA2+ and RDNA3+" in r for r in _reasons("rocm.triton_norm", "norm", {"dim": 64}, mi100))
    assert _chosen("attention", ATTN, mi100) == "reference.eager"
    unknown = _reasons("rocm.fused", "norm", {"dim": 64}, _target(gcn_arch="gfx1030"))
    assert any("gfx1030 is not one this plugin declares" in r for r in unknown)
    none = _reasons("rocm.fused", "norm", {"dim": 64}, _target())
    assert any("no gfx architecture" in r for r in none)


def test_fp8_formats_per_arch() -> None:
    assert capability.fp8_dtypes("gfx942") == (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
    assert capability.fp8_dtypes("gfx950") == (torch.float8_e4m3fn, torch.float8_e5m2)
    assert capability.fp8_dtypes("gfx90a") == ()


@pytest.mark.parametrize(("name", "cus", "entry", "bf16_tflops"), [
    ("AMD Instinct MI300X", 304, "Instinct MI300X", 1307.4),
    ("AMD Instinct MI300X", 38, "Instinct MI300X", 1307.4 / 8),  # CPX partition: 1 of 8 XCDs
    ("AMD Instinct MI325X", 304, "Instinct MI325X", 1307.4),
    ("AMD Instinct MI300A", 228, "Instinct MI300A", 980.6),
    ("AMD Instinct MI250X / MI250", 110, "Instinct MI250X", 383.0 / 2),  # one GCD of two
    ("AMD Instinct MI250X / MI250", 104, "Instinct MI250", 362.1 / 2),
    ("AMD Instinct MI210", 104, "Instinct MI210", 181.0),
])
def test_peaks_from_the_datasheets_scaled_to_the_visible_device(name, cus, entry, bf16_tflops) -> None:
    facts = {"name": name, "multiprocessors": cus}
    assert peaks.lookup(name, facts).peaks.name == entry
    p = RocmBackend().table_peak(facts, torch.bfloat16)
    assert p.flops_per_s == pytest.approx(bf16_tflops * 1e12)
    assert "AMD Instinct" in p.source and "data sheet" in p.source
    assert ("scaled by" in p.source) == (bf16_tflops != peaks.lookup(name, facts).peaks.tflops[torch.bfloat16])


def test_unknown_amd_device_has_no_declared_peak() -> None:
    assert RocmBackend().table_peak({"name": "AMD Radeon RX 7900 XTX", "multiprocessors": 96}, torch.float16) is None

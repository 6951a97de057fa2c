"""The `cuda` backend plugin: loading and availability on any machine, capability ranges with
injected device facts (sm_75 / sm_80 / sm_90), the datasheet peak table, the masking / grouping
logic of its PyTorch paths against the float64 reference (on the CPU, which runs the same torch
ops), and, on a machine with an NVIDIA GPU, every impl on the device (`-m` nothing: the device
tests skip themselves without CUDA; `benchmarks/gpu_check.sh` runs them).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import llmkit_backend_cuda
from llmkit import Block
from llmkit.cache import LayerCache
from llmkit.hookspecs import Target
from llmkit.registry import Registry
from llmkit.testing import bind_reference
from llmkit_backend_cuda import peaks, torch_paths
from llmkit_backend_cuda.backend import CudaBackend

# the plugin module itself with the catalogue, whatever else is installed (installed or not)
REG = Registry.load([("cuda", llmkit_backend_cuda)], environ={"LLMKIT_DISABLE_PLUGIN_AUTOLOAD": "1",
                                                            "LLMKIT_PLUGINS": "blocks"})
ON_CUDA = torch.cuda.is_available() and torch.version.cuda is not None and not getattr(torch.version, "hip", None)
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs an NVIDIA GPU and a CUDA build of torch")


def _target(dtype: torch.dtype | str = torch.bfloat16, **facts: Any) -> Target:
    return REG.target("cuda", device="meta", dtype=dtype, facts=facts)


def _reasons(qualname: str, kind: str, config: dict[str, Any], target: Target) -> list[str]:
    k = REG.kind(kind)
    cfg = k.parse_config(config)
    return REG.impl(k.id, qualname).reasons(cfg, k.required_features(cfg), target)


def _chosen(kind: str, config: dict[str, Any], target: Target) -> str:
    return REG.resolve(kind, config, target).impl.qualname


ATTN = {"d_model": 128, "n_heads": 8, "n_kv_heads": 2}
MOE = {"d_model": 64, "n_experts": 4, "top_k": 2, "hidden": 32}


# --- plugin and availability ------------------------------------------------------------------

def test_plugin_loads_and_registers_its_impls() -> None:
    assert any(r.name == "cuda" and r.status == "ok" for r in REG.plugins)
    own = sorted(i.qualname for k in REG.kinds for i in REG.impls_for(k) if i.backend == "cuda")
    assert own == ["cuda.fused", "cuda.grouped", "cuda.sdpa", "cuda.triton_flash", "cuda.triton_glu",
                   "cuda.triton_moe", "cuda.triton_norm", "cuda.triton_rope"]


@pytest.mark.skipif(ON_CUDA, reason="checks the reasons of a machine without CUDA")
def test_unavailable_here_with_the_reason() -> None:
    reasons = CudaBackend().available()
    assert len(reasons) == 1
    if torch.version.cuda is None:
        assert "built without CUDA" in reasons[0]
    else:
        assert "no CUDA device visible" in reasons[0]
    with pytest.raises(Exception, match="unavailable here"):
        REG.target("cuda")


@pytest.mark.skipif(ON_CUDA, reason="checks how a CUDA certificate reads on a machine without CUDA")
def test_a_gpu_certificate_read_without_the_gpu_is_stale_with_the_reason(capsys) -> None:
    # the H200 certificate in benchmarks/results: no device facts to read here, so it cannot
    # describe this machine; its sources are still compared (a changed hash is named)
    from pathlib import Path

    from llmkit import certificate
    from llmkit.cli import main

    path = Path(__file__).parents[1] / "benchmarks" / "results" / "cert-cuda-quick-h200.json"
    cert = certificate.load(path)
    assert "backend 'cuda' is unavailable here" in certificate.stale_reasons(cert, REG)[0]
    key = sorted(cert.impls)[0]
    changed = {**cert.impls, key: cert.impls[key].model_copy(update={"source_hash": "sha256:0"})}
    reasons = certificate.stale_reasons(cert.model_copy(update={"impls": changed}), REG)
    assert f"impl {key.rsplit('/', 1)[-1]}: source changed since certification" in reasons
    assert main(["verify-cert", str(path)]) == 1
    assert "cannot be compared" in capsys.readouterr().out


def test_a_rocm_torch_is_the_rocm_backends(monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.3.42131", raising=False)
    reasons = CudaBackend().available()
    assert reasons and "ROCm build" in reasons[0] and "rocm backend" in reasons[0]


# --- capability ranges from injected facts ----------------------------------------------------

@pytest.mark.parametrize("facts", [{"compute_capability": "7.5"}, {"sm": 75}])
def test_bfloat16_needs_ampere(facts) -> None:
    reasons = _reasons("cuda.sdpa", "attention", ATTN, _target(torch.bfloat16, **facts))
    assert any("bfloat16 tensor-core math needs sm_80+" in r for r in reasons)
    assert _reasons("cuda.sdpa", "attention", ATTN, _target(torch.float16, **facts)) == []
    assert _reasons("cuda.sdpa", "attention", ATTN, _target(torch.bfloat16, compute_capability="8.0")) == []


def test_triton_needs_sm80_and_the_kernel_reasons_follow() -> None:
    for kind, cfg, name in [("norm", {"dim": 64}, "triton_norm"), ("attention", ATTN, "triton_flash"),
                            ("moe", MOE, "triton_moe")]:
        old = _reasons(f"cuda.{name}", kind, cfg, _target(torch.float16, compute_capability="7.5"))
        assert any("Triton needs sm_80+, the target is sm_75" in r for r in old), old
        assert _reasons(f"cuda.{name}", kind, cfg, _target(torch.float16, compute_capability="9.0")) == []
    grouped = _reasons("cuda.triton_moe", "moe", {**MOE, "n_experts": 8, "n_group": 4, "topk_group": 2},
                       _target(torch.float16, compute_capability="9.0"))
    assert any("group-limited" in r for r in grouped)


def test_no_compute_capability_means_no_claim() -> None:
    reasons = _reasons("cuda.sdpa", "attention", ATTN, _target(torch.float16))
    assert any("no compute capability" in r for r in reasons)
    assert _chosen("attention", ATTN, _target(torch.float16)) == "reference.eager"


def test_flash_head_dim_limits() -> None:
    sm90 = _target(torch.bfloat16, compute_capability="9.0")
    big = {"d_model": 512, "n_heads": 1, "head_dim": 320}
    assert any("head_dim 320 > 256" in r for r in _reasons("cuda.sdpa", "attention", big, sm90))
    odd = {"d_model": 60, "n_heads": 6, "head_dim": 10}
    assert any("not a multiple of 8" in r for r in _reasons("cuda.sdpa", "attention", odd, sm90))


def test_soft_cap_goes_to_the_triton_kernel_not_sdpa() -> None:
    sm90 = _target(torch.bfloat16, compute_capability="9.0")
    capped = {**ATTN, "softcap": 30.0, "window": 64}
    assert any("softcap" in r for r in _reasons("cuda.sdpa", "attention", capped, sm90))
    assert _chosen("attention", capped, sm90) == "cuda.triton_flash"
    assert _chosen("attention", ATTN, sm90) == "cuda.sdpa"
    assert _chosen("attention", ATTN, _target(torch.float64, compute_capability="9.0")) == "reference.eager"


def test_grouped_gemm_moe_range() -> None:
    sm80 = _target(torch.bfloat16, compute_capability="8.0")
    assert _chosen("moe", MOE, sm80) == "cuda.grouped"
    assert _chosen("moe", MOE, _target(torch.float16, compute_capability="8.0")) == "cuda.triton_moe"
    misaligned = _reasons("cuda.grouped", "moe", {**MOE, "d_model": 36}, sm80)
    assert any("d_model to be a multiple of 8" in r for r in misaligned)
    capacity = _reasons("cuda.grouped", "moe", {**MOE, "capacity_factor": 1.0}, sm80)
    assert any("capacity" in r for r in capacity)
    assert _chosen("moe", {**MOE, "capacity_factor": 1.0}, sm80) == "cuda.triton_moe"


# --- peaks --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "gib", "entry"), [
    ("NVIDIA H100 80GB HBM3", 79.1, "H100 SXM"), ("NVIDIA H100 PCIe", 79.1, "H100 PCIe"),
    ("NVIDIA H100 NVL", 93.1, "H100 NVL"), ("NVIDIA H200", 139.8, "H200 SXM"), ("NVIDIA H200 NVL", 139.8, "H200 NVL"),
    ("NVIDIA A100-SXM4-40GB", 39.4, "A100 40GB"), ("NVIDIA A100-PCIE-40GB", 39.4, "A100 40GB"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "A100 80GB SXM"), ("NVIDIA A100 80GB PCIe", 79.2, "A100 80GB PCIe"),
    ("NVIDIA L4", 22.0, "L4"), ("NVIDIA L40S", 44.4, "L40S"), ("NVIDIA GeForce RTX 4090", 23.6, "GeForce RTX 4090"),
    # GH200 is an H100-class GPU with its own memory: it must not take the H200's bandwidth
    ("NVIDIA GH200 480GB", 95.0, "GH200 96GB HBM3"), ("NVIDIA GH200 144G HBM3e", 143.0, "GH200 144GB HBM3e"),
])
def test_device_names_find_their_datasheet_row(name, gib, entry) -> None:
    found = peaks.lookup(peaks.NVIDIA, name, {"total_memory_gib": gib})
    assert found is not None and found.name == entry


def test_peaks_are_dense_and_sourced() -> None:
    h100 = CudaBackend().table_peak({"name": "NVIDIA H100 80GB HBM3", "total_memory_gib": 79.1}, torch.bfloat16)
    assert h100.flops_per_s == pytest.approx(989.5e12)  # the datasheet's 1979 TFLOPS is with sparsity
    assert h100.bytes_per_s == pytest.approx(3.35e12)
    assert "NVIDIA H100 Tensor Core GPU datasheet" in h100.source and "dense" in h100.source
    for entry in peaks.NVIDIA:
        assert "NVIDIA" in entry.source and ("datasheet" in entry.source or "whitepaper" in entry.source)
        assert entry.tflops[torch.bfloat16] >= entry.tflops[torch.float32]
    assert peaks.lookup(peaks.NVIDIA, "NVIDIA GeForce GTX 1080", {"total_memory_gib": 8.0}) is None


# --- the PyTorch paths' logic against the float64 reference (same torch ops on the CPU) ----------

def _blocks(kind: str, config: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> tuple[Block, Block, Block]:
    g = torch.Generator().manual_seed(seed)
    under = Block(REG.kind(kind), config, dtype=dtype)
    with torch.no_grad():
        for t in under.parameters():
            t.copy_((0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype))
    exact = copy.deepcopy(under).to(torch.float64)
    naive = copy.deepcopy(under)
    for b in (exact, naive, under):
        bind_reference(b, b.dtype)
    return exact, naive, under


def _check(got: torch.Tensor, naive: torch.Tensor, exact: torch.Tensor) -> None:
    assert got.dtype == naive.dtype and got.shape == exact.shape and torch.isfinite(got).all()
    e_impl = (got.double() - exact).abs().max().item()
    e_naive = (naive.double() - exact).abs().max().item()
    floor = 8 * torch.finfo(got.dtype).eps * exact.abs().max().item()
    assert e_impl <= 2 * e_naive + floor, f"e_max {e_impl:.3g} > 2 * naive {e_naive:.3g} + floor {floor:.3g}"


SDPA = torch_paths.make_sdpa_forward(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extra", [{}, {"n_kv_heads": 8}, {"window": 5}, {"causal": False, "n_kv_heads": 1}])
def test_sdpa_path_prefill_and_padded_decode(dtype, extra) -> None:
    config = {"d_model": 64, "n_heads": 8, "n_kv_heads": 2, "rope": {"theta": 10000.0}, **extra}
    exact, naive, under = _blocks("attention", config, dtype)
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pos = torch.arange(11).expand(2, -1).clone()
    pos[1, :3] = -1  # left padding in the second row
    with torch.no_grad():
        _check(SDPA(under, x.to(dtype), pos), naive(x.to(dtype), pos), exact(x, pos))
        caches = [LayerCache(), LayerCache(), LayerCache()]
        _check(SDPA(under, x[:, :7].to(dtype), pos[:, :7], caches[0]), naive(x[:, :7].to(dtype), pos[:, :7], caches[1]),
               exact(x[:, :7], pos[:, :7], caches[2]))
        for i in range(7, 11):
            step = (x[:, i:i + 1], pos[:, i:i + 1])
            _check(SDPA(under, step[0].to(dtype), step[1], caches[0]), naive(step[0].to(dtype), step[1], caches[1]),
                   exact(*step, caches[2]))


@pytest.mark.parametrize("extra", [{}, {"expert_bias": True, "shared_hidden": 16, "shared_gate": True},
                                   {"gated": False, "activation": "gelu_tanh"},
                                   {"scoring": "sigmoid", "correction_bias": True, "renormalize": "none"}])
def test_grouped_gemm_moe_matches_the_reference(extra) -> None:
    exact, naive, under = _blocks("moe", {**MOE, **extra}, torch.bfloat16)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        got = torch_paths.grouped_moe_forward(under, x.to(torch.bfloat16))
        want = exact(x)
        _check(got, naive(x.to(torch.bfloat16)), want)
    assert torch.equal(under.routing.tokens_per_expert.sum(), torch.tensor(15 * 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("config", [{"dim": 64}, {"dim": 64, "unit_offset": True, "cast": "after_weight"},
                                    {"type": "layer", "dim": 64, "bias": True}])
def test_fused_norm_matches_the_reference(dtype, config) -> None:
    exact, naive, under = _blocks("norm", config, dtype)
    x = 3 * torch.randn(4, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        _check(torch_paths.fused_norm_forward(under, x.to(dtype)), naive(x.to(dtype)), exact(x))


# --- on an NVIDIA GPU ---------------------------------------------------------------------------

@needs_cuda
def test_device_facts_timing_and_peak() -> None:
    backend = REG.backend("cuda")
    facts = backend.device_facts("cuda:0")
    assert facts["sm"] >= 75 and facts["compute_capability"].count(".") == 1 and facts["multiprocessors"] > 0
    a = torch.randn(1024, 1024, device="cuda")
    timing = backend.time(lambda: a @ a, "cuda:0", warmup=1, repeat=5)
    assert timing.n == 5 and 0 < timing.median < 1.0
    peak = backend.peak("cuda:0", torch.bfloat16)
    assert peak.flops_per_s > 1e13 and peak.source


DEVICE_CASES = [
    ("attention", {"d_model": 128, "n_heads": 8, "n_kv_heads": 2, "rope": {"theta": 10000.0}}, "sdpa", torch.bfloat16),
    ("attention", {"d_model": 128, "n_heads": 8, "n_kv_heads": 2, "window": 9}, "sdpa", torch.float16),
    ("attention", {"d_model": 128, "n_heads": 8, "n_kv_heads": 2, "softcap": 2.0, "window": 9}, "triton_flash",
     torch.bfloat16),
    ("norm", {"dim": 256}, "fused", torch.bfloat16),
    ("norm", {"dim": 256, "unit_offset": True, "cast": "after_weight"}, "triton_norm", torch.float16),
    ("rope", {"head_dim": 64, "partial": 0.5, "layout": "interleaved"}, "triton_rope", torch.bfloat16),
    ("mlp", {"d_model": 128, "hidden": 256, "activation": "gelu_tanh"}, "triton_glu", torch.bfloat16),
    ("moe", {"d_model": 128, "n_experts": 8, "top_k": 2, "hidden": 64}, "grouped", torch.bfloat16),
    ("moe", {"d_model": 128, "n_experts": 8, "top_k": 2, "hidden": 64}, "triton_moe", torch.float16),
]


@needs_cuda
@pytest.mark.parametrize(("kind", "config", "impl", "dtype"), DEVICE_CASES,
                         ids=[f"{c[2]}-{c[0]}-{str(c[3])[6:]}" for c in DEVICE_CASES])
def test_impl_on_the_device_matches_the_float64_reference(kind, config, impl, dtype) -> None:
    exact, naive, under = _blocks(kind, config, dtype)
    target = REG.target("cuda", device="cuda:0", dtype=dtype)
    chosen = REG.impl(f"{kind}@1", f"cuda.{impl}")
    assert chosen.reasons(under.config, REG.kind(kind).required_features(under.config), target) == []
    under = under.to("cuda:0")
    under.bind(chosen, target)
    g = torch.Generator().manual_seed(5)
    if kind == "rope":
        args = (torch.randn(2, 4, 33, 64, generator=g, dtype=torch.float64), torch.arange(33).expand(2, -1))
    elif kind in ("attention",):
        args = (torch.randn(2, 33, config["d_model"], generator=g, dtype=torch.float64), torch.arange(33))
    else:
        width = config.get("dim", config.get("d_model"))
        args = (torch.randn(2, 33, width, generator=g, dtype=torch.float64),)
    low = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        got = under(*(a.to("cuda:0") for a in low))
        assert got.device.type == "cuda"
        _check(got.cpu(), naive(*low), exact(*args))


@needs_cuda
@pytest.mark.parametrize("preset", ["tiny-llama-3-8b", "tiny-mistral-7b-v0.1"])
def test_a_cuda_graph_of_the_decode_step_generates_the_eager_tokens(preset: str) -> None:
    # fixed-shape cache + CUDAGraph capture and replay (CudaBackend.capture_decode); dense presets,
    # bf16 through the cuda impls; a window shorter than prompt + generated tokens (mistral)
    import llmkit

    with pytest.warns(llmkit.FallbackWarning, match="embedding@1"):  # and head, layer: no cuda impls
        model = llmkit.build(preset, backend="cuda", dtype="bfloat16", seed=3).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    prompts = [ids[0, :21].tolist(), ids[1, :17].tolist()]
    with torch.no_grad():
        want = model.generate(prompts, 12, eos=False)
        got = model.generate(prompts, 12, eos=False, graphs=True)
    assert torch.equal(got, want)

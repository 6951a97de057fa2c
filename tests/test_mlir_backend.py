"""The mlir backend (backends/mlir): block references compiled by torch-mlir and MLIR's ExecutionEngine,
certified under the precision rule, composed into the tiny seed models, and `export_mlir`.

Kernels here are JIT-compiled at LLVM -O0 (the backend's default is -O2): the optimisation level
changes compile time (10-20x) and speed, not what is computed, and the suite compiles ~150 kernels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_mlir", reason="the mlir backend needs torch-mlir (pip install torch-mlir)")

import llmkit  # noqa: E402
from llmkit.certify import certify  # noqa: E402
from llmkit.export_mlir import export_mlir  # noqa: E402
from llmkit.registry import default_registry  # noqa: E402
from llmkit.testing import randomize  # noqa: E402
from llmkit_backend_mlir import backend as mlir_backend  # noqa: E402
from llmkit_backend_mlir import engine  # noqa: E402

REG = default_registry()
MODELS = ["tiny-llama-3-8b", "tiny-mixtral-8x7b", "tiny-grok-1", "tiny-dbrx", "tiny-deepseek-v3"]
KINDS = ["norm@1", "mlp@1", "head@1", "rope@1", "attention@1", "moe@1"]


@pytest.fixture(autouse=True, scope="module")
def fast_jit() -> Iterator[None]:
    saved, engine.OPT_LEVEL = engine.OPT_LEVEL, 0
    yield
    engine.OPT_LEVEL = saved


def test_backend_is_available_and_records_its_toolchain() -> None:
    backend = REG.backend("mlir")
    assert backend.available() == [] and backend.device_type == "cpu"
    facts = backend.device_facts("cpu")
    assert facts["torch_mlir"] == engine.version()
    assert "refback-munge-memref-copy" in facts["lowering"] and "linalg-on-tensors" in facts["to_linalg"]


def test_missing_torch_mlir_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mlir_backend.importlib.util, "find_spec", lambda name: None)
    assert mlir_backend.MlirBackend().available() == ["torch_mlir is not installed (pip install torch-mlir)"]


def test_unclaimed_cases_are_refused_with_reasons() -> None:
    f32 = REG.target("mlir", dtype="float32")
    norm = REG.impl("norm@1", "mlir.linalg")
    norm_config = REG.kind("norm@1").parse_config({"dim": 8})
    assert norm.reasons(norm_config, frozenset(), f32) == []
    for dtype in ("bfloat16", "float16", "float64"):
        reasons = norm.reasons(norm_config, frozenset(), REG.target("mlir", dtype=dtype))
        assert any(f"dtype {dtype} not declared" in r for r in reasons)
    assert any("mode 'train' not declared" in r
               for r in norm.reasons(norm_config, frozenset(), REG.target("mlir", dtype="float32", mode="train")))
    moe = REG.impl("moe@1", "mlir.linalg")
    capped = REG.kind("moe@1").parse_config({"d_model": 8, "n_experts": 4, "top_k": 2, "hidden": 8,
                                             "capacity_factor": 1.0})
    assert any("capacity_factor" in r for r in moe.reasons(capped, frozenset(), f32))
    rope = REG.impl("rope@1", "mlir.linalg")
    dynamic = REG.kind("rope@1").parse_config({"head_dim": 8, "scaling": {
        "type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}})
    assert any("dynamic NTK" in r for r in rope.reasons(dynamic, frozenset(), f32))


def test_certification_passes_every_case_it_runs(tmp_path: Path) -> None:
    """The quick suite in float32 for every kind the backend implements; MoE and attention (the
    slowest to compile) are certified here too, so every impl has run and passed."""
    cert = certify(REG, "mlir", out=tmp_path / "cert.json", quick=True, perf=False, dtypes=["float32"],
                   modes=["infer"], blocks=[k.split("@")[0] for k in KINDS])
    failed = [(c.id, c.reasons) for c in cert.cases if c.status != "pass"]
    assert not failed, failed
    assert {c.kind for c in cert.cases} == set(KINDS)
    assert all(c.impl == "mlir.linalg" and c.calls >= 1 for c in cert.cases)


@pytest.mark.parametrize("preset", MODELS)
def test_tiny_model_matches_the_reference_through_prefill_and_decode(preset: str) -> None:
    reference = randomize(llmkit.build(preset, dtype="float32", policy="reference"), seed=7)
    with pytest.warns(llmkit.FallbackWarning):  # embedding, layer (and MLA) have no mlir impl
        model = llmkit.build(preset, backend="mlir", dtype="float32")
    model.load_state_dict(reference.state_dict())
    assert {e.resolution.impl.qualname for e in model.plan.entries if not e.resolution.fallback} == {"mlir.linalg"}
    ids = torch.randint(0, reference.spec.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    caches = reference.new_cache(), model.new_cache()
    with torch.no_grad():
        for step in (ids[:, :7], ids[:, 7:8], ids[:, 8:9], ids[:, 9:10]):
            want, got = reference(step, cache=caches[0]), model(step, cache=caches[1])
            assert (got - want).abs().max().item() < 1e-4


def test_kernels_are_compiled_once_and_then_serve_every_prompt_length() -> None:
    """The first length compiles static kernels, a second one dynamic kernels (the token dim
    symbolic); after that neither a seen nor a new length compiles anything."""
    with pytest.warns(llmkit.FallbackWarning):
        model = llmkit.build("tiny-llama-3-8b", backend="mlir", dtype="float32")
    with torch.no_grad():
        for length in (6, 11):
            model(torch.zeros(3, length, dtype=torch.long))
        compiled = engine.CACHE.stats.compiles
        for length in (6, 11, 4, 9, 30):
            model(torch.ones(3, length, dtype=torch.long))
    assert engine.CACHE.stats.compiles == compiled


def test_export_mlir_writes_parseable_torch_and_linalg_that_computes_the_logits(tmp_path: Path) -> None:
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d

    model = randomize(llmkit.build("tiny-llama-3-8b", dtype="float32", policy="reference"), seed=2)
    texts = {}
    for stage in ("torch", "linalg"):
        path = export_mlir(model, tmp_path / f"model.{stage}.mlir", stage=stage)
        texts[stage] = path.read_text()
        context = ir.Context()
        torch_d.register_dialect(context)
        ir.Module.parse(texts[stage], context)
    assert "torch.aten." in texts["torch"]
    assert "linalg." in texts["linalg"]
    assert not re.search(r"torch\.(aten|prim|vtensor|constant)|!torch\.", texts["linalg"])
    assert re.search(r"func\.func @main\(%arg0: tensor<1x\?xi64>\) -> tensor<1x\?x256xf32>", texts["linalg"])
    # the linalg file is a program: lowered by the backend's pipeline, it computes the model's logits
    context = ir.Context()
    torch_d.register_dialect(context)
    kernel = engine.compile_linalg(ir.Module.parse(texts["linalg"], context))
    for length in (3, 9):
        ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            want = model(ids)
        (got,) = kernel(ids)
        assert (got - want).abs().max().item() < 1e-4


def test_export_mlir_rejects_an_unknown_stage(tmp_path: Path) -> None:
    model = llmkit.build("tiny-llama-3-8b", dtype="float32", policy="reference")
    with pytest.raises(llmkit.LlmkitError, match="unknown stage 'tosa'"):
        export_mlir(model, tmp_path / "m.mlir", stage="tosa")
    assert not (tmp_path / "m.mlir").exists()


@pytest.mark.parametrize("preset", ["tiny-mixtral-8x7b", "tiny-deepseek-v3"])
def test_export_mlir_of_a_moe_model_is_upstream_linalg_and_computes_its_logits(tmp_path: Path, preset: str) -> None:
    """Routing (top-k, DeepSeek's group limit) and the dense MoE form leave no torch-mlir-only ops
    (tm_tensor): the text parses in a context knowing only upstream dialects, and it computes the
    reference's logits."""
    from torch_mlir import ir

    model = randomize(llmkit.build(preset, dtype="float32", policy="reference"), seed=3)
    text = export_mlir(model, tmp_path / "moe.mlir", stage="linalg").read_text()
    assert "tm_tensor" not in text
    kernel = engine.compile_linalg(ir.Module.parse(text, ir.Context()))
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(ids)
    (got,) = kernel(ids)
    assert (got - want).abs().max().item() < 1e-4


def test_cli_export_mlir_writes_the_requested_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmkit.cli import main

    # the CLI's plumbing (source, --random-weights, --stage); the MoE exports are checked above
    out = tmp_path / "llama.mlir"
    assert main(["export", "mlir", "tiny-llama-3-8b", "--out", str(out), "--random-weights", "--stage", "torch"]) == 0
    assert "(torch stage)" in capsys.readouterr().out
    text = out.read_text()
    assert "torch.aten." in text and "func.func @main" in text

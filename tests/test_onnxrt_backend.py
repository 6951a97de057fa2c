"""The onnxrt backend: block references exported to ONNX and run by onnxruntime.

Its attention impl passes the quick certification (float32, inference); tiny models of five
families built on it give the reference's logits and MoE routing on the same weights, through
prefill and decode over the cache; one exported session serves every batch size and length;
exported graphs are cached on disk and a second build loads them instead of exporting again; what
it cannot do is refused with reasons. Exports take about a second each, so the tests share
configs (and so graphs) where they can: the whole module runs in about a minute.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnxrt backend needs onnxruntime (pip install onnxruntime)")

import llmkit  # noqa: E402
from llmkit import Block, FallbackWarning, Registry, ResolutionError  # noqa: E402
from llmkit.cache import LayerCache  # noqa: E402
from llmkit.certify import certify  # noqa: E402
from llmkit.cli import main  # noqa: E402
from llmkit.registry import reference_impl  # noqa: E402
from llmkit.testing import randomize  # noqa: E402
from llmkit_backend_onnxrt import backend as onnxrt_backend  # noqa: E402
from llmkit_backend_onnxrt import graphs  # noqa: E402

WINDOW_ATTENTION = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "window": 5, "rope": {"theta": 10000.0}}
"""certification's first attention edge config (blocks/cases.py)"""


@pytest.fixture(scope="module")
def reg() -> Registry:
    # cpu too: the certification engine scans the presets' block configs on the default backend
    return Registry.load(allow=["blocks", "cpu", "onnxrt"])


def _pair(reg: Registry, kind: str, config: dict, seed: int = 0) -> tuple[Block, Block]:
    """(reference, onnxrt) blocks of one config on the same float32 weights."""
    ref = randomize(Block(reg.kind(kind), config, dtype=torch.float32), seed=seed)
    for m in ref.modules():
        if isinstance(m, Block):
            m.bind(reference_impl(m.kind), reg.target("cpu"))
    under = copy.deepcopy(ref)
    impl = next(i for i in reg.impls_for(reg.kind(kind).id) if i.backend == "onnxrt")
    under.bind(impl, reg.target("onnxrt"))
    return ref, under


def test_certification_of_attention_passes(reg: Registry, tmp_path: Path) -> None:
    # every case exports graphs (one to four seconds each here), so this test certifies the impl with
    # logic of its own, the KV cache between two sessions, on the quick suite (presets, window and
    # soft-cap edges, decode over the cache); the models below exercise the other impls, and
    # `llmkit certify --backend onnxrt` certifies all of them
    cert = certify(reg, "onnxrt", out=tmp_path / "cert.json", quick=True, perf=False, dtypes=["float32"],
                   modes=["infer"], blocks=["attention"])
    failed = [(c.id, c.reasons) for c in cert.cases if c.status == "fail"]
    assert not failed and cert.summary.failed == 0
    assert {(c.kind, c.impl, c.status) for c in cert.cases} == {("attention@1", "onnxrt.session", "pass")}
    assert all(c.calls for c in cert.cases)  # the impl itself ran: no silent fallback
    edges = {c.origin for c in cert.cases if c.suite == "edge"}
    assert {"edge: window 5 edges", "edge: soft-cap 30", "edge: soft-cap + window"} <= edges
    assert any(c.shape["context"] for c in cert.cases)  # decode over a cache


@pytest.mark.parametrize("preset", ["tiny-llama-3-8b", "tiny-mixtral-8x7b", "tiny-grok-1", "tiny-dbrx",
                                    "tiny-deepseek-v3"])
def test_model_matches_reference_build_through_prefill_and_decode(reg: Registry, preset: str) -> None:
    with pytest.warns(FallbackWarning, match="layer@1"):
        model = llmkit.build(preset, backend="onnxrt", dtype="float32", registry=reg)
    ref = randomize(llmkit.build(preset, dtype="float32", policy="reference", registry=reg), seed=3)
    model.load_state_dict(ref.state_dict())  # weights are graph inputs: loading after the build is enough
    assert {e.resolution.kind for e in model.plan.fallbacks} <= {"layer@1", "mla@1"}  # kinds without an impl
    ids = torch.randint(0, ref.spec.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    caches = model.new_cache(), ref.new_cache()
    with torch.no_grad():
        for step in (ids[:, :8], ids[:, 8:9], ids[:, 9:10], ids[:, 10:]):
            got, want = model(step, cache=caches[0]), ref(step, cache=caches[1])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            routes = [(a.routing.selected, b.routing.selected) for a, b in zip(model.modules(), ref.modules())
                      if isinstance(a, Block) and a.kind.name == "moe"]
            assert all(torch.equal(a, b) for a, b in routes)
    assert len(caches[0][0]) == 11


def test_one_session_serves_every_batch_size_and_length(reg: Registry) -> None:
    # configs the tests above export too (certification's window edge, tiny-llama's final norm and
    # tiny-grok-1's RoPE): run alone, this test exports them itself
    ref, under = _pair(reg, "attention@1", WINDOW_ATTENTION, seed=1)
    sessions = dict(under._onnxrt)
    caches = LayerCache(), LayerCache()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for b, t in ((2, 3), (1, 7), (3, 1)):
            x = torch.randn(b, t, 64, generator=g)
            torch.testing.assert_close(under(x, torch.arange(t)), ref(x, torch.arange(t)), atol=1e-5, rtol=0)
        # prefill, one decode step, then a chunk of 7 over the cache, past the window of 5
        x = torch.randn(2, 11, 64, generator=g)
        pos = torch.arange(11).expand(2, 11)
        for s in (slice(0, 3), slice(3, 4), slice(4, 11)):
            got, want = under(x[:, s], pos[:, s], caches[0]), ref(x[:, s], pos[:, s], caches[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert under._onnxrt == sessions  # no session was added or replaced along the way

    llama = llmkit.build("tiny-llama-3-8b", device="meta", policy="reference", registry=reg)
    grok = llmkit.build("tiny-grok-1", device="meta", policy="reference", registry=reg)
    rope_ref, rope = _pair(reg, "rope@1", grok.layers[0].attention.rope.config)
    with torch.no_grad():
        for heads, t in ((4, 3), (2, 7), (4, 1)):  # q and k of one layer have different head counts
            x = torch.randn(2, heads, t, 16, generator=g)
            pos = torch.arange(100, 100 + t).expand(2, t)
            torch.testing.assert_close(rope(x, pos), rope_ref(x, pos), atol=1e-6, rtol=0)
        norm_ref, norm = _pair(reg, "norm@1", llama.norm.config, seed=4)
        for shape in ((3, 64), (2, 5, 64), (2, 4, 3, 64)):  # any leading dims: rows are flattened
            x = torch.randn(*shape, generator=g)
            torch.testing.assert_close(norm(x), norm_ref(x), atol=1e-6, rtol=0)


def test_second_build_loads_the_cached_graph_instead_of_exporting(reg: Registry, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(graphs, "_RUNNERS", type(graphs._RUNNERS)())  # a fresh process, as far as sessions go
    config = {"type": "layer", "dim": 24, "bias": True, "eps": 1e-5}
    ref, first = _pair(reg, "norm@1", config)
    path = first._onnxrt["norm"].path
    assert list((tmp_path / "llmkit" / "onnxrt").iterdir()) == [path]  # no temporary file left behind
    written = path.stat().st_mtime_ns

    graphs.clear_memory()

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the graph is cached on disk")

    export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", no_export)
    second = copy.deepcopy(ref)
    second.bind(first.impl, reg.target("onnxrt"))
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(second(x), first(x), atol=0, rtol=0)
    torch.testing.assert_close(second(x), ref(x), atol=1e-5, rtol=0)
    assert path.stat().st_mtime_ns == written

    # an unreadable cache entry is exported again (with a warning), not trusted
    monkeypatch.setattr(torch.onnx, "export", export)
    graphs.clear_memory()
    path.write_bytes(b"not an onnx model")
    third = copy.deepcopy(ref)
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        third.bind(first.impl, reg.target("onnxrt"))
    torch.testing.assert_close(third(x), ref(x), atol=1e-5, rtol=0)
    assert third._onnxrt["norm"].path == path and path.read_bytes() != b"not an onnx model"


def test_unsupported_configs_are_refused_with_reasons(reg: Registry) -> None:
    norm = reg.impl("norm@1", "onnxrt.session")
    cfg = reg.kind("norm@1").parse_config({"dim": 8})
    reasons = norm.reasons(cfg, frozenset(), reg.target("onnxrt", dtype="bfloat16"))
    assert any("not declared" in r for r in reasons) and any("numpy has no bfloat16" in r for r in reasons)
    assert any("mode 'train'" in r for r in norm.reasons(cfg, frozenset(), reg.target("onnxrt", mode="train")))

    moe = reg.kind("moe@1").parse_config({"d_model": 8, "n_experts": 4, "top_k": 2, "hidden": 8,
                                          "capacity_factor": 1.0})
    assert any("capacity_factor" in r for r in reg.impl("moe@1", "onnxrt.dense").reasons(
        moe, frozenset(), reg.target("onnxrt")))
    rope = reg.kind("rope@1").parse_config({"head_dim": 16, "scaling": {
        "type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}})
    assert any("max(positions)" in r for r in reg.impl("rope@1", "onnxrt.session").reasons(
        rope, frozenset(), reg.target("onnxrt")))

    with pytest.raises(ResolutionError, match="numpy has no bfloat16"):
        llmkit.build("tiny-llama-3-8b", backend="onnxrt", dtype="bfloat16", strict=True, registry=reg)


def test_planning_on_meta_exports_nothing(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("planning must not export"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        model = llmkit.build("tiny-mixtral-8x7b", backend="onnxrt", device="meta", dtype="float32", registry=reg)
    assert model.plan.entries[0].resolution.impl.qualname == "onnxrt.session"
    with pytest.raises(llmkit.LlmkitError, match="meta device"):
        model.embedding._onnxrt["embedding"]


def test_backend_reports_providers_and_missing_packages(reg: Registry, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime

    b = reg.backend("onnxrt")
    facts = b.device_facts("cpu")
    assert facts["onnxruntime"] == onnxruntime.__version__
    assert facts["providers"][-1] == "CPUExecutionProvider"
    assert set(facts["providers"]) <= set(facts["available_providers"])
    # `llmkit info` reports what was detected
    assert main(["info"]) == 0
    assert "providers: " + ", ".join(facts["providers"]) in capsys.readouterr().out

    monkeypatch.setenv(onnxrt_backend.PROVIDERS_ENV, "cpu")
    assert b.available() == [] and onnxrt_backend.providers() == ("CPUExecutionProvider",)
    monkeypatch.setenv(onnxrt_backend.PROVIDERS_ENV, "NoSuchExecutionProvider")
    assert any("NoSuchExecutionProvider" in r for r in b.available())
    monkeypatch.delenv(onnxrt_backend.PROVIDERS_ENV)

    real = onnxrt_backend.importlib.util.find_spec
    monkeypatch.setattr(onnxrt_backend.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    onnxrt_backend.missing_packages.cache_clear()
    try:
        assert b.available() == ["onnxruntime is not installed (pip install onnxruntime)"]
    finally:
        monkeypatch.undo()
        onnxrt_backend.missing_packages.cache_clear()
    assert b.available() == [] and os.environ.get(onnxrt_backend.PROVIDERS_ENV) is None

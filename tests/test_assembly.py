"""Binding impls into a module tree, the dispatch plan, and the zero-cost forward path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pluggy
import pytest
import torch
from rich.console import Console

import llmkit
import llmkit.kinds
import llmkit.plugins
import llmkit.registry
import llmkit.resolve
from llmkit import Block, FallbackWarning, LlmkitError, Registry, ResolutionError, Selection, assemble
from llmkit.testing import ResidualMLPLM

IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))


def _build(registry: Registry, backend: str = "testvendor", selection: Selection | None = None, **kw):
    model = ResidualMLPLM(registry, generator=torch.Generator().manual_seed(1), **kw)
    with pytest.warns(FallbackWarning, match="fall back from backend"):
        plan = assemble(model, registry.target(backend), selection, registry=registry)
    return model, plan


def test_vendor_impls_run_and_match_the_reference(vendor_registry: Registry, vendor) -> None:
    model, plan = _build(vendor_registry)
    assert plan.counts() == {"reference.eager": 2, "testvendor.rmsnorm": 3, "testvendor.swiglu": 2}
    out = model(IDS)
    assert vendor.CALLS == {"rmsnorm": 3, "swiglu": 2}
    ref = ResidualMLPLM(vendor_registry)
    ref.load_state_dict(model.state_dict())
    assemble(ref, vendor_registry.target("cpu"), Selection(policy="reference"), registry=vendor_registry)
    torch.testing.assert_close(out, ref(IDS), rtol=1e-6, atol=1e-6)


def test_forward_runs_no_registry_resolution_or_pluggy_code(vendor_registry: Registry, vendor) -> None:
    model, _ = _build(vendor_registry)
    watched = {Path(m.__file__) for m in (llmkit.registry, llmkit.resolve, llmkit.plugins, llmkit.kinds)}
    pluggy_dir = Path(pluggy.__file__).parent
    seen: list[str] = []

    def profiler(frame, event, arg):
        if event == "call":
            path = Path(frame.f_code.co_filename)
            if path in watched or pluggy_dir in path.parents:
                seen.append(f"{path.name}:{frame.f_code.co_name}")

    sys.setprofile(profiler)
    try:
        model(IDS)
    finally:
        sys.setprofile(None)
    assert seen == []
    assert vendor.CALLS["rmsnorm"] == 3  # the forward did run the vendor's code
    # test of the test: the same profiler does see resolution and plugin loading
    sys.setprofile(profiler)
    try:
        Registry.load(allow=["blocks"]).resolve("norm", {"dim": 8}, vendor_registry.target("cpu"))
    finally:
        sys.setprofile(None)
    assert any(s.startswith("resolve.py:resolve") for s in seen)
    assert any(s.startswith("plugins.py:") for s in seen)


def test_forward_survives_a_resolver_that_raises(vendor_registry: Registry, monkeypatch) -> None:
    model, _ = _build(vendor_registry)
    expected = model(IDS)

    def boom(*a, **k):
        raise AssertionError("resolution ran during forward")

    monkeypatch.setattr(llmkit.registry.Registry, "resolve", boom)
    monkeypatch.setattr(llmkit.resolve, "resolve", boom)
    monkeypatch.setattr(llmkit.Impl, "reasons", boom)
    monkeypatch.setattr(pluggy.PluginManager, "subset_hook_caller", boom)
    torch.testing.assert_close(model(IDS), expected, rtol=0, atol=0)


def test_prepare_runs_once_at_build_time(vendor_registry: Registry, vendor) -> None:
    model, _ = _build(vendor_registry, n_layers=3)
    assert vendor.PREPARED["swiglu"] == 3
    model(IDS)
    model(IDS)
    assert vendor.PREPARED["swiglu"] == 3


def test_state_dict_does_not_depend_on_the_backend(vendor_registry: Registry) -> None:
    model, _ = _build(vendor_registry)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(IDS)
    assemble(model, vendor_registry.target("cpu"), Selection(policy="reference"), registry=vendor_registry)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.layers[0].norm.impl.qualname == "reference.eager"
    torch.testing.assert_close(model(IDS), out, rtol=1e-6, atol=1e-6)


def test_a_failed_assembly_leaves_the_model_as_it_was(vendor_registry: Registry) -> None:
    model, _ = _build(vendor_registry)
    strict = Selection(policy="strict")  # embedding/head have no testvendor impl
    with pytest.raises(ResolutionError, match=r"^embedding: policy 'strict': embedding@1 would fall back"):
        assemble(model, vendor_registry.target("testvendor"), strict, registry=vendor_registry)
    assert model.layers[0].norm.impl.qualname == "testvendor.rmsnorm"


def test_a_failing_prepare_names_the_block_and_binds_nothing(vendor_registry: Registry, vendor) -> None:
    model, _ = _build(vendor_registry)
    assemble(model, vendor_registry.target("cpu"), Selection(policy="reference"), registry=vendor_registry)

    def bad_prepare(block, target):
        raise RuntimeError("out of kernel memory")

    impl = vendor_registry.impl("mlp@1", "testvendor.swiglu")
    object.__setattr__(impl, "prepare", bad_prepare)  # Impl is frozen; restored below
    try:
        with pytest.raises(LlmkitError, match="layers.0.mlp: prepare of testvendor.swiglu failed: RuntimeError: out of kernel memory"):
            assemble(model, vendor_registry.target("testvendor"), registry=vendor_registry)
    finally:
        object.__setattr__(impl, "prepare", vendor.swiglu_prepare)
    assert {m.impl.qualname for m in model.modules() if isinstance(m, Block)} == {"reference.eager"}


def test_unbound_block_says_how_to_bind(registry: Registry) -> None:
    block = Block(registry.kind("norm"), {"dim": 4})
    with pytest.raises(LlmkitError, match="norm@1 has no impl bound; build the model through llmkit"):
        block(torch.ones(4))


def test_model_without_blocks_is_an_error(registry: Registry) -> None:
    with pytest.raises(LlmkitError, match="Linear contains no llmkit Block"):
        assemble(torch.nn.Linear(2, 2), registry.target("cpu"), registry=registry)


def test_plan_json_lists_every_block_with_rejections(vendor_registry: Registry) -> None:
    _, plan = _build(vendor_registry, n_layers=2)
    data = json.loads(plan.to_json())
    assert data["target"]["backend"] == "testvendor"
    assert [b["path"] for b in data["blocks"]] == [
        "embedding", "layers.0.norm", "layers.0.mlp", "layers.1.norm", "layers.1.mlp", "norm", "head"]
    first = data["blocks"][1]
    assert (first["layer"], first["block"], first["impl"]) == (0, "norm", "testvendor.rmsnorm")
    assert {"impl": "reference.eager", "reasons": []} not in first["rejected"]
    emb = data["blocks"][0]
    assert emb["fallback"] and emb["reason"] == "fallback: backend 'testvendor' has no impl of embedding@1"
    assert data["summary"] == {"blocks": 7, "fallbacks": 2,
                               "impls": {"reference.eager": 2, "testvendor.rmsnorm": 3, "testvendor.swiglu": 2}}


def test_plan_table_groups_layers_and_shows_rejected_candidates(vendor_registry: Registry) -> None:
    _, plan = _build(vendor_registry, n_layers=4, selection=Selection.make(deny=["norm=testvendor.rmsnorm"]))
    console = Console(width=250, record=True)
    plan.print(console)
    text = console.export_text()
    rows = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    cells = [[c.strip() for c in row] for row in rows]
    chosen = [c[:4] for c in cells if len(c) == 5]
    assert chosen == [
        ["-", "embedding", "embedding@1", "reference.eager"],
        ["0-3", "norm", "norm@1", "testvendor.rmsnorm_lowp"],
        ["0-3", "mlp", "mlp@1", "testvendor.swiglu"],
        ["-", "norm", "norm@1", "testvendor.rmsnorm_lowp"],
        ["-", "head", "head@1", "reference.eager"],
    ]
    assert "denied (norm=testvendor.rmsnorm)" in text
    assert text.count("layers.") == 0  # paths are shown as layer ranges + slot


def test_meta_device_builds_and_plans_without_allocating(vendor_registry: Registry) -> None:
    model = ResidualMLPLM(vendor_registry, device="meta", d_model=4096, hidden=14336, vocab_size=128256)
    with pytest.warns(FallbackWarning):
        plan = assemble(model, vendor_registry.target("testvendor", device="meta"), registry=vendor_registry)
    assert all(p.is_meta for p in model.parameters())
    assert plan.impl_of("layers.1.mlp") == "testvendor.swiglu"


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_copies_call_their_own_parameters(registry: Registry, how: str) -> None:
    import copy
    import pickle

    model = ResidualMLPLM(registry, generator=torch.Generator().manual_seed(3))
    assemble(model, registry.target("cpu"), Selection(policy="reference"), registry=registry)
    expected = model(IDS)
    clone = {"deepcopy": copy.deepcopy, "copy": copy.copy,
             "pickle": lambda m: pickle.loads(pickle.dumps(m))}[how](model)
    torch.testing.assert_close(clone(IDS), expected, rtol=0, atol=0)
    if how != "copy":  # a shallow copy shares its submodules by definition
        with torch.no_grad():
            clone.norm.weight.mul_(2.0)
        assert not torch.equal(clone(IDS), expected)
        torch.testing.assert_close(model(IDS), expected, rtol=0, atol=0)
    assert clone.norm.forward.__self__ is clone.norm


def test_layer_ranges_are_compacted() -> None:
    from llmkit.plan import _compact

    assert _compact([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _compact([3]) == "3"
    assert _compact([]) == "-"

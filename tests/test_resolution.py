"""Eligibility, ordering, pins, denials and policies of resolution."""

from __future__ import annotations

from itertools import permutations

import pytest
import torch

from llmkit import (
    FallbackWarning,
    Impl,
    LlmkitError,
    Registry,
    ResolutionError,
    Selection,
    UnknownNameError,
    assemble,
)
from llmkit.hookspecs import hookimpl
from llmkit.impls import Range
from llmkit.testing import ResidualMLPLM


def _explain(registry: Registry, kind: str, config: dict, backend: str = "testvendor", *,
             selection: Selection | None = None, **target_kw):
    return registry.resolve(kind, config, registry.target(backend, **target_kw), selection)


def _reasons(res, impl: str) -> str:
    return "; ".join(next(r.reasons for r in res.rejected if r.impl == impl))


def test_vendor_impl_is_chosen_by_priority_when_eligible(vendor_registry: Registry) -> None:
    res = _explain(vendor_registry, "norm", {"dim": 64})
    assert res.impl.qualname == "testvendor.rmsnorm"
    assert not res.fallback
    assert res.eligible == ("testvendor.rmsnorm", "testvendor.rmsnorm_lowp", "reference.eager")
    assert res.reason == "priority 10, ahead of testvendor.rmsnorm_lowp"


@pytest.mark.parametrize(
    ("config", "target_kw", "impl", "reason"),
    [
        ({"dim": 60}, {}, "testvendor.rmsnorm", "dim=60 is not a multiple of 8"),
        ({"dim": 16384}, {}, "testvendor.rmsnorm", "dim=16384 is above the maximum 8192"),
        ({"dim": 64}, {"dtype": "bfloat16"}, "testvendor.rmsnorm",
         "dtype bfloat16 not declared (declares ['float32', 'float64'])"),
        ({"dim": 64}, {"mode": "train"}, "testvendor.rmsnorm_lowp",
         "mode 'train' not declared (declares ['infer'])"),
        ({"dim": 64, "unit_offset": True}, {}, "testvendor.rmsnorm",
         "config needs feature(s) ['unit_offset'], not declared"),
        ({"dim": 64, "cast": "after_weight"}, {}, "testvendor.rmsnorm",
         "config needs feature(s) ['cast_after_weight'], not declared"),
        ({"dim": 64, "type": "layer"}, {}, "testvendor.rmsnorm",
         "config needs feature(s) ['cast_after_weight', 'layernorm'], not declared"),
    ],
)
def test_ineligible_impls_are_rejected_with_the_right_reason(
    vendor_registry: Registry, config, target_kw, impl, reason
) -> None:
    res = _explain(vendor_registry, "norm", config, **target_kw)
    assert reason in _reasons(res, impl)
    assert res.impl.qualname != impl


def test_low_precision_target_picks_the_impl_that_declares_it(vendor_registry: Registry) -> None:
    res = _explain(vendor_registry, "norm", {"dim": 64}, dtype="bfloat16")
    assert res.impl.qualname == "testvendor.rmsnorm_lowp"


def test_combined_conditions_come_from_not_supported_reasons(vendor_registry: Registry) -> None:
    res = _explain(vendor_registry, "mlp", {"d_model": 64, "hidden": 8192}, mode="train")
    assert "training needs hidden <= 4096 (config has 8192)" in _reasons(res, "testvendor.swiglu")
    assert res.impl.qualname == "reference.eager" and res.fallback


def test_device_facts_are_injected_not_read_from_the_machine(vendor_registry: Registry) -> None:
    cfg = {"d_model": 64, "hidden": 128}
    assert _explain(vendor_registry, "mlp", cfg).impl.qualname == "testvendor.swiglu"
    res = _explain(vendor_registry, "mlp", cfg, facts={"generation": 1})
    assert "needs a generation >= 2 device (target has generation 1)" in _reasons(res, "testvendor.swiglu")
    # planning on meta needs no hardware, and facts may describe a device that is not here
    res = _explain(vendor_registry, "mlp", cfg, device="meta", facts={"generation": 3})
    assert res.impl.qualname == "testvendor.swiglu"


def test_impls_of_other_backends_are_rejected(vendor_registry: Registry) -> None:
    res = _explain(vendor_registry, "norm", {"dim": 64}, backend="cpu")
    assert _reasons(res, "testvendor.rmsnorm") == "belongs to backend 'testvendor', target is 'cpu'"
    assert res.impl.qualname == "cpu.fused"
    res = _explain(vendor_registry, "embedding", {"vocab_size": 10, "d_model": 8}, backend="cpu")
    assert res.impl.qualname == "reference.eager"
    assert res.reason == "fallback: backend 'cpu' has no impl of embedding@1"


def test_device_type_is_checked_against_the_target(vendor_registry: Registry) -> None:
    class Cuda(__import__("llmkit").Backend):
        name, device_type = "fakecuda", "cuda"

    class Plugin:
        LLMKIT_PLUGIN_API = 1

        @hookimpl
        def llmkit_backends(self):
            return [Cuda()]

        @hookimpl
        def llmkit_impls(self):
            import llmkit_testvendor as tv

            return [Impl(kind="norm@1", backend="fakecuda", name="cpu_only", forward=tv.rmsnorm,
                         device_types={"cpu"}, dtypes={"float32"}, features={"rmsnorm", "cast_before_weight"})]

    import llmkit_blocks.plugin

    registry = Registry.load([("blocks", llmkit_blocks.plugin), ("fakecuda", Plugin())], autoload=False)
    res = registry.resolve("norm", {"dim": 64}, registry.target("fakecuda", device="meta"))
    assert "runs on device types ['cpu'], target device type is cuda" in _reasons(res, "fakecuda.cpu_only")


def test_pin_selects_a_lower_priority_impl(vendor_registry: Registry) -> None:
    sel = Selection.make(impl=["norm=testvendor.rmsnorm_lowp"])
    res = _explain(vendor_registry, "norm", {"dim": 64}, selection=sel)
    assert res.impl.qualname == "testvendor.rmsnorm_lowp"
    assert res.reason == "pinned (norm=testvendor.rmsnorm_lowp)"
    assert "not the pinned impl (norm=testvendor.rmsnorm_lowp)" in _reasons(res, "testvendor.rmsnorm")


def test_pin_to_reference_is_not_a_fallback(vendor_registry: Registry) -> None:
    sel = Selection.make(impl={"norm@1": "reference"}, strict=True)
    res = _explain(vendor_registry, "norm", {"dim": 64}, selection=sel)
    assert res.impl.qualname == "reference.eager" and not res.fallback


def test_pin_that_cannot_be_honoured_lists_the_reasons(vendor_registry: Registry) -> None:
    sel = Selection.make(impl=["norm=testvendor.rmsnorm"])
    with pytest.raises(ResolutionError) as err:
        _explain(vendor_registry, "norm", {"dim": 60}, selection=sel, dtype="bfloat16")
    msg = str(err.value)
    assert msg.startswith("cannot honour pin norm=testvendor.rmsnorm for norm@1 on backend 'testvendor'")
    assert "dtype bfloat16 not declared" in msg and "dim=60 is not a multiple of 8" in msg


def test_pin_to_a_backend_without_impls_of_the_kind_says_so(vendor_registry: Registry) -> None:
    sel = Selection.make(impl=["embedding=testvendor"])
    with pytest.raises(ResolutionError, match="no impl of embedding@1 matches 'testvendor'"):
        _explain(vendor_registry, "embedding", {"vocab_size": 8, "d_model": 4}, selection=sel)


def test_denial_of_an_impl_or_a_whole_backend(vendor_registry: Registry) -> None:
    sel = Selection.make(deny=["norm=testvendor.rmsnorm"])
    res = _explain(vendor_registry, "norm", {"dim": 64}, selection=sel)
    assert res.impl.qualname == "testvendor.rmsnorm_lowp"
    assert _reasons(res, "testvendor.rmsnorm") == "denied (norm=testvendor.rmsnorm)"
    sel = Selection.make(deny={"norm": ["testvendor"]})
    assert _explain(vendor_registry, "norm", {"dim": 64}, selection=sel).impl.qualname == "reference.eager"


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        (Selection.make(impl=["nrm=cpu"]), "unknown block kind 'nrm'; valid: attention, attention@1, embedding, embedding@1, head, head@1, layer, layer@1, mla, mla@1, mlp, mlp@1, moe, moe@1, norm, norm@1, rope, rope@1; did you mean 'norm'?"),
        (Selection.make(impl=["norm=testvendor.rmsnrm"]), "unknown impl of norm@1 'testvendor.rmsnrm' (in --impl norm=testvendor.rmsnrm); valid: cpu, cpu.fused, reference, reference.eager, testvendor, testvendor.rmsnorm, testvendor.rmsnorm_lowp; did you mean 'testvendor.rmsnorm'?"),
        (Selection.make(deny=["norm=tstvendor"]), "unknown backend 'tstvendor'; valid: cpu, testvendor; did you mean 'testvendor'?"),
    ],
)
def test_unknown_names_in_pins_list_valid_names_and_closest(vendor_registry: Registry, selection, message) -> None:
    with pytest.raises(UnknownNameError) as err:
        vendor_registry.check_selection(selection)
    assert str(err.value) == message


@pytest.mark.parametrize("bad", [["norm"], ["=cpu"], ["norm="]])
def test_malformed_pin_is_an_error(bad) -> None:
    with pytest.raises(LlmkitError, match="--impl expects KIND=IMPL"):
        Selection.make(impl=bad)


def test_two_pins_for_one_kind_is_an_error() -> None:
    with pytest.raises(LlmkitError, match=r"more than one pin for block kind\(s\) \['norm'\]"):
        Selection.make(impl=["norm=cpu", "norm=reference"])


def test_policy_reference_uses_only_reference_impls(vendor_registry: Registry) -> None:
    res = _explain(vendor_registry, "norm", {"dim": 64}, selection=Selection(policy="reference"))
    assert res.impl.qualname == "reference.eager" and not res.fallback
    assert _reasons(res, "testvendor.rmsnorm") == "policy 'reference' runs reference impls only"


def test_policy_strict_turns_a_fallback_into_an_error(vendor_registry: Registry) -> None:
    sel = Selection(policy="strict")
    assert _explain(vendor_registry, "norm", {"dim": 64}, selection=sel).impl.qualname == "testvendor.rmsnorm"
    with pytest.raises(ResolutionError) as err:
        _explain(vendor_registry, "norm", {"dim": 60, "unit_offset": True}, selection=sel)
    assert "policy 'strict': norm@1 would fall back to reference.eager" in str(err.value)
    assert "testvendor.rmsnorm: config needs feature(s) ['unit_offset'], not declared; dim=60 is not a multiple of 8" in str(err.value)
    assert "testvendor.rmsnorm_lowp: config needs feature(s) ['unit_offset']" in str(err.value)
    with pytest.raises(ResolutionError, match="backend 'testvendor' registers no impl of head@1"):
        _explain(vendor_registry, "head", {"d_model": 8, "vocab_size": 8}, selection=sel)


def test_resolution_is_cached_per_config_and_target(vendor_registry: Registry, monkeypatch) -> None:
    import llmkit.registry

    calls = []
    real = llmkit.registry.resolve
    monkeypatch.setattr(llmkit.registry, "resolve", lambda *a: calls.append(1) or real(*a))
    t = vendor_registry.target("testvendor")
    first = vendor_registry.resolve("norm", {"dim": 64}, t)
    assert vendor_registry.resolve("norm@1", {"dim": 64, "eps": 1e-6}, t) is first
    vendor_registry.resolve("norm", {"dim": 64}, vendor_registry.target("testvendor", dtype="bfloat16"))
    vendor_registry.resolve("norm", {"dim": 72}, t)
    assert len(calls) == 3


class _OtherVendor:
    """Adds an impl to the testvendor backend with the same priority as testvendor.rmsnorm."""

    LLMKIT_PLUGIN_API = 1

    @hookimpl
    def llmkit_impls(self):
        import llmkit_testvendor as tv

        return [Impl(kind="norm@1", backend="testvendor", name="aaa_norm", forward=tv.rmsnorm,
                     device_types={"cpu"}, dtypes={"float32"}, priority=10,
                     features={"rmsnorm", "cast_before_weight"})]


def test_plan_does_not_depend_on_plugin_order(with_plugins) -> None:
    import llmkit_backend_cpu
    import llmkit_blocks.plugin
    import llmkit_testvendor

    plugins = [("blocks", llmkit_blocks.plugin), ("cpu", llmkit_backend_cpu),
               ("testvendor", llmkit_testvendor), ("other", _OtherVendor())]
    plans = set()
    for order in permutations(plugins):
        registry = Registry.load(list(order), autoload=False)
        model = ResidualMLPLM(registry, n_layers=3)
        with pytest.warns(FallbackWarning):
            plan = assemble(model, registry.target("testvendor"), registry=registry)
        plans.add(plan.to_json())
    assert len(plans) == 1
    # equal priority: the name decides, never the load order
    assert '"impl": "testvendor.aaa_norm"' in plans.pop()


def test_target_rejects_a_device_of_another_type(vendor_registry: Registry) -> None:
    with pytest.raises(LlmkitError, match="device 'cuda:0' does not belong to backend 'cpu'"):
        vendor_registry.target("cpu", device="cuda:0")


def test_reference_is_a_policy_not_a_device_backend(vendor_registry: Registry) -> None:
    with pytest.raises(LlmkitError, match="not a device backend.*policy 'reference'"):
        vendor_registry.target("reference")


def test_range_constraint_messages() -> None:
    r = Range(min=1, max=256, multiple_of=8, one_of=(64, 128))
    assert r.violations("head_dim", 128) == []
    assert r.violations("head_dim", 300) == [
        "head_dim=300 is not one of [64, 128]", "head_dim=300 is above the maximum 256",
        "head_dim=300 is not a multiple of 8"]
    assert r.violations("head_dim", 0.5)[-1] == "head_dim=0.5 is not a multiple of 8"


def test_unavailable_backend_is_an_error_with_reasons(registry: Registry) -> None:
    class Gone(__import__("llmkit").Backend):
        name, device_type = "gone", "xpu"

        def available(self):
            return ["no XPU device found", "driver 1.2 too old"]

    class Plugin:
        LLMKIT_PLUGIN_API = 1

        @hookimpl
        def llmkit_backends(self):
            return [Gone()]

    reg = Registry.load([("gone", Plugin())], autoload=False)
    with pytest.raises(LlmkitError, match="backend 'gone' is unavailable here: no XPU device found; driver 1.2 too old"):
        reg.target("gone")
    assert reg.target("gone", device="meta", dtype=torch.bfloat16).device == "meta"

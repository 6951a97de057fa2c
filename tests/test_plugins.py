"""Plugin discovery, isolation of broken plugins, and the environment switches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmkit import (
    Backend,
    BackendUnavailableError,
    FallbackWarning,
    Impl,
    PluginWarning,
    Registry,
    UnknownNameError,
)
from llmkit.hookspecs import hookimpl
from llmkit.testing import ResidualMLPLM
from llmkit import assemble

BROKEN = {
    "acme": "import failed: ImportError: libacme_kernels.so",
    "brokenhook": "hook llmkit_impls raised RuntimeError: kernel table not initialised",
    "dupvendor": "registers impl testvendor.rmsnorm of norm@1, also registered by plugin 'testvendor'",
    "futurevendor": "targets plugin API 2; this llmkit supports [1]",
}


def _records(registry: Registry) -> dict[str, object]:
    return {r.name: r for r in registry.plugins}


def test_installed_vendor_plugin_is_discovered_with_its_distribution(vendor_registry: Registry) -> None:
    rec = _records(vendor_registry)["testvendor"]
    assert (rec.status, rec.distribution, rec.version) == ("ok", "llmkit-testvendor", "1.2.3")
    assert rec.backends == ["testvendor"]
    assert sorted(rec.impls) == ["mlp@1:testvendor.swiglu", "norm@1:testvendor.rmsnorm", "norm@1:testvendor.rmsnorm_lowp"]
    assert [i.qualname for i in vendor_registry.impls_for("norm@1")] == [
        "cpu.fused", "reference.eager", "testvendor.rmsnorm", "testvendor.rmsnorm_lowp"]


def test_impl_for_unknown_kind_is_skipped_with_a_warning_not_fatal(vendor_registry: Registry) -> None:
    rec = _records(vendor_registry)["testvendor"]
    assert rec.status == "ok"
    assert any("testvendor.flash skipped: unknown block kind 'attention@9'" in w for w in rec.warnings)


def test_broken_plugins_are_reported_and_the_rest_keeps_working(with_plugins, vendor) -> None:
    with pytest.warns(PluginWarning) as caught:
        registry = Registry.load()
    recs = _records(registry)
    for name, error in BROKEN.items():
        assert recs[name].status == "broken", name
        assert error in recs[name].error, (name, recs[name].error)
        assert recs[name].kinds == recs[name].backends == recs[name].impls == []
        assert any(f"'{name}' is broken" in str(w.message) for w in caught), name
    assert {n for n, r in recs.items() if r.status == "ok"} == {"blocks", "cpu", "cuda", "gaudi", "mlir", "onnxrt", "rocm", "testvendor"}
    # nothing of a broken plugin is registered, even what it contributed before it broke
    assert set(registry.backends) == {"cpu", "cuda", "gaudi", "mlir", "onnxrt", "rocm", "testvendor"}
    assert registry.impl("norm@1", "testvendor.rmsnorm").forward is vendor.rmsnorm
    # and the healthy vendor still builds and runs
    model = ResidualMLPLM(registry)
    with pytest.warns(FallbackWarning):
        plan = assemble(model, registry.target("testvendor"), registry=registry)
    assert plan.impl_of("layers.0.norm") == "testvendor.rmsnorm"
    model(__import__("torch").randint(0, 256, (1, 5)))


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("acme", "plugin 'acme' (llmkit-acme) is broken: import failed: ImportError"),
        ("hooky", "plugin 'brokenhook' (llmkit-brokenhook) is broken: hook llmkit_impls raised"),
        ("dupvendor", "plugin 'dupvendor' (llmkit-dupvendor) is broken: registers impl testvendor.rmsnorm"),
    ],
)
def test_selecting_a_broken_plugins_backend_says_why(with_plugins, backend: str, expected: str) -> None:
    registry = Registry.load(warn=False)
    with pytest.raises(BackendUnavailableError, match="is unavailable") as err:
        registry.target(backend)
    assert expected in str(err.value)


def test_unknown_backend_lists_valid_names_and_closest(vendor_registry: Registry) -> None:
    with pytest.raises(UnknownNameError) as err:
        vendor_registry.target("testvendr")
    assert "valid: cpu, testvendor" in str(err.value)
    assert err.value.closest == "testvendor"


def test_allowlist_loads_exactly_the_named_plugins(with_plugins) -> None:
    registry = Registry.load(environ={"LLMKIT_PLUGINS": "blocks, llmkit-testvendor"})
    status = {r.name: r.status for r in registry.plugins}
    assert status["blocks"] == status["testvendor"] == "ok"  # by entry-point and by distribution name
    assert status["cpu"] == status["acme"] == "disabled"
    assert "not in LLMKIT_PLUGINS" in _records(registry)["cpu"].error
    assert set(registry.backends) == {"testvendor"}


def test_allowlist_naming_nothing_installed_is_a_reported_problem(with_plugins) -> None:
    with pytest.warns(PluginWarning, match="names 'nosuch'"):
        registry = Registry.load(environ={"LLMKIT_PLUGINS": "blocks,nosuch"})
    assert any("nosuch" in p for p in registry.problems)


def test_autoload_switch_disables_entry_points_but_not_explicit_plugins(with_plugins) -> None:
    import llmkit_blocks.plugin

    registry = Registry.load(environ={"LLMKIT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert registry.kinds == {} and registry.backends == {}
    assert all(r.status == "disabled" for r in registry.plugins)
    registry = Registry.load([("blocks", llmkit_blocks.plugin)], environ={"LLMKIT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert set(registry.kinds) == {k.id for k in llmkit_blocks.plugin.llmkit_block_kinds()}
    assert {"attention@1", "mla@1", "moe@1", "layer@1", "rope@1", "norm@1"} <= set(registry.kinds)
    # with autoload off, LLMKIT_PLUGINS still names what to load (as pytest's PYTEST_PLUGINS)
    registry = Registry.load(environ={"LLMKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "LLMKIT_PLUGINS": "cpu"})
    assert set(registry.backends) == {"cpu"}


def test_cli_info_reports_broken_plugins_and_env_switches(subprocess_env) -> None:
    out = subprocess.run([sys.executable, "-m", "llmkit", "info", "--json"],
                         env=subprocess_env, capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    status = {p["name"]: (p["status"], p["error"]) for p in info["plugins"]}
    for name, error in BROKEN.items():
        assert status[name][0] == "broken" and error in status[name][1]
        assert f"plugin '{name}' is broken" in out.stderr
    env = dict(subprocess_env, LLMKIT_DISABLE_PLUGIN_AUTOLOAD="1", LLMKIT_PLUGINS="blocks,cpu")
    out = subprocess.run([sys.executable, "-m", "llmkit", "info", "--json"],
                         env=env, capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert {p["name"] for p in info["plugins"] if p["status"] == "ok"} == {"blocks", "cpu"}
    assert info["environment"]["plugin_allowlist"] == ["blocks", "cpu"]
    assert out.stderr == ""


def test_discovering_the_installed_plugins_stays_light() -> None:
    """Discovery runs on every load and CLI call: it must not pull in torch's compiler stack
    (dynamo: ~140 MiB of RSS, once added by a plugin that registered a fake impl at import). The
    RSS bound leaves room for what discovery does import: ~73 MiB here, ~69 of them triton's (the
    cuda and rocm plugins import the shared kernels when they register their impls)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc for the RSS")
    code = (
        "import json, re, sys, torch, llmkit, llmkit.registry\n"
        "def kib(): return int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "before = kib()\n"
        "llmkit.registry.default_registry()\n"
        "print(json.dumps([(kib() - before) / 1024, [m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    growth_mib, compiler_modules = json.loads(out.stdout.splitlines()[-1])
    print(f"\nplugin discovery: RSS grew {growth_mib:.0f} MiB")
    assert compiler_modules == []
    assert growth_mib < 120


# ---------------------------------------------------------------- contract violations, in process

def _norm_impl(name: str = "x", **kw) -> Impl:
    return Impl(kind="norm@1", backend=kw.pop("backend", "v"), name=name,
                forward=kw.pop("forward", lambda block, x: x), device_types={"cpu"},
                dtypes={"float32"}, **kw)


class _VBackend(Backend):
    name = "v"
    device_type = "cpu"


def _plugin(api=1, backends=None, impls=None, kinds=None, **hooks):
    """A plugin object with the given hook results (None: hook not implemented)."""
    ns: dict = {"LLMKIT_PLUGIN_API": api}
    if backends is not None:
        ns["llmkit_backends"] = hookimpl(lambda self: backends)
    if impls is not None:
        ns["llmkit_impls"] = hookimpl(lambda self: impls() if callable(impls) else impls)
    if kinds is not None:
        ns["llmkit_block_kinds"] = hookimpl(lambda self: kinds)
    ns.update(hooks)
    if api is None:
        del ns["LLMKIT_PLUGIN_API"]
    return type("Plugin", (), ns)()


def _load(**plugins) -> Registry:
    import llmkit_blocks.plugin

    return Registry.load([("blocks", llmkit_blocks.plugin), *plugins.items()], autoload=False, warn=False)


def _broken(registry: Registry, name: str) -> str:
    rec = _records(registry)[name]
    assert rec.status == "broken"
    return rec.error


def test_plugin_without_api_version_is_refused() -> None:
    assert "declares no LLMKIT_PLUGIN_API" in _broken(_load(v=_plugin(api=None, backends=[_VBackend()])), "v")


def test_hook_returning_wrong_type_breaks_the_plugin() -> None:
    err = _broken(_load(v=_plugin(backends=["cpu"])), "v")
    assert "llmkit_backends must return a sequence of Backend, got str 'cpu'" in err


def test_hookimpl_with_unknown_argument_breaks_the_plugin() -> None:
    bad = _plugin(llmkit_impls=hookimpl(lambda self, device: []))
    assert "invalid hook implementation" in _broken(_load(v=bad), "v")


def test_misspelt_hook_breaks_the_plugin() -> None:
    bad = _plugin(llmkit_impl=hookimpl(lambda self: []))
    assert "implements unknown hook(s) ['llmkit_impl']" in _broken(_load(v=bad), "v")


def test_impl_with_wrong_forward_signature_breaks_the_plugin() -> None:
    bad = _plugin(backends=[_VBackend()], impls=[_norm_impl(forward=lambda block, x, eps: x)])
    assert "forward signature (block, x, eps) != norm@1's (block, x)" in _broken(_load(v=bad), "v")


def test_invalid_impl_declaration_breaks_the_plugin_not_the_load() -> None:
    bad = _plugin(backends=[_VBackend()], impls=lambda: [_norm_impl(name="Bad-Name")])
    assert "must be lower_snake_case" in _broken(_load(v=bad), "v")


def test_duplicate_impl_within_one_plugin_breaks_it() -> None:
    bad = _plugin(backends=[_VBackend()], impls=[_norm_impl(), _norm_impl()])
    registry = _load(v=bad)
    assert "registers impl v.x of norm@1, also registered by plugin 'v'" in _broken(registry, "v")
    assert "v" not in registry.backends


def test_duplicate_impl_across_plugins_keeps_the_backend_owners() -> None:
    owner = _plugin(backends=[_VBackend()], impls=[_norm_impl()])
    intruder = _plugin(impls=[_norm_impl()])
    for names in (("a_owner", "z_intruder"), ("z_owner", "a_intruder")):
        registry = _load(**{names[0]: owner, names[1]: intruder})
        assert _records(registry)[names[0]].status == "ok"
        assert f"also registered by plugin {names[0]!r}" in _broken(registry, names[1])


def test_duplicate_backend_or_kind_breaks_the_later_plugin_by_name() -> None:
    import llmkit_blocks.norm

    registry = _load(a=_plugin(backends=[_VBackend()]), b=_plugin(backends=[_VBackend()]))
    assert "registers backend 'v', already registered by plugin 'a'" in _broken(registry, "b")
    registry = _load(zz=_plugin(kinds=[llmkit_blocks.norm.KIND]))
    assert "registers block kind norm@1, already registered by plugin 'blocks'" in _broken(registry, "zz")


def test_reference_backend_name_is_reserved() -> None:
    class Ref(Backend):
        name = "reference"
        device_type = "cpu"

    assert "reserved" in _broken(_load(v=_plugin(backends=[Ref()])), "v")
    assert "reserved" in _broken(_load(v=_plugin(impls=[_norm_impl(backend="reference")])), "v")


def test_breaking_one_plugin_drops_impls_that_depended_on_it() -> None:
    # plugin 'b' adds an impl to backend 'v' of plugin 'a'; when 'a' breaks, 'b' keeps loading
    a = _plugin(backends=[_VBackend()], impls=[_norm_impl(), _norm_impl()])
    b = _plugin(impls=[_norm_impl(name="y")])
    registry = _load(a=a, b=b)
    assert _records(registry)["b"].status == "ok"
    assert any("backend 'v'" in w for w in _records(registry)["b"].warnings)
    assert [i.qualname for i in registry.impls_for("norm@1")] == ["reference.eager"]

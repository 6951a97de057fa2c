"""`backends/template/`, the plugin vendors copy: it pip-installs as an ordinary distribution whose
entry point llmkit discovers, passes `llmkit certify --quick` with its sample impl, and the same
certification fails a deliberately wrong copy of that impl (so a pass means something)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import torch

from llmkit import certificate
from llmkit.certify import certify
from llmkit.cli import main
from llmkit.hookspecs import hookimpl
from llmkit.registry import Registry

ROOT = Path(__file__).resolve().parents[1]

def _from_source() -> types.ModuleType:
    """The template package imported from its source tree: it is not installed with the built-in
    plugins (a vendor copies it), and its folder is kept off sys.path so that no other test's
    entry-point discovery sees it."""
    package = ROOT / "backends" / "template" / "llmkit_backend_template"
    spec = importlib.util.spec_from_file_location("llmkit_backend_template", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


llmkit_backend_template = _from_source()
ISOLATED = {"LLMKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "LLMKIT_PLUGINS": "blocks,cpu"}


def _registry(*plugins: tuple[str, object]) -> Registry:
    return Registry.load(list(plugins) or [("template", llmkit_backend_template)], environ=ISOLATED)


def test_quick_certification_passes_and_verifies(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("llmkit.cli.default_registry", lambda: _registry())
    out = tmp_path / "cert-template-quick.json"
    assert main(["certify", "--backend", "template", "--quick", "--out", str(out)]) == 0
    assert main(["verify-cert", str(out)]) == 0
    cert = certificate.load(out)
    assert cert.summary.failed == 0 and cert.summary.passed > 0
    passed = {c.dtype for c in cert.cases if c.impl == "template.rmsnorm" and c.status == "pass"}
    assert passed == set(cert.suite.dtypes)
    unsupported = [c for c in cert.cases if c.status == "unsupported"]
    assert unsupported and all(c.config["type"] == "layer" for c in unsupported)  # LayerNorm: not declared
    assert all(m.status == "pass" for m in cert.models) and cert.models


class _WrongVendor:
    """The template's impl with bfloat16 statistics: a plausible vendor mistake."""

    LLMKIT_PLUGIN_API = 1

    @staticmethod
    def forward(block, x):  # noqa: ANN001, ANN205 - the kind's reference signature
        c = block.config
        h = x.to(torch.bfloat16)
        h = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + c.eps)
        return h.to(x.dtype) * (block.weight + 1 if c.unit_offset else block.weight)

    @hookimpl
    def llmkit_backends(self):  # noqa: ANN201
        return llmkit_backend_template.llmkit_backends()

    @hookimpl
    def llmkit_impls(self):  # noqa: ANN201
        impl = llmkit_backend_template.llmkit_impls()[0]
        return [dataclasses.replace(impl, forward=self.forward)]


def test_the_same_suite_fails_a_wrong_copy(tmp_path) -> None:
    cert = certify(_registry(("template", _WrongVendor())), "template", out=tmp_path / "wrong.json", quick=True,
                   blocks=["norm"], perf=False)
    failed = [c for c in cert.cases if c.status == "fail"]
    assert any(c.dtype == "float32" and c.impl == "template.rmsnorm" for c in failed)


def test_it_installs_with_pip_and_is_discovered_by_its_entry_point(tmp_path) -> None:
    source, target = tmp_path / "src", tmp_path / "site"
    # a copy: pip builds in the source tree and would leave build/ behind in the repository
    shutil.copytree(ROOT / "backends" / "template", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    dist = next(target.glob("llmkit_backend_template-*.dist-info"))
    assert "[llmkit]\ntemplate = llmkit_backend_template" in (dist / "entry_points.txt").read_text()
    out = tmp_path / "cert.json"
    env = {**os.environ, "PYTHONPATH": str(target), "LLMKIT_DISABLE_PLUGIN_AUTOLOAD": "1",
           "LLMKIT_PLUGINS": "blocks,cpu,template"}
    run = subprocess.run([sys.executable, "-m", "llmkit", "certify", "--backend", "template", "--quick",
                          "--blocks", "norm", "--no-perf", "--out", str(out)],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert data["plugin"]["distribution"] == "llmkit-backend-template"
    assert data["summary"]["failed"] == 0 and data["summary"]["passed"] > 0

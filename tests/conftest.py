"""Shared fixtures: the test plugin distributions, pip-installed into a directory of their own."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Some libraries write caches under ~/.cache on import; keep test runs self-contained.
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="llmkit-test-cache-"))
# The tests decide which plugins load; a developer's own switches must not leak in.
for _var in ("LLMKIT_DISABLE_PLUGIN_AUTOLOAD", "LLMKIT_PLUGINS"):
    os.environ.pop(_var, None)
# Without a GPU the Triton kernels run in Triton's interpreter; triton decides interpreted or
# compiled when a kernel is defined, so this must precede every import of triton.
if not shutil.which("nvidia-smi") and not os.path.exists("/dev/kfd"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import llmkit.registry  # noqa: E402
from llmkit import Registry  # noqa: E402

PLUGIN_SOURCES = Path(__file__).parent / "plugins"
BUILTIN = ["blocks", "cpu"]


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install every distribution under tests/plugins/ with pip into one target directory.

    They are real distributions (dist-info with entry points), discovered exactly as an installed
    vendor package would be, but kept off the development venv so `llmkit info` there stays clean.
    Sources are copied first so the build leaves nothing in the repository.
    """
    root = tmp_path_factory.mktemp("plugins")
    sources = []
    for src in sorted(PLUGIN_SOURCES.iterdir()):
        if (src / "pyproject.toml").is_file():
            sources.append(shutil.copytree(src, root / src.name))
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), *map(str, sources)],
        check=True,
    )
    return site


@pytest.fixture
def with_plugins(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the test plugins on sys.path (and so in entry-point discovery) for one test."""
    monkeypatch.syspath_prepend(str(plugin_site))
    importlib.invalidate_caches()
    return plugin_site


@pytest.fixture
def registry() -> Registry:
    """The built-in plugins only."""
    return Registry.load(allow=BUILTIN)


@pytest.fixture
def vendor_registry(with_plugins: Path) -> Registry:
    """Built-in plugins plus the well-behaved test vendor."""
    return Registry.load(allow=[*BUILTIN, "testvendor"])


@pytest.fixture
def vendor(with_plugins: Path):
    """The test vendor plugin module, with its call counters reset."""
    import llmkit_testvendor

    llmkit_testvendor.CALLS.clear()
    llmkit_testvendor.PREPARED.clear()
    return llmkit_testvendor


@pytest.fixture
def subprocess_env(plugin_site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["COLUMNS"] = "200"
    return env


@pytest.fixture
def make_cli(monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> Callable[[str, int], Callable[..., tuple[int, str, str]]]:
    """make_cli(plugins, columns): a function running `llmkit ARGS` in process with those plugins
    (LLMKIT_PLUGINS) and terminal width, returning (exit code, stdout, stderr)."""
    from llmkit.cli import main

    def make(plugins: str, columns: int) -> Callable[..., tuple[int, str, str]]:
        monkeypatch.setenv("LLMKIT_PLUGINS", plugins)
        monkeypatch.setenv("COLUMNS", str(columns))
        monkeypatch.setattr(llmkit.registry, "_default", None)

        def run(*args: str) -> tuple[int, str, str]:
            code = main(list(args))
            out, err = capsys.readouterr()
            return code, out, err

        return run

    return make

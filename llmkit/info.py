"""`llmkit info`: installed plugins, backends and the block-kind x backend table of impls.

Modelled on `python -m xformers.info`: everything the registry knows, including what is broken
and why, in one screen (or one JSON document).
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .hookspecs import PLUGIN_API
from .impls import REFERENCE
from .registry import Registry
from .target import dtype_name


def _version() -> str:
    try:
        return metadata.version("llmkit")
    except metadata.PackageNotFoundError:
        return "unknown"


def collect(registry: Registry, *, peak: bool = False) -> dict[str, Any]:
    """Everything `llmkit info` shows, as plain data. `peak=True` runs the backends' peak probes."""
    backends = []
    for name, b in registry.backends.items():
        reasons = registry.unavailable(name)
        entry: dict[str, Any] = {
            "name": name,
            "plugin": registry.backend_plugin(name),
            "device_type": b.device_type,
            "summary": b.summary,
            "available": not reasons,
            "reasons": reasons,
            "device_facts": b.device_facts(b.default_device()) if not reasons else {},
            "peak": None,
        }
        if peak and not reasons:
            p = b.peak(b.default_device(), torch.float32)
            if p is not None:
                entry["peak"] = {
                    "dtype": dtype_name(torch.float32),
                    "flops_per_s": p.flops_per_s,
                    "bytes_per_s": p.bytes_per_s,
                    "source": p.source,
                }
        backends.append(entry)
    columns = [REFERENCE, *registry.backends]
    kinds = []
    for kind_id, kind in registry.kinds.items():
        impls = registry.impls_for(kind_id)
        kinds.append({
            "id": kind_id,
            "plugin": registry.kind_plugin(kind_id),
            "summary": kind.summary,
            "signature": kind.signature_text,
            "impls": [dict(i.describe(), plugin=registry.impl_plugin(i)) for i in impls],
            "by_backend": {c: [i.name for i in impls if i.backend == c] for c in columns},
        })
    settings = registry.settings
    return {
        "llmkit": {"version": _version(), "plugin_api": PLUGIN_API},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "plugin_autoload": settings.autoload if settings else None,
            "plugin_allowlist": list(settings.allow) if settings and settings.allow is not None else None,
        },
        "plugins": [r.to_dict() for r in registry.plugins],
        "problems": list(registry.problems),
        "backends": backends,
        "block_kinds": kinds,
    }


_STATUS_STYLE = {"ok": "green", "broken": "bold red", "disabled": "dim"}


def _fact(value: Any, width: int = 96) -> str:
    """One device fact for the terminal (`--json` has them in full)."""
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def render(info: dict[str, Any]) -> Group:
    env = info["environment"]
    head = Text.assemble(
        ("llmkit ", "bold"), info["llmkit"]["version"],
        f"  plugin API {info['llmkit']['plugin_api']}  python {env['python']}  torch {env['torch']}",
    )
    if env["plugin_allowlist"] is not None:
        head.append(f"\nLLMKIT_PLUGINS allowlist: {', '.join(env['plugin_allowlist'])}")
    if env["plugin_autoload"] is False:
        head.append("\nplugin autoload disabled (LLMKIT_DISABLE_PLUGIN_AUTOLOAD)")

    plugins = Table(title="Plugins", title_justify="left")
    for col in ("plugin", "distribution", "status", "provides / error"):
        plugins.add_column(col)
    for p in info["plugins"]:
        dist = f"{p['distribution']} {p['version']}" if p["distribution"] else p["origin"]
        if p["status"] == "ok":
            prov = p["provides"]
            detail = "; ".join(
                f"{k}: {', '.join(prov[k])}" for k in ("kinds", "backends") if prov[k]
            )
            if prov["impls"]:
                detail += ("; " if detail else "") + f"impls: {len(prov['impls'])}"
            detail = detail or "nothing"
            for w in p["warnings"]:
                detail += f"\nwarning: {w}"
        else:
            detail = p["error"] or ""
        plugins.add_row(p["name"], dist, Text(p["status"], style=_STATUS_STYLE[p["status"]]), detail)

    backends = Table(title="Backends", title_justify="left")
    for col in ("backend", "plugin", "device", "status", "peak (float32)"):
        backends.add_column(col)
    for b in info["backends"]:
        status = Text("available", style="green") if b["available"] else Text(
            "unavailable: " + "; ".join(b["reasons"]), style="yellow"
        )
        peak = "-"
        if b["peak"]:
            peak = f"{b['peak']['flops_per_s'] / 1e9:.1f} GFLOP/s, {b['peak']['bytes_per_s'] / 1e9:.1f} GB/s"
        backends.add_row(b["name"], b["plugin"], b["device_type"], status, peak)
    facts = Table(title="Device facts (what each available backend detected)", title_justify="left")
    facts.add_column("backend")
    facts.add_column("facts")
    for b in info["backends"]:
        if b["device_facts"]:
            facts.add_row(b["name"], "\n".join(f"{k}: {_fact(v)}" for k, v in b["device_facts"].items()))

    columns = [REFERENCE, *[b["name"] for b in info["backends"]]]
    matrix = Table(title="Block kinds x backends (registered impls)", title_justify="left")
    matrix.add_column("block kind")
    matrix.add_column("forward")
    for c in columns:
        matrix.add_column(c)
    for k in info["block_kinds"]:
        cells = [", ".join(k["by_backend"].get(c, [])) or Text("-", style="dim") for c in columns]
        matrix.add_row(k["id"], k["signature"], *cells)

    parts: list[Any] = [head, plugins, backends, *([facts] if facts.row_count else []), matrix]
    for problem in info["problems"]:
        parts.append(Text(f"problem: {problem}", style="bold red"))
    return Group(*parts)

"""The dispatch plan of a built model: which impl runs each block, why, and why not the others."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.table import Table

import torch

from .certificate import cert_dir
from .resolve import Resolution, Selection
from .target import Target, dtype_name

_LAYER = re.compile(r"^(?:.*?\.)?(?P<index>\d+)(?:\.(?P<slot>.+))?$")


@dataclass(frozen=True)
class PlanEntry:
    path: str  # dotted module path of the block, e.g. "layers.3.mlp"
    resolution: Resolution
    dtype: torch.dtype | None = None  # the block's own dtype (differs from the target's when mixed)

    @property
    def layer(self) -> int | None:
        m = _LAYER.match(self.path)
        return int(m["index"]) if m else None

    @property
    def slot(self) -> str:
        """The path without its layer prefix ("layers.3.mlp" -> "mlp", "layers.3" -> "(layer)")."""
        m = _LAYER.match(self.path)
        if not m:
            return self.path
        return m["slot"] or "(layer)"

    def to_dict(self) -> dict[str, Any]:
        dt = None if self.dtype is None else dtype_name(self.dtype)
        return {"path": self.path, "layer": self.layer, "block": self.slot, "dtype": dt, **self.resolution.to_dict()}


@dataclass(frozen=True)
class Plan:
    target: Target
    selection: Selection
    entries: tuple[PlanEntry, ...]

    @property
    def fallbacks(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.resolution.fallback]

    def impl_of(self, path: str) -> str:
        for e in self.entries:
            if e.path == path:
                return e.resolution.impl.qualname
        raise KeyError(path)

    def counts(self) -> dict[str, int]:
        """Blocks per chosen impl, e.g. {"cpu.sdpa": 32, "reference.eager": 1}."""
        return dict(sorted(Counter(e.resolution.impl.qualname for e in self.entries).items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.to_dict(),
            "selection": self.selection.to_dict(),
            "blocks": [e.to_dict() for e in self.entries],
            "summary": {"blocks": len(self.entries), "fallbacks": len(self.fallbacks), "impls": self.counts()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def _groups(self) -> list[tuple[str, str, Resolution, Any]]:
        """One row per (slot, resolution), listing the layers that share it, in first-seen order."""
        groups: dict[tuple[bool, str, int, Any], tuple[list[int], Resolution]] = {}
        for e in self.entries:
            # blocks outside any layer (embedding, final norm) never merge with layer blocks
            key = (e.layer is None, e.slot, id(e.resolution), e.dtype)
            layers, _ = groups.setdefault(key, ([], e.resolution))
            if e.layer is not None:
                layers.append(e.layer)
        return [(_compact(layers), slot, res, dt) for (_, slot, _, dt), (layers, res) in groups.items()]

    def render(self) -> Group:
        t = self.target
        certs = self.selection.uses_certificates
        paths = self.selection.certs
        sources = str(cert_dir()) if paths is None else ", ".join(paths) or "(none)"
        chosen = Table(
            title=f"Dispatch plan: backend {t.backend}, device {t.device}, {t.to_dict()['dtype']}, "
            f"mode {t.mode}, policy {self.selection.policy}" + (f", certificates from {sources}" if certs else ""),
            title_justify="left",
        )
        for col in ("layers", "block", "kind", "impl", "reason") + (("certificate",) if certs else ()):
            chosen.add_column(col)
        rejected = Table(title="Rejected candidates", title_justify="left")
        for col in ("layers", "block", "candidate", "reasons"):
            rejected.add_column(col)
        for where, slot, res, dt in self._groups():
            style = "yellow" if res.fallback else None
            mixed = f" [{dtype_name(dt)}]" if dt is not None and dt != self.target.dtype else ""
            cells = [where, slot + mixed, res.kind, res.impl.qualname, res.reason]
            chosen.add_row(*cells, *([res.certificate or "-"] if certs else []), style=style)
            for r in res.rejected:
                rejected.add_row(where, slot, r.impl, "; ".join(r.reasons))
        parts: list[Any] = [chosen]
        if rejected.row_count:
            parts.append(rejected)
        return Group(*parts)

    def print(self, console: Console | None = None) -> None:
        (console or Console()).print(self.render())


def _compact(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"; blocks outside any layer ([]) -> "-"."""
    nums = sorted(layers)
    if not nums:
        return "-"
    runs: list[list[int]] = []
    for n in nums:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)

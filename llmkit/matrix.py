"""The certification matrix: many certificates merged into one block x backend table.

Rows are (block kind, dtype, mode); columns are certificate sources (backend, device, host). A cell
aggregates every case of its row in its column's certificate, over all the backend's impls:

- status: "fail" if any case failed, "pass" if cases ran and all passed, "unsupported" if none ran
  but some were declared unsupported, "skipped" if all were skipped, and "not submitted" when the
  certificate has no case for the row at all (DESIGN.md: not submitted is not failed);
- passed/run counts, the worst error ratio e_max / e_naive (the precision grade, `r≤1.3`) and the
  geometric-mean speed-up over the portable reference of the passing cases.

Certificate content is untrusted (anyone can hand over a file): every string from it is escaped
for the output it lands in (rich text, Markdown, HTML), and an unusable file is skipped with a
`MatrixWarning` rather than sinking the whole matrix.
"""

from __future__ import annotations

import html
import json
import math
import unicodedata
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .certificate import Case, Certificate, CertificateError, find, load
from .errors import LlmkitWarning

TITLE = "llmkit certification matrix"
NOT_SUBMITTED = "not submitted"
MODE_ORDER = {"infer": 0, "train": 1}
LEGEND = ("n/m = cases passed / cases run; r≤x = worst error ratio e_max / e_naive (forward or "
          "backward); Nx = geometric-mean speed-up of the passing cases over the portable reference; "
          "? = a suspect (> 10x) speed-up")


class MatrixWarning(LlmkitWarning):
    """A certificate file left out of the matrix (unreadable, malformed, tampered with)."""


@dataclass(frozen=True, order=True)
class Row:
    kind: str
    dtype: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.kind} · {self.dtype} · {self.mode}"


@dataclass
class Column:
    """One certificate: the newest of those sharing its (backend, device, host)."""

    backend: str
    device: str
    host: str
    path: Path
    cert: Certificate

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.device} @ {self.host}"

    def coverage(self) -> str:
        s = self.cert.summary
        text = (f"{s.passed} passed / {s.run} run / {s.total} total "
                f"({s.failed} failed, {s.unsupported} unsupported, {s.skipped} skipped)")
        models = self.cert.models
        if models:
            ok = sum(m.status == "pass" for m in models)
            failed = sorted({f"{m.preset} {m.dtype}" for m in models if m.status == "fail"})
            text += f"; composition: {ok}/{len(models)} tiny models pass" + (
                f" (failed: {', '.join(failed)})" if failed else "")
        return text


@dataclass
class Cell:
    status: str
    passed: int = 0
    run: int = 0
    total: int = 0
    ratio: float | None = None
    """Worst e_max / e_naive over the executed cases (forward and backward)."""
    speedup: float | None = None
    """Geometric mean of perf.speedup over the passing cases that have one."""
    suspect: bool = False
    reason: str | None = None
    """First reason of the case that decided a non-pass status."""
    impls: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        if self.status == NOT_SUBMITTED:
            return NOT_SUBMITTED
        if self.status in ("unsupported", "skipped"):
            return f"{self.status} ×{self.total}"
        parts = [f"{self.status} {self.passed}/{self.run}"]
        if self.ratio is not None:
            parts.append(f"r≤{_num(self.ratio)}")
        if self.speedup is not None:
            parts.append(f"{_num(self.speedup)}x" + ("?" if self.suspect else ""))
        return " · ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "text": self.text, "passed": self.passed, "run": self.run,
                "total": self.total, "ratio": self.ratio, "speedup": self.speedup,
                "suspect": self.suspect, "reason": self.reason, "impls": self.impls}


@dataclass(frozen=True)
class Bar:
    """Speed-up of one impl at one dtype and mode in one column, for the per-block charts."""

    label: str
    speedup: float
    cases: int
    suspect: bool


@dataclass
class Matrix:
    rows: list[Row]
    columns: list[Column]
    cells: dict[tuple[Row, str], Cell]
    """(row, column label) -> cell."""
    bars: dict[str, list[Bar]]
    """block kind -> bars, one per (impl, dtype, mode, column) with a measured speed-up."""
    skipped: list[str] = field(default_factory=list)
    """Why each unusable file was left out."""
    notes: list[str] = field(default_factory=list)
    """Certificates superseded by a newer one for the same column."""

    def cell(self, row: Row, column: Column) -> Cell:
        return self.cells[(row, column.label)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": [{"label": c.label, "backend": c.backend, "device": c.device, "host": c.host,
                         "source": str(c.path), "created_at": c.cert.created_at,
                         "summary": c.cert.summary.model_dump()} for c in self.columns],
            "rows": [{"label": r.label, "kind": r.kind, "dtype": r.dtype, "mode": r.mode,
                      "cells": {c.label: self.cell(r, c).to_dict() for c in self.columns}}
                     for r in self.rows],
            "speedups": {kind: [{"label": b.label, "speedup": b.speedup, "cases": b.cases,
                                 "suspect": b.suspect} for b in bars] for kind, bars in self.bars.items()},
            "skipped": self.skipped,
            "notes": self.notes,
        }


# --- building ---------------------------------------------------------------------------------

def _num(x: float) -> str:
    return f"{x:.2g}" if abs(x) < 10 else f"{x:.0f}"


def _created(cert: Certificate) -> datetime:
    # created_at is free text in the schema; an unparsable one sorts oldest rather than failing
    try:
        t = datetime.fromisoformat(cert.created_at)
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _aggregate(cases: list[Case]) -> Cell:
    if not cases:
        return Cell(NOT_SUBMITTED)
    by = {s: [c for c in cases if c.status == s] for s in ("pass", "fail", "unsupported", "skipped")}
    executed = by["pass"] + by["fail"]
    status = ("fail" if by["fail"] else "pass" if by["pass"]
              else "unsupported" if by["unsupported"] else "skipped")
    deciding = by[status] if status != "pass" else []
    ratios = [p.ratio for c in executed for p in (c.forward, c.backward) if p is not None and p.ratio is not None]
    perfs = [c.perf for c in by["pass"] if c.perf is not None and c.perf.speedup and c.perf.speedup > 0]
    return Cell(
        status=status, passed=len(by["pass"]), run=len(executed), total=len(cases),
        ratio=max(ratios) if ratios else None,
        speedup=math.exp(sum(math.log(p.speedup) for p in perfs) / len(perfs)) if perfs else None,
        suspect=any(p.suspect for p in perfs),
        reason=next((r for c in deciding for r in c.reasons), None),
        impls=sorted({c.impl for c in cases}),
    )


def _bars(columns: list[Column]) -> dict[str, list[Bar]]:
    shared = {c.backend for c in columns if sum(o.backend == c.backend for o in columns) > 1}
    out: dict[str, list[Bar]] = {}
    for col in columns:
        groups: dict[tuple[str, str, str, str], list[tuple[float, bool]]] = {}
        for c in col.cert.cases:
            if c.status == "pass" and c.perf is not None and c.perf.speedup and c.perf.speedup > 0:
                groups.setdefault((c.kind, c.impl, c.dtype, c.mode), []).append((c.perf.speedup, c.perf.suspect))
        for (kind, impl, dtype, mode), runs in sorted(groups.items()):
            # the same backend on two devices or hosts would give identical labels otherwise
            where = f" ({col.device} @ {col.host})" if col.backend in shared else ""
            speed = math.exp(sum(math.log(s) for s, _ in runs) / len(runs))
            out.setdefault(kind, []).append(
                Bar(f"{impl} · {dtype} · {mode}{where}", speed, len(runs), any(sus for _, sus in runs)))
    return dict(sorted(out.items()))


def build_matrix(paths: Iterable[str | Path]) -> Matrix:
    """Merge the certificates in `paths` (files, or directories of *.json) into one matrix.

    Unusable files are skipped with a `MatrixWarning` (and listed in `skipped`); raises
    `CertificateError` when no file is usable.
    """
    paths = list(paths)
    skipped: list[str] = []

    def skip(message: str) -> None:
        warnings.warn(message, MatrixWarning, stacklevel=3)
        skipped.append(message)

    files: list[Path] = []
    seen: set[Path] = set()
    for root in paths:
        try:
            found = find([root])
        except CertificateError as exc:
            skip(str(exc))
            continue
        if not found:
            skip(f"{root}: no certificate files (*.json) in this directory")
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)

    newest: dict[tuple[str, str, str], Column] = {}
    notes: list[str] = []
    for path in files:
        try:
            cert = load(path)
        except CertificateError as exc:
            skip(str(exc))
            continue
        col = Column(cert.backend, cert.device, str(cert.environment.get("host") or "unknown host"), path, cert)
        key = (col.backend, col.device, col.host)
        old = newest.get(key)
        if old is not None:
            keep, drop = (col, old) if _created(col.cert) >= _created(old.cert) else (old, col)
            notes.append(f"{keep.label}: using {keep.path.name} (created {keep.cert.created_at}); "
                         f"older {drop.path.name} (created {drop.cert.created_at}) ignored")
            col = keep
        newest[key] = col
    if not newest:
        shown = "; ".join(skipped) if skipped else "no paths given"
        raise CertificateError(f"no usable certificate among {', '.join(map(str, paths)) or '(none)'}: {shown}")

    columns = sorted(newest.values(), key=lambda c: c.label)
    by_cell: dict[tuple[Row, str], list[Case]] = {}
    for col in columns:
        for c in col.cert.cases:
            by_cell.setdefault((Row(c.kind, c.dtype, c.mode), col.label), []).append(c)
    rows = sorted({row for row, _ in by_cell}, key=lambda r: (r.kind, r.dtype, MODE_ORDER.get(r.mode, 9), r.mode))
    cells = {(r, c.label): _aggregate(by_cell.get((r, c.label), [])) for r in rows for c in columns}
    return Matrix(rows, columns, cells, _bars(columns), skipped, notes)


# --- terminal ---------------------------------------------------------------------------------

_STYLE = {"pass": "green", "fail": "bold red", "unsupported": "yellow", "skipped": "dim",
          NOT_SUBMITTED: "dim italic"}


def _plain(text: str) -> str:
    """Control characters (terminal escape sequences, newlines) from a certificate, made visible."""
    return "".join(ch if unicodedata.category(ch)[0] != "C" else f"\\x{ord(ch):02x}" for ch in text)


def render_terminal(matrix: Matrix) -> RenderableType:
    """A rich table (Text objects throughout, so "[...]" in a certificate is not markup)."""
    table = Table(title=TITLE, title_justify="left", caption=LEGEND, caption_justify="left")
    table.add_column("block · dtype · mode")
    for col in matrix.columns:
        table.add_column(Text(_plain(col.label)))
    for row in matrix.rows:
        cells = [Text(_plain(matrix.cell(row, c).text), style=_STYLE[matrix.cell(row, c).status])
                 for c in matrix.columns]
        table.add_row(Text(_plain(row.label)), *cells)
    parts: list[RenderableType] = [table, Text("coverage:", style="bold")]
    parts += [Text(f"  {_plain(c.label)}: {_plain(c.coverage())}") for c in matrix.columns]
    parts += [Text(f"note: {_plain(n)}", style="dim") for n in matrix.notes]
    parts += [Text(f"skipped: {_plain(s)}", style="yellow") for s in matrix.skipped]
    return Group(*parts)


# --- Markdown ---------------------------------------------------------------------------------

def _md(text: str) -> str:
    # GitHub renders inline HTML and would split a cell at "|"
    return html.escape(_plain(text), quote=False).replace("|", "\\|")


def to_markdown(matrix: Matrix) -> str:
    """A GitHub table, the per-column coverage and numbered footnotes for non-pass reasons."""
    out = [f"# {TITLE}", "", "| block · dtype · mode | " + " | ".join(_md(c.label) for c in matrix.columns) + " |",
           "|---" * (len(matrix.columns) + 1) + "|"]
    footnotes: list[str] = []
    for row in matrix.rows:
        texts = []
        for col in matrix.columns:
            cell = matrix.cell(row, col)
            text = _md(cell.text)
            if cell.reason is not None:
                footnotes.append(f"[{len(footnotes) + 1}] {row.label} on {col.label}: {cell.reason}")
                text += f" [{len(footnotes)}]"
            texts.append(text)
        out.append(f"| {_md(row.label)} | " + " | ".join(texts) + " |")
    out += ["", LEGEND, "", "## Coverage", ""]
    out += [f"- {_md(c.label)}: {_md(c.coverage())} — {_md(c.path.name)}, created {_md(c.cert.created_at)}"
            for c in matrix.columns]
    for title, items in (("Reasons", footnotes), ("Notes", matrix.notes), ("Skipped files", matrix.skipped)):
        if items:
            out += ["", f"## {title}", ""] + [f"- {_md(item)}" for item in items]
    return "\n".join(out) + "\n"


# --- HTML -------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #111; }
table.matrix { border-collapse: collapse; }
table.matrix th, table.matrix td { border: 1px solid #ccc; padding: 4px 8px; white-space: nowrap; }
table.matrix th { background: #f3f4f6; text-align: left; }
td.pass { color: #0b3d17; }
td.fail { background: #f4a6a6; color: #5c0b0b; font-weight: bold; }
td.unsupported { background: #fde68a; color: #5c4400; }
td.skipped { background: #e5e7eb; color: #444; }
td.not-submitted { background: #fff; color: #888; font-style: italic;
  background-image: repeating-linear-gradient(45deg, #fff 0 6px, #f5f5f5 6px 12px); }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 6px; border: 1px solid #ccc; }
.muted { color: #666; }
svg text { font: 12px system-ui, sans-serif; fill: #111; }
pre { background: #f8f8f8; padding: 6px; white-space: pre-wrap; max-width: 1100px; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _pass_colour(speedup: float | None) -> str:
    """Light green at or below the reference's speed, darker up to 8x (log scale)."""
    x = 0.0 if speedup is None else min(max(math.log2(speedup), 0.0), 3.0) / 3.0
    return f"hsl(130, 55%, {88 - 36 * x:.0f}%)"


def _cell_html(row: Row, col: Column, cell: Cell) -> str:
    hover = [f"{row.label} on {col.label}", f"status: {cell.status}"]
    if cell.total:
        hover.append(f"{cell.passed} passed / {cell.run} run / {cell.total} cases; impls: {', '.join(cell.impls)}")
    if cell.reason:
        hover.append(f"reason: {cell.reason}")
    if cell.suspect:
        hover.append("suspect speed-up (> 10x over the reference, persisted when re-measured)")
    cls = cell.status.replace(" ", "-")
    style = f' style="background: {_pass_colour(cell.speedup)}"' if cell.status == "pass" else ""
    return f'<td class="{cls}"{style} title="{_esc(chr(10).join(hover))}">{_esc(cell.text)}</td>'


def _chart(kind: str, bars: list[Bar]) -> str:
    """A horizontal SVG bar chart of speed-ups, with the reference (1x) as a dashed line."""
    label_w, bar_w, h, top = 380, 460, 22, 8
    scale = max(max(b.speedup for b in bars), 1.0) * 1.15
    height = top + h * len(bars) + 24
    parts = [f'<svg role="img" width="{label_w + bar_w + 60}" height="{height}" '
             f'aria-label="{_esc(f"speed-up of {kind} impls over the reference")}">']
    for i, b in enumerate(bars):
        y = top + i * h
        w = max(b.speedup / scale * bar_w, 1.0)
        colour = "#2f9e44" if b.speedup >= 1 else "#e8590c"
        value = f"{_num(b.speedup)}x" + ("?" if b.suspect else "")
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_esc(b.label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{h - 6}" fill="{colour}">'
                     f'<title>{_esc(f"{b.label}: {value} over {b.cases} case(s)")}</title></rect>')
        # a bar shorter than the reference line gets its value past the line, not across it
        parts.append(f'<text x="{label_w + max(w, bar_w / scale) + 4:.1f}" y="{y + 15}">{_esc(value)}</text>')
    ref = label_w + bar_w / scale
    parts.append(f'<line x1="{ref:.1f}" x2="{ref:.1f}" y1="{top}" y2="{top + h * len(bars)}" stroke="#111" '
                 f'stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{ref:.1f}" y="{height - 6}" text-anchor="middle">reference 1x</text></svg>')
    return "".join(parts)


def to_html(matrix: Matrix) -> str:
    """One self-contained page: inline CSS and SVG only, no script and no external resource."""
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{TITLE}</title><style>{_CSS}</style></head><body>", f"<h1>{TITLE}</h1>",
           '<p class="legend"><span class="pass" style="background: hsl(130, 55%, 88%)">pass</span>'
           '<span class="pass" style="background: hsl(130, 55%, 52%)">pass, ≥ 8x</span>'
           '<span class="fail" style="background: #f4a6a6">fail</span>'
           '<span style="background: #fde68a">unsupported</span><span style="background: #e5e7eb">skipped</span>'
           f'<span class="muted">{NOT_SUBMITTED}</span></p>', f'<p class="muted">{_esc(LEGEND)}</p>',
           '<table class="matrix"><thead><tr><th>block · dtype · mode</th>']
    out += [f"<th>{_esc(c.label)}</th>" for c in matrix.columns]
    out.append("</tr></thead><tbody>")
    for row in matrix.rows:
        out.append(f"<tr><th>{_esc(row.label)}</th>"
                   + "".join(_cell_html(row, c, matrix.cell(row, c)) for c in matrix.columns) + "</tr>")
    out.append("</tbody></table><h2>Coverage</h2><ul>")
    out += [f"<li><b>{_esc(c.label)}</b>: {_esc(c.coverage())} <span class=\"muted\">— {_esc(c.path.name)}, "
            f"created {_esc(c.cert.created_at)}</span></li>" for c in matrix.columns]
    out.append("</ul><h2>Speed-up over the reference, per block</h2>")
    if not matrix.bars:
        out.append('<p class="muted">No passing case has a measured speed-up.</p>')
    for kind, bars in matrix.bars.items():
        out.append(f"<h3>{_esc(kind)}</h3>{_chart(kind, bars)}")
    failures = [(col, c) for col in matrix.columns for c in col.cert.cases if c.status == "fail"]
    if failures:
        out.append("<h2>Failed cases</h2>")
        for col, c in failures:
            out.append(f"<details><summary>{_esc(col.label)}: {_esc(c.id)} ({_esc(c.impl)}, {_esc(c.dtype)}, "
                       f"{_esc(c.mode)})</summary><p>{_esc(c.origin)}</p>"
                       f"<pre>{_esc(json.dumps(c.config, indent=1, sort_keys=True))}</pre><ul>"
                       + "".join(f"<li>{_esc(r)}</li>" for r in c.reasons) + "</ul></details>")
    for title, items in (("Notes", matrix.notes), ("Skipped files", matrix.skipped)):
        if items:
            out.append(f"<h2>{title}</h2><ul>" + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"

"""The certification matrix: merging certificates, the status rules, robustness to bad files, and
the three renderings (terminal, Markdown, a self-contained HTML page checked in headless Chromium)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from llmkit import certificate
from llmkit.certificate import Case, CertificateError
from llmkit.matrix import NOT_SUBMITTED, MatrixWarning, build_matrix, render_terminal, to_html, to_markdown

ATTN, MLP = "attention@1", "mlp@1"


def prec(ratio: float) -> dict[str, Any]:
    return {"e_max": ratio * 1e-3, "e_mean": 1e-4, "e_naive": 1e-3, "ratio": ratio, "threshold": 2e-3,
            "k": 2.0, "floor": 0.0, "nonfinite": 0}


def perf(speedup: float, suspect: bool = False) -> dict[str, Any]:
    return {"median_s": 1e-3, "iqr_s": 1e-5, "n": 20, "warmup": 3, "noisy": False, "flops": 1e9,
            "bytes": 1e6, "flops_per_s": 1e12, "bytes_per_s": 1e9, "fraction_of_peak": 0.5,
            "reference_median_s": speedup * 1e-3, "speedup": speedup, "suspect": suspect}


def case(i: int, impl: str, kind: str = ATTN, status: str = "pass", dtype: str = "bfloat16",
         mode: str = "infer", ratio: float | None = 1.2, speedup: float | None = 2.0,
         reasons: list[str] | None = None, config: dict[str, Any] | None = None) -> Case:
    executed = status in ("pass", "fail")
    return Case(
        id=f"{kind}-{impl}-{dtype}-{mode}-{i}", impl=impl, kind=kind, suite="closed",
        origin=f"tiny-llama layers.{i}", config=config or {"heads": 4}, shape={"batch": 1, "seq": 16},
        dtype=dtype, mode=mode, status=status, reasons=reasons or [],
        forward=prec(ratio) if executed and ratio is not None else None,
        calls=3 if executed else None,
        perf=perf(speedup) if executed and speedup is not None else None,
    )


def cert(backend: str, cases: list[Case], device: str = "cpu", host: str = "box1",
         created_at: str = "2025-01-01T00:00:00+00:00") -> certificate.Certificate:
    return certificate.seal({
        "schema": certificate.SCHEMA, "created_at": created_at, "backend": backend, "device": device,
        "plugin": {"name": backend, "distribution": f"llmkit-{backend}", "version": "1.0"},
        "environment": {"host": host, "torch": "2.13.0"},
        "peak": {"flops_per_s": {"bfloat16": 1e12, "source": "datasheet"}},
        "suite": {"version": 1, "hash": "sha256:" + "1" * 64, "seed": 0, "quick": True, "scale": "tiny",
                  "blocks": None, "dtypes": ["bfloat16", "float32"]},
        "impls": {impl: {"kind": kind, "plugin": backend, "source_hash": "sha256:" + "2" * 64,
                         "reference_hash": "sha256:" + "3" * 64}
                  for impl, kind in sorted({(c.impl, c.kind) for c in cases})},
        "cases": [c.model_dump(mode="json") for c in cases],
        "summary": certificate.summarize(cases).model_dump(),
    })


def put(tmp_path: Path, name: str, c: certificate.Certificate) -> Path:
    path = tmp_path / name
    certificate.write(c, path)
    return path


@pytest.fixture
def two_backends(tmp_path: Path) -> list[Path]:
    cpu = cert("cpu", [case(0, "cpu.sdpa", speedup=2.0), case(1, "cpu.flash", speedup=8.0),
                       case(2, "cpu.sdpa", dtype="float32", status="fail", ratio=45.0,
                            reasons=["e_max 4.5e-2 > threshold 2e-3"]),
                       case(3, "cpu.sdpa", dtype="float32", ratio=1.1),
                       case(4, "cpu.mlp", kind=MLP, status="unsupported", reasons=["no int4 on this CPU"])])
    acme = cert("acme", [case(0, "acme.fa", speedup=3.0), case(1, "acme.fa", kind=MLP, dtype="float32",
                                                             status="skipped", reasons=["out of memory budget"])],
                device="acme:0", host="lab7")
    return [put(tmp_path, "cpu.json", cpu), put(tmp_path, "acme.json", acme)]


def cell_text(m: Any, row: str, col: str) -> Any:
    r = next(r for r in m.rows if r.label == row)
    c = next(c for c in m.columns if c.label == col)
    return m.cell(r, c)


def test_merges_two_backends_into_one_row_per_kind_dtype_mode(two_backends: list[Path]) -> None:
    m = build_matrix(two_backends)
    assert [c.label for c in m.columns] == ["acme/acme:0 @ lab7", "cpu/cpu @ box1"]
    assert [r.label for r in m.rows] == ["attention@1 · bfloat16 · infer", "attention@1 · float32 · infer",
                                         "mlp@1 · bfloat16 · infer", "mlp@1 · float32 · infer"]
    both = cell_text(m, "attention@1 · bfloat16 · infer", "cpu/cpu @ box1")
    # two impls of one backend aggregate into one cell; the speed-up is their geometric mean
    assert (both.status, both.passed, both.run, both.impls) == ("pass", 2, 2, ["cpu.flash", "cpu.sdpa"])
    assert both.speedup == pytest.approx(4.0)
    assert both.text == "pass 2/2 · r≤1.2 · 4x"
    assert cell_text(m, "attention@1 · bfloat16 · infer", "acme/acme:0 @ lab7").text == "pass 1/1 · r≤1.2 · 3x"
    assert [b.label for b in m.bars[ATTN]] == ["acme.fa · bfloat16 · infer", "cpu.flash · bfloat16 · infer",
                                               "cpu.sdpa · bfloat16 · infer", "cpu.sdpa · float32 · infer"]
    assert json.loads(json.dumps(m.to_dict()))["columns"][1]["summary"]["total"] == 5


def test_not_submitted_is_distinct_from_fail_unsupported_and_skipped(two_backends: list[Path]) -> None:
    m = build_matrix(two_backends)
    failed = cell_text(m, "attention@1 · float32 · infer", "cpu/cpu @ box1")
    assert (failed.status, failed.passed, failed.run, failed.ratio) == ("fail", 1, 2, 45.0)
    assert failed.reason == "e_max 4.5e-2 > threshold 2e-3"
    assert failed.speedup == pytest.approx(2.0)  # only the passing case's speed counts
    assert cell_text(m, "attention@1 · float32 · infer", "acme/acme:0 @ lab7").status == NOT_SUBMITTED
    unsupported = cell_text(m, "mlp@1 · bfloat16 · infer", "cpu/cpu @ box1")
    assert (unsupported.status, unsupported.reason) == ("unsupported", "no int4 on this CPU")
    assert cell_text(m, "mlp@1 · float32 · infer", "acme/acme:0 @ lab7").status == "skipped"
    assert cell_text(m, "mlp@1 · float32 · infer", "cpu/cpu @ box1").text == NOT_SUBMITTED


def test_same_column_keeps_the_newest_certificate_and_says_so(tmp_path: Path) -> None:
    old = put(tmp_path, "old.json", cert("cpu", [case(0, "cpu.sdpa", status="fail", reasons=["x"])],
                                         created_at="2025-01-01T00:00:00+00:00"))
    new = put(tmp_path, "new.json", cert("cpu", [case(0, "cpu.sdpa")], created_at="2025-03-01T00:00:00+00:00"))
    for order in ([old, new], [new, old]):
        m = build_matrix(order)
        assert len(m.columns) == 1 and m.columns[0].path == new
        assert m.rows and m.cell(m.rows[0], m.columns[0]).status == "pass"
        assert len(m.notes) == 1 and "new.json" in m.notes[0] and "old.json" in m.notes[0]


def test_bad_files_are_skipped_with_a_warning_and_the_rest_render(tmp_path: Path, two_backends: list[Path]) -> None:
    good = two_backends[0].read_text()
    (tmp_path / "corrupt.json").write_bytes(b"\x00\xffnot json at all")
    (tmp_path / "truncated.json").write_text(good[: len(good) // 2])
    data = json.loads(good)
    data["cases"][2]["status"] = "pass"  # a failed case quietly turned into a pass
    data["summary"] = certificate.summarize(Case.model_validate(c) for c in data["cases"]).model_dump()
    (tmp_path / "tampered.json").write_text(json.dumps(data))
    (tmp_path / "nan.json").write_text(good.replace('"ratio": 45.0', '"ratio": NaN'))
    with pytest.warns(MatrixWarning) as record:
        m = build_matrix([tmp_path, tmp_path / "missing.json"])
    messages = [str(w.message) for w in record]
    assert messages == m.skipped and len(messages) == 5
    for name, why in [("corrupt.json", "not UTF-8"), ("truncated.json", "truncated?"),
                      ("tampered.json", "content hash mismatch"), ("nan.json", "finite numbers only"),
                      ("missing.json", "no such certificate file")]:
        assert any(name in msg and why in msg for msg in messages), (name, messages)
    assert [c.label for c in m.columns] == ["acme/acme:0 @ lab7", "cpu/cpu @ box1"]
    text = to_markdown(m)
    assert "## Skipped files" in text and "tampered.json" in text


def test_no_usable_certificate_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    with pytest.warns(MatrixWarning), pytest.raises(CertificateError, match="no usable certificate.*a.json"):
        build_matrix([tmp_path / "a.json"])


def test_markdown_has_the_table_coverage_and_reasons(two_backends: list[Path]) -> None:
    md = to_markdown(build_matrix(two_backends))
    lines = md.splitlines()
    assert lines[0] == "# llmkit certification matrix"
    assert "| block · dtype · mode | acme/acme:0 @ lab7 | cpu/cpu @ box1 |" in lines
    assert "|---|---|---|" in lines
    assert "| attention@1 · bfloat16 · infer | pass 1/1 · r≤1.2 · 3x | pass 2/2 · r≤1.2 · 4x |" in lines
    row = next(line for line in lines if line.startswith("| attention@1 · float32"))
    assert re.fullmatch(r"\| attention@1 · float32 · infer \| not submitted \| fail 1/2 · r≤45 · 2x \[\d\] \|", row)
    assert "- cpu/cpu @ box1: 3 passed / 4 run / 5 total (1 failed, 1 unsupported, 0 skipped)" in md
    assert "no int4 on this CPU" in md and "out of memory budget" in md


def hostile(tmp_path: Path) -> Path:
    evil = "<script>alert(1)</script>"
    c = cert("cpu", [case(0, "cpu.sdpa", status="fail", config={"name": evil, "url": "https://x.invalid/a.js"},
                           reasons=[f"bad {evil} [bold red]markup[/] \x1b[2J"])],
             host='<img src="http://x.invalid/p.png"> [red]x[/red]')
    return put(tmp_path, "hostile.json", c)


def test_html_escapes_certificate_text_and_loads_nothing_external(tmp_path: Path, two_backends: list[Path]) -> None:
    page = to_html(build_matrix([*two_backends, hostile(tmp_path)]))
    assert "<title>llmkit certification matrix</title>" in page and "<h1>llmkit certification matrix</h1>" in page
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the config shows, as text
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|url\(|@import""", page, re.I)
    assert page.count("<svg") == 1  # one chart per block kind with speed-ups (only attention has any)


def test_terminal_table_shows_certificate_text_literally(tmp_path: Path, two_backends: list[Path]) -> None:
    console = Console(file=io.StringIO(), record=True, width=250, color_system="truecolor")
    console.print(render_terminal(build_matrix([*two_backends, hostile(tmp_path)])))
    out = console.export_text(styles=True, clear=False)
    assert "\x1b[2J" not in out  # a certificate cannot drive the terminal
    plain = console.export_text()
    assert "pass 2/2 · r≤1.2 · 4x" in plain and "not submitted" in plain
    assert "cpu/cpu @ box1: 3 passed / 4 run / 5 total" in plain
    assert '<img src="http://x.invalid/p.png"> [red]x[/red]' in plain  # not taken as rich markup


# --- the HTML page in a real browser ----------------------------------------------------------

def png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB(A) PNG (what Chromium writes) to an (h, w, channels) array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.uint8)
    prev = np.zeros(width * bpp, np.int32)
    for y in range(height):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            row = line
        elif f == 2:
            row = (line + prev) & 255
        elif f == 1:  # Sub: each byte adds the one bpp to its left, i.e. a running sum per channel
            row = (np.cumsum(line.reshape(width, bpp), axis=0) & 255).reshape(-1)
        else:  # Average and Paeth depend on the byte just decoded: byte by byte
            row = line.copy()
            for x in range(width * bpp):
                a = int(row[x - bpp]) if x >= bpp else 0
                b, c = int(prev[x]), (int(prev[x - bpp]) if x >= bpp else 0)
                if f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                row[x] = (row[x] + pred) & 255
        out[y], prev = row, row
    return out.reshape(height, width, bpp)[:, :, :3]


def test_html_page_renders_in_headless_chromium(tmp_path: Path, two_backends: list[Path]) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not found on PATH (make test installs the Debian package 'chromium')")
    page = tmp_path / "matrix.html"
    page.write_text(to_html(build_matrix(two_backends)), encoding="utf-8")
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_CACHE_HOME": str(home / "cache"), "XDG_DATA_HOME": str(home / "data")}
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={home / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri()],
                   env=env, check=True, capture_output=True, timeout=60)
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], env=env, check=True, capture_output=True,
                         text=True, timeout=60).stdout
    assert "<title>llmkit certification matrix</title>" in dom
    assert re.search(r"<td class=\"pass\"[^>]*>pass 2/2 · r≤1.2 · 4x</td>", dom)
    assert '<td class="not-submitted"' in dom and "<svg" in dom

    pixels = png_pixels(shot)
    assert pixels.shape[:2] == (1000, 1400)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50, "the screenshot is (nearly) one flat colour"
    assert (pixels.min(axis=2) < 250).mean() > 0.02, "the screenshot is almost all white"
    # the heat-map really is painted: the fail cell's red and the chart's green bars are on screen
    for name, rgb in [("fail cell", (0xF4, 0xA6, 0xA6)), ("speed-up bar", (0x2F, 0x9E, 0x44))]:
        near = np.abs(pixels.astype(int) - rgb).max(axis=2) <= 3
        assert near.sum() > 200, f"no {name} colour {rgb} in the screenshot"

"""`llmkit certify` / `verify-cert`: the precision rule catches wrong impls, claims are checked,
certificates are tamper-evident and go stale, and an interrupted run resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmkit import LlmkitError, Registry, certificate
from llmkit.certificate import CertificateError
from llmkit.certify import CaseRunner, _choices, certify, model_case
from llmkit.cli import main
from llmkit.impls import Impl

sys.path.insert(0, str(Path(__file__).parent / "plugins" / "wrongvendor"))
import llmkit_wrongvendor  # noqa: E402


def _strip(cert: certificate.Certificate) -> list[dict]:
    """Cases without timings (which differ from run to run)."""
    return [c.model_dump(exclude={"perf"}) for c in cert.cases]


@pytest.fixture(scope="module")
def wrong_cert(tmp_path_factory: pytest.TempPathFactory) -> certificate.Certificate:
    registry = Registry.load([("wrongvendor", llmkit_wrongvendor)])
    out = tmp_path_factory.mktemp("wrong") / "wrong.json"
    certify(registry, "wrong", out=out, quick=True, perf=False,
            dtypes=["float32", "bfloat16", "float16"], modes=["infer"])
    return certificate.load(out)


def _cases(cert: certificate.Certificate, impl: str, status: str | None = None) -> list[certificate.Case]:
    return [c for c in cert.cases if c.impl == impl and (status is None or c.status == status)]


def test_off_by_one_window_fails_exactly_on_the_window_cases(wrong_cert) -> None:
    failed = _cases(wrong_cert, "wrong.window_plus_one", "fail")
    assert failed and all(c.config["window"] is not None for c in failed)
    assert any("window 5 edges" in c.origin for c in failed)
    # where the window does not bind (no window, or too few tokens) it computes the reference
    passed = _cases(wrong_cert, "wrong.window_plus_one", "pass")
    assert any(c.config["window"] is None for c in passed)
    assert all("e_max" in c.reasons[0] and "e_naive" in c.reasons[0] for c in failed)


def test_rope_angles_in_bf16_fail_in_float32(wrong_cert) -> None:
    cases = _cases(wrong_cert, "wrong.bf16_angles")
    ran = [c for c in cases if c.status != "unsupported"]
    assert ran and all(c.status == "fail" for c in ran)
    assert all(c.forward.ratio > 100 for c in ran)


def test_router_that_renormalises_fails_where_the_config_says_not_to(wrong_cert) -> None:
    # skewed routing puts ~all softmax mass on one expert: renormalising is then a no-op to
    # within float32, and the rule rightly cannot tell
    cases = [c for c in _cases(wrong_cert, "wrong.renormalise") if c.status != "unsupported" and "skewed" not in c.id]
    assert {c.status for c in cases if c.config["renormalize"] == "none"} == {"fail"}
    assert {c.status for c in cases if c.config["renormalize"] == "sum"} == {"pass"}
    assert any("tiny-grok-1" in c.origin for c in cases if c.status == "fail")


def test_float16_accumulation_fails_the_ratio_rule(wrong_cert) -> None:
    failed = _cases(wrong_cert, "wrong.fp16_accumulate", "fail")
    assert failed
    for c in failed:
        p = c.forward
        assert p.nonfinite == 0 and p.ratio > p.k and p.e_max > p.threshold


def test_a_claimed_dtype_that_crashes_fails_the_claim(wrong_cert) -> None:
    cases = _cases(wrong_cert, "wrong.crashes_on_bf16")
    by_dtype = {d: {c.status for c in cases if c.dtype == d} for d in ("float32", "bfloat16", "float16")}
    assert by_dtype == {"float32": {"pass"}, "bfloat16": {"fail"}, "float16": {"unsupported"}}
    assert all("raised RuntimeError: kernel not compiled for bfloat16" in c.reasons[0]
               for c in cases if c.dtype == "bfloat16")
    assert all("dtype float16 not declared" in c.reasons[0] for c in cases if c.dtype == "float16")


def test_a_capability_check_that_raises_is_a_failure_not_a_refusal(wrong_cert) -> None:
    cases = _cases(wrong_cert, "wrong.raising_check")
    float32 = [c for c in cases if c.dtype == "float32"]
    assert float32 and all(c.status == "fail" and "not_supported_reasons raised KeyError" in c.reasons[0]
                           for c in float32)


def test_passing_cases_prove_the_impl_ran(wrong_cert) -> None:
    passed = [c for c in wrong_cert.cases if c.status == "pass"]
    assert passed and all(c.calls and c.calls >= 1 for c in passed)
    assert wrong_cert.summary.failed == sum(c.status == "fail" for c in wrong_cert.cases) > 0


def test_routing_choices_may_differ_only_at_near_ties() -> None:
    exact_scores = torch.tensor([[0.5, 0.3, 0.3, 0.1], [0.6, 0.3, 0.1, 0.0]], dtype=torch.float64)
    naive_scores = exact_scores + 1e-4
    exact = (torch.tensor([[0, 1], [0, 1]]), exact_scores)
    naive = (torch.tensor([[0, 1], [0, 1]]), naive_scores)
    # token 0 ties at the 2nd place: choosing expert 2 instead of 1 is allowed
    mism, ties, skip = _choices(exact, naive, torch.tensor([[0, 2], [0, 1]]), 2, torch.float32)
    assert (mism, ties, skip.tolist()) == (0, 1, [True, False])
    # token 1 has a clear gap (0.3 vs 0.1): choosing expert 2 there is a wrong answer
    mism, ties, _ = _choices(exact, naive, torch.tensor([[0, 1], [0, 2]]), 2, torch.float32)
    assert (mism, ties) == (1, 0)


@pytest.fixture(scope="module")
def cpu_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cpu") / "cpu.json"
    certify(Registry.load(), "cpu", out=out, quick=True, blocks=["norm", "moe"], perf=True)
    return out


def test_cpu_quick_certificate_passes_and_records_the_fields(cpu_cert) -> None:
    cert = certificate.load(cpu_cert)
    assert cert.summary.failed == 0 and cert.summary.passed > 20
    assert {c.suite for c in cert.cases} == {"closed", "edge", "open"}
    assert set(cert.impls) == {"moe@1/cpu.grouped", "norm@1/cpu.fused"}
    assert all(i.source_hash.startswith("sha256:") for i in cert.impls.values())
    assert cert.environment["torch"] == torch.__version__ and cert.plugin["distribution"] == "llmkit-backend-cpu"
    assert cert.peak["float32"]["flops_per_s"] > 0 and cert.peak["float32"]["source"]
    assert any(c.shape.get("batch") == 2 and "skewed" in c.id for c in cert.cases)
    timed = [c.perf for c in cert.cases if c.perf is not None]
    assert timed and all(p.n >= 5 and p.median_s > 0 and p.reference_median_s > 0 and p.speedup > 0 for p in timed)
    assert any(p.flops > 0 and p.fraction_of_peak for p in timed)
    assert certificate.stale_reasons(cert, Registry.load()) == []


def test_tampering_is_detected(cpu_cert, tmp_path) -> None:
    data = json.loads(cpu_cert.read_text())
    data["cases"][0]["forward"]["e_max"] = 0.0
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(CertificateError, match="content hash mismatch"):
        certificate.load(bad)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(cpu_cert.read_text()[:5000])
    with pytest.raises(CertificateError, match=r"truncated.json:\d+:\d+: invalid JSON.*truncated"):
        certificate.load(truncated)
    del data["cases"][3]["dtype"]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({**data, "content_hash": certificate.content_hash(data)}))
    with pytest.raises(CertificateError, match=r"cases\[3\]\.dtype: Field required"):
        certificate.load(missing)
    other = tmp_path / "future.json"
    other.write_text(json.dumps({**data, "schema": "llmkit-certificate/9"}))
    with pytest.raises(CertificateError, match="this llmkit reads 'llmkit-certificate/1'"):
        certificate.load(other)
    assert main(["verify-cert", str(bad)]) == 2


def test_a_changed_environment_or_source_makes_it_stale(cpu_cert, tmp_path, capsys) -> None:
    data = json.loads(cpu_cert.read_text())
    data.pop("content_hash")
    data["environment"]["torch"] = "2.0.0"
    data["impls"]["norm@1/cpu.fused"]["source_hash"] = "sha256:" + "0" * 64
    stale = tmp_path / "stale.json"
    certificate.write(certificate.seal(data), stale)
    reasons = certificate.stale_reasons(certificate.load(stale), Registry.load())
    assert any(r.startswith("torch changed: certified with 2.0.0") for r in reasons)
    assert "impl cpu.fused: source changed since certification" in reasons
    assert main(["verify-cert", str(stale)]) == 1
    assert main(["verify-cert", str(cpu_cert)]) == 0
    out = capsys.readouterr().out
    assert "stale" in out and "valid" in out


def test_resume_continues_without_redoing_finished_cases(tmp_path, monkeypatch) -> None:
    registry = Registry.load()
    kw = dict(quick=True, blocks=["norm", "rope"], perf=False)
    whole = certify(registry, "cpu", out=tmp_path / "whole.json", **kw)

    class Stop(Exception):
        pass

    def stop_at(i: int, total: int, case) -> None:
        if i == 30:
            raise Stop

    out = tmp_path / "resumed.json"
    with pytest.raises(Stop):
        certify(registry, "cpu", out=out, progress=stop_at, **kw)
    journal = out.with_name(out.name + ".journal")
    assert not out.exists() and len(journal.read_text().splitlines()) == 31  # header + 30 cases
    ran = []
    run = CaseRunner.run
    monkeypatch.setattr(CaseRunner, "run", lambda self, case: ran.append(case.id) or run(self, case))
    resumed = certify(registry, "cpu", out=out, resume=True, **kw)
    assert len(ran) == whole.summary.total - 30
    assert _strip(resumed) == _strip(whole)
    assert not journal.exists()
    with pytest.raises(CertificateError, match="cannot resume"):
        journal.write_text(json.dumps({"journal": "llmkit-certify", "backend": "cpu", "suite": "other"}) + "\n")
        certify(registry, "cpu", out=out, resume=True, **kw)


def test_kill_9_loses_at_most_the_case_in_flight(tmp_path) -> None:
    out = tmp_path / "killed.json"
    journal = out.with_name(out.name + ".journal")
    cmd = [sys.executable, "-m", "llmkit", "certify", "--backend", "cpu", "--quick", "--blocks", "norm,mlp",
           "--no-perf", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if journal.exists() and len(journal.read_text().splitlines()) > 20:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = len(journal.read_text().splitlines()) - 1
    assert done >= 20
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    whole = certify(Registry.load(), "cpu", out=tmp_path / "whole.json", quick=True, blocks=["norm", "mlp"],
                    perf=False)
    assert _strip(certificate.load(out)) == _strip(whole)


def test_cli_certify_reports_failures_with_exit_code(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("llmkit.cli.default_registry", lambda: Registry.load([("wrongvendor", llmkit_wrongvendor)]))
    code = main(["certify", "--backend", "wrong", "--quick", "--blocks", "norm", "--no-perf",
                 "--out", str(tmp_path / "w.json")])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL norm@1/wrong.crashes_on_bf16/" in out and "kernel not compiled for bfloat16" in out
    assert "certificate written to" in out


def test_unknown_block_kind_and_dtype_are_refused(tmp_path) -> None:
    with pytest.raises(Exception, match="unknown block kind 'attn'"):
        certify(Registry.load(), "cpu", out=tmp_path / "x.json", blocks=["attn"])
    with pytest.raises(Exception, match="float17"):
        certify(Registry.load(), "cpu", out=tmp_path / "x.json", dtypes=["float17"])


def test_quick_certification_of_cpu_and_reference(tmp_path, capsys) -> None:
    """What CI certifies on every run: both backends pass the quick suite, and the matrix merges them."""
    for backend in ("cpu", "reference"):
        assert main(["certify", "--backend", backend, "--quick", "--out", str(tmp_path / f"{backend}.json")]) == 0
    assert main(["verify-cert", str(tmp_path / "cpu.json"), str(tmp_path / "reference.json")]) == 0
    md = tmp_path / "matrix.md"
    assert main(["matrix", str(tmp_path), "--md", str(md)]) == 0
    text = md.read_text()
    assert "cpu/cpu" in text and "reference/cpu" in text and "moe@1 · bfloat16 · infer" in text
    ref = certificate.load(tmp_path / "reference.json")
    assert any(c.mode == "train" and c.status == "pass" and c.backward is not None for c in ref.cases)


def test_composition_catches_a_wrong_block_inside_a_model() -> None:
    wrong = Registry.load([("wrongvendor", llmkit_wrongvendor)])
    bad = model_case(wrong, "wrong", "cpu", "tiny-grok-1", "float32")
    assert bad.status == "fail" and bad.impls.get("wrong.renormalise") == 2
    assert "logits: e_max" in bad.reasons[0] and bad.kl > 1e3 * max(bad.kl_naive, 1e-30)
    good = model_case(Registry.load(), "cpu", "cpu", "tiny-mixtral-8x7b", "bfloat16")
    assert good.status == "pass" and good.impls["cpu.grouped"] == 2 and good.fallbacks > 0
    assert good.top1 >= good.top1_naive - 1 / 32 and good.top5 > 0.9


def test_composition_needs_no_cpu_plugin(vendor) -> None:
    # a vendor's machine may have llmkit and its own plugin only: the float64 reference and the
    # low-precision reference then run on a backend that is installed (here the vendor's, which
    # owns the CPU), never on the absent 'cpu'
    only = Registry.load([("testvendor", vendor)],
                         environ={"LLMKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "LLMKIT_PLUGINS": "blocks"})
    assert "cpu" not in only.backends
    case = model_case(only, "testvendor", "cpu", "tiny-llama-3-8b", "float32")
    assert case.status == "pass" and case.impls.get("testvendor.rmsnorm", 0) > 0, case


def test_a_kind_without_cases_is_reported_skipped(tmp_path) -> None:
    import dataclasses

    import llmkit_blocks.plugin as blocks_plugin
    from llmkit.hookspecs import hookimpl

    class NoCases:
        LLMKIT_PLUGIN_API = 1

        @hookimpl
        def llmkit_block_kinds(self):
            return [dataclasses.replace(k, cases=None) if k.name == "norm" else k
                    for k in blocks_plugin.llmkit_block_kinds()]

    registry = Registry.load([("blocks-nocases", NoCases())], environ={"LLMKIT_PLUGINS": "cpu"})
    cert = certify(registry, "cpu", out=tmp_path / "c.json", quick=True, blocks=["norm"], perf=False)
    assert [c.status for c in cert.cases] == ["skipped", "skipped"]
    assert cert.cases[0].reasons == ["block kind norm@1 defines no certification cases"]


def test_source_hash_covers_the_whole_plugin_package(tmp_path, monkeypatch) -> None:
    """An impl's helpers may sit in any module of its plugin: editing one makes the hash change."""
    pkg = tmp_path / "llmkit_hashvendor"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .ops import forward\n")
    (pkg / "ops.py").write_text("from .helpers import scale\n\ndef forward(block, x):\n    return scale(x)\n")
    (pkg / "helpers.py").write_text("def scale(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import llmkit_hashvendor

    impl = Impl(kind="norm", backend="hv", name="x", forward=llmkit_hashvendor.forward,
                device_types=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))
    before = certificate.source_hash(impl)
    assert certificate.source_hash(impl) == before
    (pkg / "helpers.py").write_text("def scale(x):\n    return 3 * x\n")
    edited = certificate.source_hash(impl)
    assert edited != before
    (pkg / "kernel.c").write_text("float scale(float x) { return 3 * x; }\n")  # a kernel built at first use
    assert certificate.source_hash(impl) not in (before, edited)
    (pkg / "notes.txt").write_text("not a source")
    (pkg / "kernel.c").unlink()
    assert certificate.source_hash(impl) == edited
    for name in ("llmkit_hashvendor", "llmkit_hashvendor.ops", "llmkit_hashvendor.helpers"):
        monkeypatch.delitem(sys.modules, name)


def test_the_reference_runs_on_an_available_backend_of_the_device_type() -> None:
    """cuda and rocm both own device type "cuda": on a ROCm build only rocm is available, and the
    reference certification (and its staleness check) must pick it, not the first registered."""
    from llmkit.backend import Backend
    from llmkit.hookspecs import hookimpl

    class Unavailable(Backend):
        name, device_type = "acpu", "cpu"

        def available(self) -> list[str]:
            return ["not on this machine"]

    class Broken(Backend):
        name, device_type = "bcpu", "cpu"

        def available(self) -> list[str]:
            raise OSError("driver missing")

    class Vendor:
        LLMKIT_PLUGIN_API = 1

        @hookimpl
        def llmkit_backends(self) -> list[Backend]:
            return [Unavailable(), Broken()]

    registry = Registry.load([("acpu", Vendor())], environ={"LLMKIT_DISABLE_PLUGIN_AUTOLOAD": "1",
                                                             "LLMKIT_PLUGINS": "blocks,cpu"})
    assert list(registry.backends)[:2] == ["acpu", "bcpu"]  # first registered, but unavailable or broken
    assert registry.device_backend("cpu") == "cpu"  # a raising available() counts as unavailable
    with pytest.raises(LlmkitError, match="no registered backend runs device type 'hpu'"):
        registry.device_backend("hpu")

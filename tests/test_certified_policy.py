"""`--policy certified`: only impls with a passing, valid certificate for this environment run.

Certificates here are real ones, sealed with the environment, plugin and source hashes of this very
machine, so they stay valid exactly as long as a real `llmkit certify` output would. Every test
points `LLMKIT_CERT_DIR` at its own temporary directory: the user's certificates are never read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import llmkit
import llmkit.registry
from llmkit import CertificateWarning, FallbackWarning, Registry, Selection, SpecError, load_spec
from llmkit import certificate
from llmkit.certificate import Case, CertificateError, ImplInfo

PRESET = "tiny-llama-3-8b"
NORM = {"dim": 64}


@pytest.fixture(autouse=True)
def cert_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty default certificate directory of this test's own."""
    path = tmp_path / "default-certs"
    path.mkdir()
    monkeypatch.setenv("LLMKIT_CERT_DIR", str(path))
    return path


def case(impl: str, kind: str, status: str = "pass", dtype: str = "float32", mode: str = "infer") -> dict[str, Any]:
    return {"id": f"{kind}:{impl}:{dtype}:{mode}:{status}", "impl": impl, "kind": kind, "suite": "closed",
            "origin": "test", "config": {}, "shape": {"batch": 2, "tokens": 8}, "dtype": dtype, "mode": mode,
            "status": status}


def write_cert(registry: Registry, path: Path, cases: list[dict[str, Any]],
               source_hash: dict[str, str] | None = None) -> Path:
    """Seal and write a cpu certificate of `cases`; `source_hash` overrides impls' recorded hashes."""
    impls = {}
    for c in cases:
        impl = registry.impl(c["kind"], c["impl"])
        impls[f"{c['kind']}/{c['impl']}"] = ImplInfo(  # keyed as `llmkit certify` writes them
            kind=c["kind"], plugin=registry.impl_plugin(impl),
            source_hash=(source_hash or {}).get(c["impl"], certificate.source_hash(impl)),
            reference_hash=certificate.reference_hash(registry.kind(c["kind"])),
        ).model_dump()
    cert = certificate.seal({
        "schema": certificate.SCHEMA, "created_at": certificate.now_iso(), "backend": "cpu", "device": "cpu",
        "plugin": certificate.plugin_info(registry, "cpu"),
        "environment": certificate.environment(registry, "cpu", "cpu"), "peak": {},
        "suite": {"version": 1, "hash": "sha256:test", "seed": 0, "quick": True, "scale": "tiny",
                  "blocks": None, "dtypes": ["float32"]},
        "impls": impls, "cases": cases,
        "summary": certificate.summarize(Case.model_validate(c) for c in cases).model_dump(),
    })
    certificate.write(cert, path)
    return path


def resolve_norm(registry: Registry, certs: Path | None, dtype: str = "float32", policy: str = "certified"):
    sel = Selection.make(policy, certs=None if certs is None else [certs])
    return registry.resolve("norm", NORM, registry.target("cpu", dtype=dtype), sel)


def reasons(res: Any, impl: str) -> tuple[str, ...]:
    return next(r.reasons for r in res.rejected if r.impl == impl)


def test_a_passing_certificate_lets_the_impl_run(registry: Registry, tmp_path: Path) -> None:
    write_cert(registry, tmp_path / "cpu.json", [case("cpu.fused", "norm@1")])
    res = resolve_norm(registry, tmp_path / "cpu.json")
    assert res.impl.qualname == "cpu.fused" and not res.fallback
    assert res.certificate == "certified (cpu.json)"
    assert res.to_dict()["certificate"] == "certified (cpu.json)"
    assert dict(res.certificates)["reference.eager"] == "reference (certified by definition)"


def test_a_failing_certificate_rejects_naming_the_file_and_falls_back(registry: Registry, tmp_path: Path) -> None:
    write_cert(registry, tmp_path / "cpu.json", [case("cpu.fused", "norm@1"), case("cpu.fused", "norm@1", "fail")])
    res = resolve_norm(registry, tmp_path)
    assert res.impl.qualname == "reference.eager" and res.fallback
    assert reasons(res, "cpu.fused") == ("failed certification (cpu.json)",)
    assert res.reason == "fallback: no certified impl of backend 'cpu' can run this config"
    with pytest.warns(FallbackWarning, match=r"norm@1 -> reference\.eager"):
        model = llmkit.build(PRESET, dtype="float32", policy="certified", certs=[tmp_path], registry=registry)
    norm = next(e for e in model.plan.entries if e.path == "norm")
    assert norm.to_dict()["certificate"] == "reference (certified by definition)"
    assert model.plan.selection.to_dict()["certs"] == [str(tmp_path)]


def test_without_a_certificate_the_impl_is_rejected(registry: Registry) -> None:
    res = resolve_norm(registry, None)  # the (empty) default directory
    assert res.impl.qualname == "reference.eager"
    assert reasons(res, "cpu.fused") == ("no certificate for float32 infer",)


def test_a_stale_certificate_is_rejected(registry: Registry, tmp_path: Path) -> None:
    write_cert(registry, tmp_path / "cpu.json", [case("cpu.fused", "norm@1")],
               source_hash={"cpu.fused": "sha256:" + "0" * 64})
    res = resolve_norm(registry, tmp_path)
    assert res.impl.qualname == "reference.eager"
    assert reasons(res, "cpu.fused") == (
        "stale certificate cpu.json: impl cpu.fused: source changed since certification",)


def test_a_tampered_certificate_warns_and_counts_as_absent(registry: Registry, tmp_path: Path) -> None:
    path = write_cert(registry, tmp_path / "cpu.json", [case("cpu.fused", "norm@1", "fail")])
    data = json.loads(path.read_text())
    data["cases"][0]["status"], data["summary"]["passed"], data["summary"]["failed"] = "pass", 1, 0
    path.write_text(json.dumps(data))
    with pytest.warns(CertificateWarning, match=r"ignored 1 certificate file.*cpu\.json: content hash mismatch"):
        res = resolve_norm(registry, tmp_path)
    assert reasons(res, "cpu.fused") == ("no certificate for float32 infer",)


def test_a_dtype_the_certificate_does_not_cover_is_rejected(registry: Registry, tmp_path: Path) -> None:
    write_cert(registry, tmp_path / "cpu.json", [case("cpu.fused", "norm@1")])
    res = resolve_norm(registry, tmp_path, dtype="bfloat16")
    assert res.impl.qualname == "reference.eager"
    assert reasons(res, "cpu.fused") == ("no certificate for bfloat16 infer",)


def test_an_impl_name_serving_two_kinds_is_certified_per_kind(registry: Registry, tmp_path: Path) -> None:
    # cpu.linear is an impl of both mlp@1 and head@1; certifying one must not certify the other
    write_cert(registry, tmp_path / "cpu.json", [case("cpu.linear", "mlp@1")])
    target, sel = registry.target("cpu"), Selection.make("certified", certs=[tmp_path])
    mlp = registry.resolve("mlp", {"d_model": 64, "hidden": 128}, target, sel)
    head = registry.resolve("head", {"d_model": 64, "vocab_size": 256}, target, sel)
    assert mlp.impl.qualname == "cpu.linear"
    assert head.impl.qualname == "reference.eager"
    assert reasons(head, "cpu.linear") == ("no certificate for float32 infer",)


def test_certified_impls_rank_first_under_any_policy_when_certificates_are_given(
        registry: Registry, tmp_path: Path) -> None:
    attention = load_spec(PRESET, registry).layers[0].attention
    target = registry.target("cpu")
    assert registry.resolve("attention", attention, target).impl.qualname == "cpu.sdpa"  # priority
    write_cert(registry, tmp_path / "cpu.json", [case("cpu.flash", "attention@1")])
    res = registry.resolve("attention", attention, target, Selection.make("auto", certs=[tmp_path]))
    assert res.impl.qualname == "cpu.flash"
    assert res.reason.startswith("certified, priority") and res.reason.endswith("ahead of cpu.sdpa (uncertified)")
    assert dict(res.certificates)["cpu.sdpa"] == "no certificate for float32 infer"
    # a pin still comes first
    pinned = registry.resolve("attention", attention, target,
                              Selection.make("auto", impl={"attention": "cpu.sdpa"}, certs=[tmp_path]))
    assert pinned.impl.qualname == "cpu.sdpa"


def test_a_pin_on_an_uncertified_impl_cannot_be_honoured(registry: Registry) -> None:
    with pytest.raises(llmkit.ResolutionError, match=r"(?s)cannot honour pin norm=cpu\.fused.*cpu\.fused: no certificate for float32 infer"):
        registry.resolve("norm", NORM, registry.target("cpu"), Selection.make("certified", impl=["norm=cpu.fused"]))


def test_other_policies_read_no_certificates(registry: Registry, cert_dir: Path) -> None:
    (cert_dir / "junk.json").write_text("{not json")
    res = resolve_norm(registry, None, policy="auto")  # would warn if the junk were read
    assert res.impl.qualname == "cpu.fused" and res.certificates == () and "certificate" not in res.to_dict()


def test_the_store_is_read_once_per_build_and_again_when_files_change(
        registry: Registry, cert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cert(registry, cert_dir / "a.json", [case("cpu.fused", "norm@1")])
    reads: list[Path] = []
    real = certificate.load
    monkeypatch.setattr(certificate, "load", lambda p: reads.append(Path(p)) or real(p))
    with pytest.warns(FallbackWarning):
        model = llmkit.build(PRESET, dtype="float32", policy="certified", registry=registry)
    assert reads == [cert_dir / "a.json"]  # 15 blocks, one read
    assert model.plan.impl_of("norm") == "cpu.fused"
    with pytest.warns(FallbackWarning):
        llmkit.build(PRESET, dtype="float32", policy="certified", registry=registry, seed=1)
    assert len(reads) == 1
    write_cert(registry, cert_dir / "b.json", [case("cpu.cached", "rope@1")])
    with pytest.warns(FallbackWarning):
        model = llmkit.build(PRESET, dtype="float32", policy="certified", registry=registry)
    assert sorted(p.name for p in reads[1:]) == ["a.json", "b.json"]
    assert model.plan.impl_of("layers.0.attention.rope") == "cpu.cached"


def test_a_missing_certs_path_is_an_error(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="nowhere: no such certificate file or directory"):
        resolve_norm(registry, tmp_path / "nowhere")


def test_spec_policy_and_certs(registry: Registry, tmp_path: Path) -> None:
    write_cert(registry, tmp_path / "certs" / "cpu.json", [case("cpu.fused", "norm@1")])
    spec = tmp_path / "model.yaml"
    spec.write_text(f"name: mine\nextends: {PRESET}\ndtype: float32\npolicy: certified\ncerts: [certs]\n")
    loaded = load_spec(str(spec), registry)
    assert loaded.policy == "certified" and loaded.certs == (str(tmp_path / "certs"),)
    with pytest.warns(FallbackWarning):
        model = llmkit.build(str(spec), registry=registry)
    assert model.plan.selection.policy == "certified"
    assert model.plan.impl_of("norm") == "cpu.fused"
    assert model.plan.impl_of("layers.0.mlp") == "reference.eager"
    # the caller's policy wins (embedding and layer have no cpu impl: they fall back under any policy)
    with pytest.warns(FallbackWarning):
        model = llmkit.build(str(spec), policy="auto", registry=registry)
    assert model.plan.impl_of("layers.0.mlp") == "cpu.linear"


def test_spec_policy_errors_name_the_line(registry: Registry, tmp_path: Path) -> None:
    spec = tmp_path / "model.yaml"
    spec.write_text(f"name: mine\nextends: {PRESET}\npolicy: certifed\ncerts:\n  - missing\n")
    with pytest.raises(SpecError) as err:
        load_spec(str(spec), registry)
    text = str(err.value)
    assert f"{spec}:3: policy: unknown policy 'certifed'" in text and "did you mean 'certified'?" in text
    assert f"{spec}:5: certs.0: no such certificate file or directory: '{tmp_path / 'missing'}'" in text


def test_load_takes_certs(registry: Registry, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    write_cert(registry, tmp_path / "cpu.json", [case("cpu.fused", "norm@1")])
    with pytest.warns(FallbackWarning):
        model = llmkit.load(tmp_path / "ckpt", dtype="float32", policy="certified", certs=tmp_path / "cpu.json",
                            registry=registry)
    assert model.plan.impl_of("norm") == "cpu.fused" and model.plan.impl_of("head") == "reference.eager"


@pytest.fixture
def cli(make_cli):
    """Run `llmkit ARGS` in process with the built-in plugins; return (code, out, err)."""
    return make_cli("blocks,cpu", 250)


def test_cli_build_shows_certificate_status(cli, registry: Registry, tmp_path: Path) -> None:
    write_cert(registry, tmp_path / "cpu.json", [case("cpu.fused", "norm@1"), case("cpu.linear", "mlp@1", "fail")])
    args = ("build", PRESET, "--backend", "cpu", "--dtype", "float32", "--policy", "certified", "--certs", str(tmp_path))
    code, out, err = cli(*args)
    assert code == 0, err
    assert f"policy certified, certificates from {tmp_path}" in out
    assert "certificate" in out and "certified (cpu.json)" in out and "reference (certified by definition)" in out
    assert "failed certification (cpu.json)" in out and "no certificate for float32 infer" in out
    assert "fall back from backend 'cpu'" in err
    code, out, _ = cli(*args, "--json")
    blocks = {b["path"]: b for b in json.loads(out)["blocks"]}
    assert blocks["norm"]["impl"] == "cpu.fused" and blocks["norm"]["certificate"] == "certified (cpu.json)"
    assert {"impl": "cpu.linear", "reasons": ["failed certification (cpu.json)"]} in blocks["layers.0.mlp"]["rejected"]


def test_cli_explain_and_errors(cli, registry: Registry, tmp_path: Path) -> None:
    write_cert(registry, tmp_path / "cpu.json", [case("cpu.fused", "norm@1")])
    code, out, _ = cli("explain", "norm", "--set", "dim=64", "--certs", str(tmp_path / "cpu.json"), "--json")
    data = json.loads(out)
    assert code == 0 and data["selection"]["policy"] == "auto" and data["certificate"] == "certified (cpu.json)"
    assert data["certificates"] == {"cpu.fused": "certified (cpu.json)",
                                    "reference.eager": "reference (certified by definition)"}
    code, out, _ = cli("explain", "norm", "--set", "dim=64", "--policy", "certified", "--dtype", "bfloat16",
                       "--certs", str(tmp_path))
    assert code == 0 and "certificate" in out and "no certificate for bfloat16 infer" in out
    code, _, err = cli("explain", "norm", "--set", "dim=64", "--policy", "certified", "--certs", str(tmp_path / "x"))
    assert code == 2 and "no such certificate file or directory" in err

"""Certificates: the JSON record of one backend's certification run, and checks on it.

A certificate holds the fields DESIGN.md lists under "Records": schema version, the backend's
plugin distribution and version, per-impl source hashes, the environment fingerprint, the suite
(version, hash, seed), one record per case and a summary, and a SHA-256 content hash over all of
it (the canonical JSON of every field but `content_hash`). Any edit after writing breaks the hash.

Writes are atomic (temporary file, fsync, rename). A run in progress appends each finished case to
a journal (`<out>.journal`, one JSON line per case, fsynced), so `--resume` after a crash, even
kill -9, loses at most the case in flight.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .atomic import atomic_write
from .errors import LlmkitError
from .impls import REFERENCE, Impl

SCHEMA = "llmkit-certificate/1"
STATUSES = ("pass", "fail", "unsupported", "skipped")


class CertificateError(LlmkitError):
    """A certificate file that cannot be used: unreadable, malformed, tampered with or stale."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Precision(_Strict):
    """The precision rule's figures (DESIGN.md): pass iff e_max <= k * e_naive + floor, all finite."""

    e_max: float
    e_mean: float
    e_naive: float
    ratio: float | None
    """e_max / e_naive (None when the naive error is 0)."""
    threshold: float
    k: float
    floor: float
    nonfinite: int
    """NaN/Inf outputs where the float64 reference is finite."""
    discrete_mismatches: int = 0
    """MoE routing choices that differ from the float64 reference outside a near-tie."""
    near_ties: int = 0
    """Routing choices that differ inside the naive error band (allowed)."""


class Perf(_Strict):
    median_s: float
    iqr_s: float
    n: int
    warmup: int
    noisy: bool
    """IQR / median > 10%."""
    flops: float
    bytes: float
    flops_per_s: float
    bytes_per_s: float
    fraction_of_peak: float | None
    """roofline time (max of FLOPs / peak FLOP/s and bytes / peak bytes/s) / measured time."""
    reference_median_s: float | None
    speedup: float | None
    """reference impl's median / this impl's median, same device, dtype and inputs."""
    suspect: bool = False
    """speed-up > 10x over the reference that persisted when re-measured with another seed."""


class Case(_Strict):
    id: str
    impl: str
    kind: str
    suite: Literal["closed", "edge", "open"]
    origin: str
    """Where the config came from: "tiny-mixtral-8x7b layers.0.mlp", "edge: head_dim 80", a seed."""
    config: dict[str, Any]
    shape: dict[str, int]
    dtype: str
    mode: Literal["infer", "train"]
    status: Literal["pass", "fail", "unsupported", "skipped"]
    reasons: list[str] = Field(default_factory=list)
    forward: Precision | None = None
    backward: Precision | None = None
    calls: int | None = None
    """Times the impl under test ran during the precision check (proves no silent fallback)."""
    perf: Perf | None = None


class ModelCase(_Strict):
    """Composition: a tiny model of one family built from the backend's impls (falling back where
    it has none) against the float64 reference model on the same weights: a prompt, then decode
    steps through the cache. Pass iff its logits meet the precision rule against the reference
    model in the same dtype (the naive baseline)."""

    preset: str
    dtype: str
    status: Literal["pass", "fail", "skipped"]
    reasons: list[str] = Field(default_factory=list)
    impls: dict[str, int] = Field(default_factory=dict)
    """impl -> number of blocks it runs in the model."""
    fallbacks: int = 0
    logits: Precision | None = None
    """The rule on the logits of positions whose MoE routing agrees with the float64 model's;
    `discrete_mismatches` / `near_ties` count the positions whose routing diverged in the model
    under test / in the naive one (allowed: at most 2 * naive + 1)."""
    kl: float | None = None
    """Mean KL(p_float64 || p_impl) per position."""
    kl_naive: float | None = None
    top1: float | None = None
    """Fraction of positions whose argmax equals the float64 model's."""
    top1_naive: float | None = None
    top5: float | None = None
    """Mean overlap of the top-5 sets with the float64 model's."""


class Summary(_Strict):
    passed: int
    failed: int
    unsupported: int
    skipped: int
    run: int
    """passed + failed: cases that executed."""
    total: int


class ImplInfo(_Strict):
    kind: str
    plugin: str
    source_hash: str
    reference_hash: str
    """Hash of the kind's reference source: the semantics the impl was checked against."""


class Suite(_Strict):
    version: int
    hash: str
    seed: int
    quick: bool
    scale: str
    """How the closed suite's preset shapes were scaled down."""
    blocks: list[str] | None
    dtypes: list[str]


class Certificate(_Strict):
    schema_: str = Field(alias="schema")
    created_at: str
    backend: str
    device: str
    plugin: dict[str, str | None]
    environment: dict[str, Any]
    peak: dict[str, dict[str, Any]]
    suite: Suite
    impls: dict[str, ImplInfo]
    cases: list[Case]
    models: list[ModelCase] = Field(default_factory=list)
    summary: Summary
    content_hash: str

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def content_hash(data: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of every field but `content_hash`."""
    body = {k: v for k, v in data.items() if k != "content_hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def summarize(cases: Iterable[Case]) -> Summary:
    counts = {s: 0 for s in STATUSES}
    n = 0
    for c in cases:
        counts[c.status] += 1
        n += 1
    return Summary(
        passed=counts["pass"], failed=counts["fail"], unsupported=counts["unsupported"],
        skipped=counts["skipped"], run=counts["pass"] + counts["fail"], total=n,
    )


def write(cert: Certificate, path: Path) -> None:
    atomic_write(Path(path), json.dumps(cert.to_json(), indent=1, sort_keys=True, allow_nan=False) + "\n")


def seal(data: dict[str, Any]) -> Certificate:
    """Validate `data` (without `content_hash`) and return the certificate with its hash set."""
    data = {**data, "content_hash": "sha256:" + "0" * 64}
    cert = Certificate.model_validate(data)
    body = cert.to_json()
    body["content_hash"] = content_hash(body)
    return Certificate.model_validate(body)


def _where(loc: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"


def load(path: str | Path) -> Certificate:
    """Read and check a certificate: JSON syntax, schema, then content hash. Errors name the file
    and the field (or line and column) that is wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read certificate ({exc.strerror or exc})") from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CertificateError(f"{path}: not UTF-8 text at byte {exc.start}; a certificate is JSON") from exc
    except json.JSONDecodeError as exc:
        hint = "" if raw.rstrip().endswith(b"}") else " (the file ends mid-document: truncated?)"
        raise CertificateError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}{hint}") from exc
    except RecursionError as exc:
        raise CertificateError(f"{path}: JSON nested too deeply to be a certificate") from exc
    if not isinstance(data, dict):
        raise CertificateError(f"{path}: a certificate is a JSON object, got {type(data).__name__}")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise CertificateError(
            f"{path}: schema is {schema!r}; this llmkit reads {SCHEMA!r} certificates"
        )
    try:
        cert = Certificate.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in exc.errors()[:8])
        more = f" (and {exc.error_count() - 8} more)" if exc.error_count() > 8 else ""
        raise CertificateError(f"{path}: does not match schema {SCHEMA}: {problems}{more}") from exc
    try:
        want = content_hash(data)
    except ValueError as exc:  # NaN/Infinity literals: valid to Python's parser, not to JSON
        raise CertificateError(f"{path}: {exc}; a certificate holds finite numbers only") from exc
    if data.get("content_hash") != want:
        raise CertificateError(
            f"{path}: content hash mismatch (recorded {str(data.get('content_hash'))[:23]}..., "
            f"computed {want[:23]}...): the file was changed after it was written"
        )
    expected = summarize(cert.cases)
    if cert.summary != expected:
        raise CertificateError(f"{path}: summary {cert.summary.model_dump()} does not count its cases "
                               f"({expected.model_dump()})")
    return cert


# --- environment fingerprint and staleness ----------------------------------------------------

def llmkit_version() -> str:
    try:
        return metadata.version("llmkit")
    except metadata.PackageNotFoundError:
        return "unknown"


def _file_hash(obj: Any) -> str:
    """SHA-256 of the source file that defines `obj` (the whole module: helpers count too)."""
    target = inspect.unwrap(obj)
    try:
        file = inspect.getsourcefile(target) or inspect.getfile(target)
        data = Path(file).read_bytes()
    except (TypeError, OSError):
        data = repr(getattr(target, "__qualname__", target)).encode()
    return hashlib.sha256(data).hexdigest()


SOURCE_SUFFIXES = frozenset({".py", ".c", ".cc", ".cpp", ".h", ".hpp", ".cu"})
"""Files of a plugin package that `_package_hash` covers: Python, and the C/C++/CUDA sources a
plugin compiles at first use (the cpu plugin's kernels)."""


def _package_hash(obj: Any) -> str:
    """SHA-256 over every source file (`SOURCE_SUFFIXES`) of the top-level package that defines `obj`
    (paths and contents): an impl's helpers live anywhere in its plugin, kernels compiled from its C
    sources included, so an edit anywhere there may change its results. A plain module (not a
    package) hashes as its own file."""
    module = inspect.getmodule(inspect.unwrap(obj))
    top = sys.modules.get(module.__name__.partition(".")[0]) if module is not None else None
    roots = [Path(p) for p in getattr(top, "__path__", [])]
    if not roots:
        return _file_hash(obj)
    digest = hashlib.sha256()
    for root in roots:
        for file in sorted(f for f in root.rglob("*") if f.suffix in SOURCE_SUFFIXES and f.is_file()):
            digest.update(file.relative_to(root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def source_hash(impl: Impl) -> str:
    """Hash over the whole plugin package(s) defining the impl's forward, prepare and
    not_supported_reasons."""
    parts = [impl.forward, impl.prepare, impl.not_supported_reasons]
    hashes = sorted({_package_hash(p) for p in parts if p is not None})
    return "sha256:" + hashlib.sha256("".join(hashes).encode()).hexdigest()


def reference_hash(kind: Any) -> str:
    return "sha256:" + _file_hash(kind.reference)


def environment(registry: Any, backend: str, device: str) -> dict[str, Any]:
    """Everything a result depends on outside the impl sources: host, runtime, libraries, device."""
    b = registry.backend(backend)
    facts = b.device_facts(device)
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "llmkit": llmkit_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "numpy": _dist_version("numpy"),
        "threads": torch.get_num_threads(),
        "device_facts": json.loads(json.dumps(facts, default=str)),
    }


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def plugin_info(registry: Any, backend: str) -> dict[str, str | None]:
    name = registry.backend_plugin(backend)
    rec = next((r for r in registry.plugins if r.name == name), None)
    return {"name": name, "distribution": rec.distribution if rec else None,
            "version": rec.version if rec else None}


# Fields of the environment whose change makes a certificate stale (DESIGN.md: "a changed
# torch/driver/plugin version or impl source hash makes it stale").
_ENV_KEYS = ("torch", "cuda", "hip", "llmkit")
_FACT_KEYS = ("driver", "compute_capability", "gcn_arch", "cpu", "isa")


def stale_reasons(cert: Certificate, registry: Any) -> list[str]:
    """Why `cert` no longer describes this environment (empty when it still does)."""
    out: list[str] = []
    backend = cert.backend
    if backend == REFERENCE:  # the reference impls ran on the backend that owns the device
        try:
            backend = registry.device_backend(cert.device.split(":")[0])
        except LlmkitError:
            pass  # reported just below: not registered here
    if backend not in registry.backends:
        return [f"backend {backend!r} is not registered here"]
    unavailable = registry.unavailable(backend)
    if unavailable:
        # no device to read facts from (a GPU certificate read on a laptop): the environment
        # cannot match, but the sources can still be compared below
        out.append(f"backend {backend!r} is unavailable here ({'; '.join(unavailable)}): "
                   "its device and runtime cannot be compared")
    else:
        now = environment(registry, backend, cert.device)
        for key in _ENV_KEYS:
            if cert.environment.get(key) != now.get(key):
                out.append(f"{key} changed: certified with {cert.environment.get(key)}, now {now.get(key)}")
        old_facts, new_facts = cert.environment.get("device_facts", {}), now["device_facts"]
        for key in _FACT_KEYS:
            if old_facts.get(key) != new_facts.get(key):
                out.append(f"device {key} changed: certified on {old_facts.get(key)}, now {new_facts.get(key)}")
    plugin = plugin_info(registry, backend)
    if cert.plugin.get("version") != plugin["version"] or cert.plugin.get("distribution") != plugin["distribution"]:
        out.append(f"plugin {plugin['name']} changed: certified {cert.plugin.get('distribution')} "
                   f"{cert.plugin.get('version')}, now {plugin['distribution']} {plugin['version']}")
    for key, info in sorted(cert.impls.items()):
        qualname = key.rsplit("/", 1)[-1]  # keyed "kind/impl": cpu.linear serves mlp@1 and head@1
        impl = _find_impl(registry, info.kind, qualname)
        if impl is None:
            out.append(f"impl {qualname} ({info.kind}) is no longer registered")
            continue
        if source_hash(impl) != info.source_hash:
            out.append(f"impl {qualname}: source changed since certification")
        if reference_hash(registry.kind(info.kind)) != info.reference_hash:
            out.append(f"impl {qualname}: the reference of {info.kind} changed since certification")
    return out


def _find_impl(registry: Any, kind: str, qualname: str) -> Impl | None:
    if kind not in registry.kinds:
        return None
    return next((i for i in registry.impls_for(kind) if i.qualname == qualname), None)


# --- where certificates live, and what they certify --------------------------------------------

def cert_dir() -> Path:
    """`$LLMKIT_CERT_DIR`, else `${XDG_DATA_HOME:-~/.local/share}/llmkit/certificates`."""
    env = os.environ.get("LLMKIT_CERT_DIR")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "llmkit" / "certificates"


def find(paths: Iterable[str | Path] | None = None) -> list[Path]:
    """Certificate files under the given files/directories (default: `cert_dir()`), sorted."""
    roots = [Path(p) for p in paths] if paths is not None else [cert_dir()]
    found: list[Path] = []
    for root in roots:
        if root.is_dir():
            found.extend(p for p in root.glob("*.json") if p.is_file())
        elif root.exists():
            found.append(root)
        elif paths is not None:
            raise CertificateError(f"{root}: no such certificate file or directory")
    return sorted(set(found))


def default_out(backend: str, device: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    host = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in platform.node()) or "host"
    return cert_dir() / f"{backend}-{device.replace(':', '_')}-{host}-{stamp}.json"


def certified(cert: Certificate, kind: str | None = None) -> dict[tuple[str, str, str], bool]:
    """(impl, dtype, mode) -> True when every executed case passed and at least one ran.

    With `kind`, only that block kind's cases count: one impl name can serve several kinds
    (`cpu.linear` runs both mlp@1 and head@1), and each is certified on its own cases.
    """
    out: dict[tuple[str, str, str], bool] = {}
    for c in cert.cases:
        if c.status not in ("pass", "fail") or (kind is not None and c.kind != kind):
            continue
        key = (c.impl, c.dtype, c.mode)
        out[key] = out.get(key, True) and c.status == "pass"
    return out


class CertificateStore:
    """The certificates of a run of `--policy certified`: each checked once, stale ones kept out.

    `status(impl, target)` answers for one impl: "certified", or why not ("no certificate",
    "failed in <file>", "stale: ..."). Reference impls define the semantics every certificate is
    measured against; they are certified by definition.
    """

    def __init__(self, registry: Any, paths: Iterable[str | Path] | None = None) -> None:
        self.problems: list[str] = []
        self.entries: list[tuple[Path, Certificate, list[str]]] = []
        for path in find(paths):
            try:
                cert = load(path)
            except CertificateError as exc:
                self.problems.append(str(exc))
                continue
            self.entries.append((path, cert, stale_reasons(cert, registry)))

    def status(self, impl: Impl, backend: str, device_type: str, dtype: str, mode: str) -> tuple[bool, str]:
        if impl.backend == REFERENCE:
            return True, "reference (certified by definition)"
        stale_note, failed_note = None, None
        for path, cert, stale in self.entries:
            if cert.backend != impl.backend or cert.device.split(":")[0] != device_type:
                continue
            verdict = certified(cert, impl.kind).get((impl.qualname, dtype, mode))
            if verdict is None:
                continue
            if stale:
                stale_note = f"stale certificate {path.name}: {stale[0]}"
            elif not verdict:
                failed_note = f"failed certification ({path.name})"
            else:
                return True, f"certified ({path.name})"
        return False, failed_note or stale_note or f"no certificate for {dtype} {mode}"


def iter_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a journal; a torn last line (a kill mid-write) is ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return
    for i, line in enumerate(lines):
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return
            raise CertificateError(f"{path}:{i + 1}: corrupt journal line (not the last one)") from None


def append_journal(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

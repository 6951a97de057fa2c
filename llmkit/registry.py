"""The registry: block kinds, backends and impls contributed by plugins, and cached resolution.

Merging is deterministic: plugins are processed in name order, never load order, and a plugin
that conflicts with another (a duplicate name) is marked broken as a whole, so no half-registered
plugin ever runs. When an impl name is registered twice, the plugin that owns the impl's backend
keeps it; otherwise the plugin first in name order does.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from . import plugins as _plugins
from .backend import Backend
from .certificate import CertificateStore, find
from .errors import BackendUnavailableError, CertificateWarning, LlmkitError, PluginWarning, UnknownNameError
from .impls import ANY, REFERENCE, Impl
from .kinds import BlockKind
from .resolve import Resolution, Selection, matches, resolve
from .target import FLOAT_DTYPES, MODES, Target, parse_dtype

REFERENCE_IMPL_NAME = "eager"


def reference_impl(kind: BlockKind) -> Impl:
    """The impl every kind gets from its reference forward: any device, float dtype, mode, feature."""
    return Impl(
        kind=kind.id,
        backend=REFERENCE,
        name=REFERENCE_IMPL_NAME,
        forward=kind.reference,
        device_types=frozenset({ANY}),
        dtypes=FLOAT_DTYPES,
        modes=frozenset(MODES),
        features=frozenset({ANY}),
        priority=0,
        summary=f"reference implementation of {kind.id} (defines its semantics)",
    )


@dataclass
class _Merged:
    kinds: dict[str, BlockKind] = field(default_factory=dict)
    kind_owner: dict[str, str] = field(default_factory=dict)
    backends: dict[str, Backend] = field(default_factory=dict)
    backend_owner: dict[str, str] = field(default_factory=dict)
    impls: dict[tuple[str, str], Impl] = field(default_factory=dict)  # (kind id, qualname)
    impl_owner: dict[tuple[str, str], str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)


def _merge(
    contributions: Mapping[str, _plugins.Contribution], broken: set[str]
) -> tuple[_Merged, dict[str, str]]:
    """Merge the contributions of the plugins not in `broken`; return newly broken ones too."""
    m = _Merged()
    newly: dict[str, str] = {}
    names = sorted(n for n in contributions if n not in broken)

    for n in names:
        for kind in contributions[n].kinds:
            if kind.id in m.kinds:
                newly.setdefault(n, f"registers block kind {kind.id}, already registered by plugin {m.kind_owner[kind.id]!r}")
            else:
                m.kinds[kind.id], m.kind_owner[kind.id] = kind, n
        for backend in contributions[n].backends:
            problem = _backend_problem(backend)
            if problem:
                newly.setdefault(n, problem)
            elif backend.name in m.backends:
                newly.setdefault(n, f"registers backend {backend.name!r}, already registered by plugin {m.backend_owner[backend.name]!r}")
            else:
                m.backends[backend.name], m.backend_owner[backend.name] = backend, n

    for kind_id, kind in m.kinds.items():
        m.impls[(kind_id, f"{REFERENCE}.{REFERENCE_IMPL_NAME}")] = reference_impl(kind)
        m.impl_owner[(kind_id, f"{REFERENCE}.{REFERENCE_IMPL_NAME}")] = m.kind_owner[kind_id]

    for n in names:
        for impl in contributions[n].impls:
            if impl.backend == REFERENCE:
                newly.setdefault(n, f"registers impl {impl.qualname}: backend {REFERENCE!r} is reserved for the kinds' own reference impls")
                continue
            if impl.kind not in m.kinds:
                m.warnings.setdefault(n, []).append(_skip_note(impl, "block kind", impl.kind, m.kinds))
                continue
            if impl.backend not in m.backends:
                m.warnings.setdefault(n, []).append(_skip_note(impl, "backend", impl.backend, m.backends))
                continue
            problems = m.kinds[impl.kind].signature_problems(impl.forward)
            if problems:
                newly.setdefault(n, f"impl {impl.qualname}: {'; '.join(problems)}")
                continue
            key = (impl.kind, impl.qualname)
            if key in m.impls:
                holder = m.impl_owner[key]
                owner = m.backend_owner[impl.backend]
                loser = holder if (n == owner and holder != owner) else n
                other = n if loser == holder else holder
                newly.setdefault(loser, f"registers impl {impl.qualname} of {impl.kind}, also registered by plugin {other!r}")
                continue
            m.impls[key], m.impl_owner[key] = impl, n
    return m, newly


def _backend_problem(backend: Backend) -> str | None:
    if not isinstance(backend.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", backend.name):
        return f"backend name {backend.name!r} must be lower_snake_case"
    if backend.name == REFERENCE:
        return f"backend name {REFERENCE!r} is reserved for the kinds' own reference impls"
    if not isinstance(backend.device_type, str) or not backend.device_type:
        return f"backend {backend.name!r} declares no device_type"
    return None


def _skip_note(impl: Impl, what: str, name: str, known: Iterable[str]) -> str:
    err = UnknownNameError(what, name, known)
    return f"impl {impl.qualname} skipped: {err}"


class Registry:
    """Everything the loaded plugins contributed. Build with `Registry.load()`."""

    def __init__(
        self,
        records: Sequence[_plugins.PluginRecord],
        merged: _Merged,
        problems: Sequence[str] = (),
        settings: _plugins.PluginSettings | None = None,
    ) -> None:
        self.plugins: tuple[_plugins.PluginRecord, ...] = tuple(records)
        self.problems: tuple[str, ...] = tuple(problems)
        self.settings = settings
        self._kinds = dict(sorted(merged.kinds.items()))
        self._kind_owner = merged.kind_owner
        self._backends = dict(sorted(merged.backends.items()))
        self._backend_owner = merged.backend_owner
        self._impl_owner = dict(merged.impl_owner)
        self._impls = dict(merged.impls)
        by_kind: dict[str, list[Impl]] = {k: [] for k in self._kinds}
        for impl in merged.impls.values():
            by_kind[impl.kind].append(impl)
        self._impls_by_kind = {k: tuple(sorted(v, key=lambda i: i.qualname)) for k, v in by_kind.items()}
        self._cache: dict[tuple[Any, ...], Resolution] = {}
        self._stores: dict[tuple[tuple[str, int, int, int], ...], CertificateStore] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        plugins: Sequence[object | tuple[str, object]] = (),
        *,
        autoload: bool | None = None,
        allow: Iterable[str] | None = None,
        environ: Mapping[str, str] | None = None,
        warn: bool = True,
    ) -> Registry:
        """Discover entry-point plugins (subject to the environment switches) plus `plugins`.

        Broken plugins are skipped and reported: in `registry.plugins`, and as a `PluginWarning`
        unless `warn=False`.
        """
        settings = _plugins.PluginSettings.from_env(environ, autoload=autoload, allow=allow)
        records, contributions, problems = _plugins.load(plugins, settings)
        by_name = {r.name: r for r in records if r.status != "disabled"}
        broken = {r.name for r in records if r.status == "broken"}
        while True:
            merged, newly = _merge(contributions, broken)
            if not newly:
                break
            for name, error in newly.items():
                by_name[name].mark_broken(error)
            broken |= set(newly)
        for name, notes in merged.warnings.items():
            by_name[name].warnings.extend(notes)
        for kind_id, owner in merged.kind_owner.items():
            by_name[owner].kinds.append(kind_id)
        for name, owner in merged.backend_owner.items():
            by_name[owner].backends.append(name)
        for (kind_id, qualname), owner in merged.impl_owner.items():
            if not qualname.startswith(f"{REFERENCE}."):
                by_name[owner].impls.append(f"{kind_id}:{qualname}")
        registry = cls(records, merged, problems, settings)
        if warn:
            for rec in registry.plugins:
                if rec.status == "broken":
                    warnings.warn(
                        PluginWarning(f"llmkit plugin {rec.name!r} is broken and was skipped: {rec.error}"),
                        stacklevel=2,
                    )
            for problem in registry.problems:
                warnings.warn(PluginWarning(problem), stacklevel=2)
        return registry

    # ------------------------------------------------------------------ lookups
    @property
    def kinds(self) -> dict[str, BlockKind]:
        return dict(self._kinds)

    @property
    def backends(self) -> dict[str, Backend]:
        return dict(self._backends)

    def device_backend(self, device_type: str) -> str:
        """The backend that owns a device type (what the reference impls run on): an available one
        first (cuda and rocm both own "cuda"; on a ROCm build only rocm is available), then the one
        named like the device, then by name. A plugin's `available()` that raises counts as
        unavailable (`unavailable`)."""
        names = [n for n, b in self._backends.items() if b.device_type == device_type]
        if not names:
            raise LlmkitError(f"no registered backend runs device type {device_type!r}")
        return min(names, key=lambda n: (bool(self.unavailable(n)), n != device_type, n))

    def kind(self, name: str) -> BlockKind:
        """`"norm@1"` exactly, or `"norm"` for the newest registered version."""
        if name in self._kinds:
            return self._kinds[name]
        versions = [k for k in self._kinds.values() if k.name == name]
        if versions:
            return max(versions, key=lambda k: k.version)
        valid = list(self._kinds) + sorted({k.name for k in self._kinds.values()})
        raise UnknownNameError("block kind", name, valid, self._broken_note())

    def kind_plugin(self, kind_id: str) -> str:
        return self._kind_owner[kind_id]

    def backend(self, name: str) -> Backend:
        if name in self._backends:
            return self._backends[name]
        if name == REFERENCE:
            raise LlmkitError(
                f"{REFERENCE!r} is not a device backend: choose the backend whose device should "
                "run the model (e.g. 'cpu') with policy 'reference'"
            )
        for rec in self.plugins:
            if rec.status == "broken" and (
                name in rec.claimed_backends
                or _plugins._norm(name) in {_plugins._norm(rec.name), _plugins._norm(rec.distribution)}
            ):
                raise BackendUnavailableError(
                    f"backend {name!r} is unavailable: plugin {rec.name!r} "
                    f"({rec.distribution or rec.origin}) is broken: {rec.error}"
                )
        raise UnknownNameError("backend", name, self._backends, self._broken_note())

    def backend_plugin(self, name: str) -> str:
        return self._backend_owner[name]

    def impls_for(self, kind_id: str) -> tuple[Impl, ...]:
        """All impls of a kind (reference included), sorted by qualified name."""
        return self._impls_by_kind.get(kind_id, ())

    def impl(self, kind_id: str, qualname: str) -> Impl:
        """The impl `qualname` (e.g. `cpu.sdpa`) of block kind `kind_id`."""
        if (kind_id, qualname) in self._impls:
            return self._impls[(kind_id, qualname)]
        pool = [i.qualname for i in self.impls_for(self.kind(kind_id).id)]
        raise UnknownNameError(f"impl of {kind_id}", qualname, pool, self._broken_note())

    def impl_plugin(self, impl: Impl) -> str:
        return self._impl_owner[(impl.kind, impl.qualname)]

    def _broken_note(self) -> str:
        broken = [r for r in self.plugins if r.status == "broken"]
        if not broken:
            return ""
        return "note: broken plugins (may provide it): " + "; ".join(f"{r.name}: {r.error}" for r in broken)

    # ------------------------------------------------------------------ targets and resolution
    def unavailable(self, backend: str) -> list[str]:
        """Why `backend` cannot run here (empty when it can); a plugin's `available()` that raises
        is reported as a reason, not propagated."""
        b = self.backend(backend)
        try:
            return list(b.available())
        except Exception as exc:
            return [f"available() raised {type(exc).__name__}: {exc}"]

    def target(
        self,
        backend: str = "cpu",
        *,
        device: str | None = None,
        dtype: str | torch.dtype = torch.float32,
        mode: str = "infer",
        facts: Mapping[str, Any] | None = None,
        quant: str | None = None,
    ) -> Target:
        """A checked target.

        `device="meta"` builds and plans without allocating and without needing the backend's
        hardware; `facts` injects device properties instead of reading them from the device
        (without it, a meta target gets the facts of the backend's default device if present).
        `quant` (packed linear weights, e.g. "int8", "fp16") is added as the fact `quant` for impls
        that support it to act on in `prepare`.
        """
        b = self.backend(backend)
        device = device or b.default_device()
        dev_type = torch.device(device).type
        if dev_type not in (b.device_type, "meta"):
            raise LlmkitError(
                f"device {device!r} does not belong to backend {backend!r} "
                f"(its device type is {b.device_type!r}; 'meta' plans without allocating)"
            )
        reasons = self.unavailable(backend)
        if reasons and dev_type != "meta":
            raise BackendUnavailableError(
                f"backend {backend!r} is unavailable here: {'; '.join(reasons)}"
            )
        if facts is None:
            # planning on meta for hardware that is here: plan what that device would get
            real = b.default_device() if dev_type == "meta" else device
            facts = b.device_facts(real) if not reasons else {}
        facts = dict(facts)
        if quant is not None:
            facts["quant"] = quant
        return Target(
            backend=backend, device=device, dtype=parse_dtype(dtype), mode=mode,
            facts=facts, device_type=b.device_type,
        )

    def check_selection(self, selection: Selection) -> None:
        """Fail early, with the valid names, on pins or denials naming nothing registered.

        A name without a dot is a backend (all of its impls); one with a dot is a single impl.
        """
        for flag, pairs in (("--impl", selection.pins), ("--deny", selection.deny)):
            for kind_name, value in pairs:
                kind = self.kind(kind_name)
                impls = self.impls_for(kind.id)
                if any(matches(i, value) for i in impls):
                    continue
                backend = value.split(".", 1)[0]
                if backend != REFERENCE:
                    self.backend(backend)  # an unknown or broken backend raises with the reason
                if "." in value:
                    raise UnknownNameError(
                        f"impl of {kind.id}",
                        value,
                        [i.qualname for i in impls] + sorted({i.backend for i in impls}),
                        where=f"in {flag} {kind_name}={value}",
                    )

    def certificates(self, paths: Iterable[str | Path] | None = None) -> CertificateStore:
        """The certificates in `paths` (files or directories; default: `certificate.cert_dir()`),
        each checked once against this registry's environment.

        A store is kept per set of files (path, size, modification time, inode), so builds share
        it and a file written, changed or removed since is seen on the next call. Files that
        cannot be used are ignored, named in one `CertificateWarning` when first read.
        """
        files = find(paths)
        key = tuple((str(f.resolve()), *_stat(f)) for f in files)
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = CertificateStore(self, files)
            if store.problems:
                warnings.warn(CertificateWarning(
                    f"ignored {len(store.problems)} certificate file(s) that cannot be used: "
                    + "; ".join(store.problems)), stacklevel=2)
        return store

    def resolve(
        self,
        kind: str | BlockKind,
        config: BaseModel | Mapping[str, Any],
        target: Target,
        selection: Selection | None = None,
        certificates: CertificateStore | None = None,
    ) -> Resolution:
        """Resolve one block config; cached per (kind, config, target, selection, certificates).

        When the selection consults certificates and no store is given, it is
        `self.certificates(selection.certs)`; callers resolving many blocks pass it once fetched.
        """
        kind = kind if isinstance(kind, BlockKind) else self.kind(kind)
        config = kind.parse_config(config)
        selection = selection or Selection()
        if certificates is None and selection.uses_certificates:
            certificates = self.certificates(selection.certs)
        # the store itself is in the key, compared by identity: a store is never changed, only replaced
        key = (kind.id, type(config).__qualname__, config.model_dump_json(), target, selection, certificates)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = resolve(self, kind, config, target, selection, certificates)
        return hit


def _stat(path: Path) -> tuple[int, int, int]:
    """(size, mtime in ns, inode) of a file; -1s when it vanished (the store reports it unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


_default: Registry | None = None


def default_registry(reload: bool = False) -> Registry:
    """The registry of the installed plugins under the current environment switches (cached)."""
    global _default
    if _default is None or reload:
        _default = Registry.load()
    return _default

"""Choosing one impl per block config and target, once, with every rejection explained.

Order among eligible impls is deterministic and independent of plugin load order:
explicit pin, then the target backend's own impls before the reference fallback, then certified
before uncertified (when certificates are consulted), then priority (higher first), then qualified
name. Certificates are consulted under policy `certified`, which also rejects every non-reference
impl without a passing, valid certificate, and whenever the selection names certificate paths.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .errors import LlmkitError, ResolutionError, UnknownNameError
from .impls import REFERENCE, Impl
from .kinds import BlockKind
from .target import Target, dtype_name

if TYPE_CHECKING:
    from .certificate import CertificateStore
    from .registry import Registry

POLICIES = ("auto", "reference", "strict", "certified")


def _parse_assignments(flag: str, items: Mapping[str, str | Iterable[str]] | Iterable[str] | None) -> tuple[tuple[str, str], ...]:
    """`["attention=cpu.sdpa", "norm=cpu"]` or `{"attention": "cpu.sdpa"}` -> sorted pairs."""
    if items is None:
        return ()
    pairs: list[tuple[str, str]] = []
    if isinstance(items, Mapping):
        for kind, value in items.items():
            values = [value] if isinstance(value, str) else list(value)
            pairs.extend((str(kind).strip(), str(v).strip()) for v in values)
    else:
        for item in items:
            kind, sep, value = str(item).partition("=")
            if not sep or not kind.strip() or not value.strip():
                raise LlmkitError(
                    f"{flag} expects KIND=IMPL (e.g. {flag} attention=cpu.sdpa), got {item!r}"
                )
            pairs.extend((kind.strip(), v.strip()) for v in value.split(",") if v.strip())
    return tuple(sorted(set(pairs)))


@dataclass(frozen=True)
class Selection:
    """The user's say in resolution: policy, pins (`kind -> impl or backend`), denials, and where
    certificates come from (files or directories; None: the default directory)."""

    policy: str = "auto"
    pins: tuple[tuple[str, str], ...] = ()
    deny: tuple[tuple[str, str], ...] = ()
    certs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise UnknownNameError("policy", self.policy, POLICIES)
        if self.certs is not None:
            # one path given bare would otherwise be split into characters
            paths = [self.certs] if isinstance(self.certs, (str, Path)) else self.certs
            object.__setattr__(self, "certs", tuple(str(p) for p in paths))
        kinds = [k for k, _ in self.pins]
        dupes = sorted({k for k in kinds if kinds.count(k) > 1})
        if dupes:
            raise LlmkitError(f"more than one pin for block kind(s) {dupes}; pin each kind once")

    @classmethod
    def make(
        cls,
        policy: str = "auto",
        impl: Mapping[str, str] | Iterable[str] | None = None,
        deny: Mapping[str, str | Iterable[str]] | Iterable[str] | None = None,
        strict: bool = False,
        certs: Iterable[str | Path] | str | Path | None = None,
    ) -> Selection:
        """Build from CLI-style (`["attention=cpu.sdpa"]`) or Python-style (`{"attention": ...}`) input.

        `strict=True` turns the `auto` policy into `strict` (any fallback is an error). `certs`
        (certificate files or directories) replaces the default certificate directory.
        """
        if strict and policy == "auto":
            policy = "strict"
        elif strict and policy != "strict":
            raise LlmkitError(f"--strict cannot be combined with policy {policy!r}")
        return cls(policy, _parse_assignments("--impl", impl), _parse_assignments("--deny", deny), certs)

    @property
    def uses_certificates(self) -> bool:
        """Whether resolution consults certificates: under policy `certified`, or when paths are given."""
        return self.policy == "certified" or self.certs is not None

    def pin_for(self, kind: BlockKind) -> str | None:
        for key, value in self.pins:
            if key in (kind.name, kind.id):
                return value
        return None

    def denied_for(self, kind: BlockKind) -> set[str]:
        return {value for key, value in self.deny if key in (kind.name, kind.id)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "pins": [f"{k}={v}" for k, v in self.pins],
            "deny": [f"{k}={v}" for k, v in self.deny],
            "certs": None if self.certs is None else list(self.certs),
        }


def matches(impl: Impl, name: str) -> bool:
    """A pin or denial names either one impl (`cpu.sdpa`) or a whole backend (`cpu`)."""
    return name in (impl.qualname, impl.backend)


@dataclass(frozen=True)
class Rejection:
    impl: str
    reasons: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Resolution:
    """The outcome of resolving one block config for one target."""

    kind: str
    config: BaseModel
    impl: Impl
    reason: str
    fallback: bool
    eligible: tuple[str, ...]
    rejected: tuple[Rejection, ...]
    certificates: tuple[tuple[str, str], ...] = ()
    """(impl, certificate status) for the target backend's impls and the reference, when
    certificates were consulted; empty otherwise."""

    @property
    def certificate(self) -> str | None:
        """The chosen impl's certificate status (None when certificates were not consulted)."""
        return dict(self.certificates).get(self.impl.qualname)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "impl": self.impl.qualname,
            "reason": self.reason,
            "fallback": self.fallback,
            "eligible": list(self.eligible),
            "rejected": [{"impl": r.impl, "reasons": list(r.reasons)} for r in self.rejected],
        }
        if self.certificates:
            out["certificate"] = self.certificate
        return out


def describe_target(target: Target) -> str:
    return f"backend {target.backend!r} ({target.device}, {dtype_name(target.dtype)}, {target.mode})"


def _format_rejections(rejections: Iterable[Rejection]) -> str:
    return "\n".join(f"  - {r.impl}: {'; '.join(r.reasons)}" for r in rejections)


def resolve(
    registry: Registry,
    kind: BlockKind,
    config: BaseModel,
    target: Target,
    selection: Selection,
    certificates: CertificateStore | None = None,
) -> Resolution:
    """Pick the impl that runs `config` on `target`; raise `ResolutionError` when none may.

    With `certificates`, certified impls rank first within their backend, and policy `certified`
    (which needs them) rejects every other non-reference impl with the store's note as the reason.
    """
    if selection.policy == "certified" and certificates is None:
        raise LlmkitError("policy 'certified' needs a certificate store (Registry.certificates)")
    required = kind.required_features(config)
    pin = selection.pin_for(kind)
    denied = selection.denied_for(kind)
    status: dict[str, tuple[bool, str]] = {}
    if certificates is not None:
        dt = dtype_name(target.dtype)
        for impl in registry.impls_for(kind.id):
            if impl.backend in (target.backend, REFERENCE):
                status[impl.qualname] = certificates.status(impl, target.backend, target.device_type, dt, target.mode)

    eligible: list[Impl] = []
    rejected: list[Rejection] = []
    for impl in registry.impls_for(kind.id):
        reasons: list[str] = []
        hit = sorted(d for d in denied if matches(impl, d))
        if hit:
            reasons.append(f"denied ({', '.join(f'{kind.name}={d}' for d in hit)})")
        if pin is not None and not matches(impl, pin):
            reasons.append(f"not the pinned impl ({kind.name}={pin})")
        if selection.policy == "reference" and impl.backend != REFERENCE:
            reasons.append("policy 'reference' runs reference impls only")
        if impl.backend not in (target.backend, REFERENCE):
            reasons.append(f"belongs to backend {impl.backend!r}, target is {target.backend!r}")
        elif selection.policy == "certified" and not status[impl.qualname][0]:
            reasons.append(status[impl.qualname][1])
        reasons.extend(impl.reasons(config, required, target))
        if reasons:
            rejected.append(Rejection(impl.qualname, tuple(reasons)))
        else:
            eligible.append(impl)

    if not eligible:
        if pin is not None:
            pinned = [r for r in rejected if matches(registry.impl(kind.id, r.impl), pin)]
            detail = _format_rejections(pinned) if pinned else (
                f"  - no impl of {kind.id} matches {pin!r} "
                f"(registered: {', '.join(i.qualname for i in registry.impls_for(kind.id))})"
            )
            raise ResolutionError(
                f"cannot honour pin {kind.name}={pin} for {kind.id} on {describe_target(target)}:\n"
                + detail
            )
        raise ResolutionError(
            f"no impl of {kind.id} can run on {describe_target(target)}:\n"
            + _format_rejections(rejected)
        )

    def certified(impl: Impl) -> bool:
        return status.get(impl.qualname, (True, ""))[0]  # without a store every impl ranks alike

    eligible.sort(key=lambda i: (i.backend != target.backend, not certified(i), -i.priority, i.qualname))
    chosen = eligible[0]
    own_backend = [i for i in registry.impls_for(kind.id) if i.backend == target.backend]
    fallback = (
        chosen.backend != target.backend and pin is None and selection.policy != "reference"
    )

    if pin is not None:
        reason = f"pinned ({kind.name}={pin})"
    elif selection.policy == "reference":
        reason = "policy 'reference'"
    elif fallback:
        which = "certified impl" if selection.policy == "certified" else "impl"
        reason = (
            f"fallback: backend {target.backend!r} has no impl of {kind.id}"
            if not own_backend
            else f"fallback: no {which} of backend {target.backend!r} can run this config"
        )
    else:
        peers = [i for i in eligible[1:] if i.backend == chosen.backend]
        # certification is named only where it decided the order: over peers ranked ahead without it
        jumped = {i.qualname for i in peers if not certified(i) and certified(chosen)
                  and (-i.priority, i.qualname) < (-chosen.priority, chosen.qualname)}
        names = [i.qualname + (" (uncertified)" if i.qualname in jumped else "") for i in peers]
        reason = ("certified, " if jumped else "") + f"priority {chosen.priority}" + (
            f", ahead of {', '.join(names)}" if peers else f", only eligible impl of {chosen.backend!r}"
        )

    if fallback and selection.policy == "strict":
        detail = (
            f"backend {target.backend!r} registers no impl of {kind.id}"
            if not own_backend
            else "its impls were rejected:\n"
            + _format_rejections(r for r in rejected if r.impl.startswith(f"{target.backend}."))
        )
        raise ResolutionError(
            f"policy 'strict': {kind.id} would fall back to {chosen.qualname} on "
            f"{describe_target(target)}; {detail}"
        )

    return Resolution(
        kind=kind.id,
        config=config,
        impl=chosen,
        reason=reason,
        fallback=fallback,
        eligible=tuple(i.qualname for i in eligible),
        rejected=tuple(rejected),
        certificates=tuple((name, note) for name, (_, note) in sorted(status.items())),
    )

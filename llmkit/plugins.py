"""Plugin discovery and loading through pluggy and the entry-point group ``llmkit``.

Loading is isolated per plugin: each plugin's hooks are called on their own, and anything that
goes wrong (import error, hook exception, malformed return value, wrong plugin-API version) marks
that plugin broken with the error; the others load normally. Which plugins load is controlled by

- ``LLMKIT_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugin unless ``LLMKIT_PLUGINS`` names it;
- ``LLMKIT_PLUGINS=name,name``: load exactly these (entry-point or distribution names).

Plugins passed explicitly in Python (`Registry.load(plugins=[...])`) always load.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .backend import Backend
from .impls import Impl
from .kinds import BlockKind

ENTRY_POINT_GROUP = "llmkit"
ENV_DISABLE_AUTOLOAD = "LLMKIT_DISABLE_PLUGIN_AUTOLOAD"
ENV_PLUGINS = "LLMKIT_PLUGINS"

# hook name -> (Contribution field, type of each returned item)
HOOKS: dict[str, tuple[str, type]] = {
    "llmkit_block_kinds": ("kinds", BlockKind),
    "llmkit_backends": ("backends", Backend),
    "llmkit_impls": ("impls", Impl),
}


@dataclass
class PluginRecord:
    """What `llmkit info` reports about one plugin."""

    name: str
    origin: str
    distribution: str | None = None
    version: str | None = None
    status: str = "ok"  # ok | broken | disabled
    error: str | None = None
    traceback: str | None = None
    warnings: list[str] = field(default_factory=list)
    api_version: Any = None
    kinds: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    impls: list[str] = field(default_factory=list)
    claimed_backends: list[str] = field(default_factory=list)
    """Backend names the plugin returned before it broke: selecting one explains the breakage."""

    def mark_broken(self, error: str, exc: BaseException | None = None) -> None:
        self.status = "broken"
        self.error = error
        if exc is not None:
            self.traceback = "".join(traceback.format_exception(exc))
        self.kinds, self.backends, self.impls = [], [], []

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "origin": self.origin,
            "status": self.status,
            "error": self.error,
            "warnings": list(self.warnings),
            "api_version": self.api_version,
            "provides": {"kinds": self.kinds, "backends": self.backends, "impls": self.impls},
        }


@dataclass
class Contribution:
    """Everything one plugin's hooks returned, not yet validated against other plugins."""

    kinds: list[BlockKind] = field(default_factory=list)
    backends: list[Backend] = field(default_factory=list)
    impls: list[Impl] = field(default_factory=list)


@dataclass(frozen=True)
class PluginSettings:
    autoload: bool
    allow: tuple[str, ...] | None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, autoload: bool | None = None,
        allow: Iterable[str] | None = None,
    ) -> PluginSettings:
        env = os.environ if environ is None else environ
        if autoload is None:
            autoload = env.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() not in {"1", "true", "yes", "on"}
        if allow is None and env.get(ENV_PLUGINS, "").strip():
            allow = [n for n in env[ENV_PLUGINS].split(",") if n.strip()]
        allow_t = None if allow is None else tuple(n.strip() for n in allow)
        return cls(autoload=autoload, allow=allow_t)

    def selects(self, ep_name: str, dist_name: str | None) -> tuple[bool, str]:
        """Whether an installed entry point loads, and the reason when it does not."""
        if self.allow is not None:
            if {_norm(ep_name), _norm(dist_name)} & {_norm(n) for n in self.allow}:
                return True, ""
            return False, f"not in {ENV_PLUGINS}={','.join(self.allow)}"
        if not self.autoload:
            return False, f"{ENV_DISABLE_AUTOLOAD}=1 and not named in {ENV_PLUGINS}"
        return True, ""


def _norm(name: str | None) -> str:
    return re.sub(r"[-_.]+", "-", name or "").lower()


def _describe_exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def load(
    explicit: Sequence[object | tuple[str, object]] = (),
    settings: PluginSettings | None = None,
) -> tuple[list[PluginRecord], dict[str, Contribution], list[str]]:
    """Discover, import and call every selected plugin.

    Returns the records (sorted by name), the raw contributions of the plugins that did not break,
    and problems that belong to no plugin (an allowlist naming nothing installed).
    """
    settings = settings or PluginSettings.from_env()
    records: list[PluginRecord] = []
    loaded: list[tuple[PluginRecord, object]] = []
    problems: list[str] = []

    eps = sorted(
        metadata.entry_points(group=ENTRY_POINT_GROUP),
        key=lambda ep: (ep.name, ep.dist.name if ep.dist else ""),
    )
    for ep in eps:
        dist = ep.dist
        rec = PluginRecord(
            name=ep.name,
            origin=f"entry point {ep.name} = {ep.value}",
            distribution=dist.name if dist else None,
            version=dist.version if dist else None,
        )
        records.append(rec)
        ok, why = settings.selects(ep.name, rec.distribution)
        if not ok:
            rec.status, rec.error = "disabled", why
            continue
        try:
            loaded.append((rec, ep.load()))
        except Exception as exc:  # a plugin that cannot import must not take the others down
            rec.mark_broken(f"import failed: {_describe_exc(exc)}", exc)

    if settings.allow is not None:
        known = {_norm(ep.name) for ep in eps} | {_norm(ep.dist.name) for ep in eps if ep.dist}
        for name in settings.allow:
            if _norm(name) not in known:
                problems.append(
                    f"{ENV_PLUGINS} names {name!r}, which no installed plugin provides "
                    f"(installed: {', '.join(sorted({ep.name for ep in eps})) or 'none'})"
                )

    for item in explicit:
        name, obj = item if isinstance(item, tuple) else (_explicit_name(item), item)
        rec = PluginRecord(name=name, origin=f"explicit ({type(obj).__name__} {name})")
        records.append(rec)
        loaded.append((rec, obj))

    seen: dict[str, PluginRecord] = {}
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    contributions: dict[str, Contribution] = {}
    for rec, obj in loaded:
        if rec.name in seen:
            rec.mark_broken(f"plugin name {rec.name!r} is already used by {seen[rec.name].origin}")
            continue
        seen[rec.name] = rec
        contribution = _collect(pm, rec, obj)
        if contribution is not None:
            contributions[rec.name] = contribution

    records.sort(key=lambda r: (r.name, r.origin))
    return records, contributions, problems


def _explicit_name(obj: object) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


def _collect(pm: pluggy.PluginManager, rec: PluginRecord, obj: object) -> Contribution | None:
    """Check the plugin's API version, register it and call its hooks on their own."""
    rec.api_version = getattr(obj, "LLMKIT_PLUGIN_API", None)
    if rec.api_version is None:
        rec.mark_broken(
            f"declares no LLMKIT_PLUGIN_API; add `LLMKIT_PLUGIN_API = {hookspecs.PLUGIN_API}` "
            "to the plugin module"
        )
        return None
    if rec.api_version not in hookspecs.SUPPORTED_PLUGIN_APIS:
        rec.mark_broken(
            f"targets plugin API {rec.api_version!r}; this llmkit supports "
            f"{sorted(hookspecs.SUPPORTED_PLUGIN_APIS)}"
        )
        return None
    try:
        pm.register(obj, name=rec.name)
    except Exception as exc:  # pluggy validates hookimpl signatures against the specs
        rec.mark_broken(f"invalid hook implementation: {_describe_exc(exc)}", exc)
        return None
    unknown = sorted(
        caller.name for caller in pm.get_hookcallers(obj) or () if caller.name not in HOOKS
    )
    if unknown:
        pm.unregister(obj)
        rec.mark_broken(
            f"implements unknown hook(s) {unknown}; the hooks are {sorted(HOOKS)}"
        )
        return None

    others = [p for p in pm.get_plugins() if p is not obj]
    contribution = Contribution()
    for hook, (field_name, expected) in HOOKS.items():
        caller = pm.subset_hook_caller(hook, remove_plugins=others)
        try:
            results = caller()
        except Exception as exc:
            pm.unregister(obj)
            rec.mark_broken(f"hook {hook} raised {_describe_exc(exc)}", exc)
            return None
        for result in results:
            items = _as_items(result)
            bad = [x for x in items if not isinstance(x, expected)] if items is not None else [result]
            if bad:
                pm.unregister(obj)
                rec.mark_broken(
                    f"hook {hook} must return a sequence of {expected.__name__}, "
                    f"got {type(bad[0]).__name__} {bad[0]!r:.80}"
                )
                return None
            getattr(contribution, field_name).extend(items)
            if field_name == "backends":
                rec.claimed_backends.extend(str(getattr(b, "name", "")) for b in items)
    return contribution


def _as_items(result: object) -> list[object] | None:
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
        return None
    return list(result)

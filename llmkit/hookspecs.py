"""The whole plugin contract: what a vendor (or a built-in plugin) implements to extend llmkit.

A plugin is a module or object exposed through the entry-point group ``llmkit``::

    # pyproject.toml of the vendor's distribution
    [project.entry-points.llmkit]
    acme = "llmkit_acme"

    # llmkit_acme/__init__.py
    from llmkit.hookspecs import Backend, Impl, hookimpl

    LLMKIT_PLUGIN_API = 1          # the contract version this plugin targets (required)

    @hookimpl
    def llmkit_backends():
        return [AcmeBackend()]

    @hookimpl
    def llmkit_impls():
        return [Impl(kind="norm@1", backend="acme", name="fused_rms", forward=..., ...)]

Hooks are called once, when the registry loads; never during a forward pass. A plugin implements
only the hooks it needs. Everything a plugin contributes is validated; a plugin that fails to
import, raises in a hook, returns malformed objects, registers a name another plugin already owns,
or targets another plugin-API version is reported as broken (`llmkit info`) and contributes
nothing, while every other plugin keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from .backend import Backend, Peak, Timing
from .impls import ANY, REFERENCE, Impl, Range
from .kinds import BlockKind, Cost, ParamSpec
from .target import Target

PROJECT = "llmkit"
PLUGIN_API = 1
"""Version of this contract. A plugin declares the version it targets as `LLMKIT_PLUGIN_API`."""
SUPPORTED_PLUGIN_APIS = frozenset({1})

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "ANY",
    "Backend",
    "BlockKind",
    "Cost",
    "Impl",
    "PLUGIN_API",
    "ParamSpec",
    "Peak",
    "REFERENCE",
    "Range",
    "Target",
    "Timing",
    "hookimpl",
    "hookspec",
]


@hookspec
def llmkit_block_kinds() -> Sequence[BlockKind]:
    """Block kinds this plugin defines, each with its one reference implementation.

    The reference impl is registered automatically as ``reference.eager`` for the kind.
    """


@hookspec
def llmkit_backends() -> Sequence[Backend]:
    """Backends (devices or execution engines) this plugin provides."""


@hookspec
def llmkit_impls() -> Sequence[Impl]:
    """Implementations of block kinds (from this or any other plugin) for some backend."""

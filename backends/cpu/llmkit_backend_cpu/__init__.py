"""llmkit's CPU backend plugin: the host CPU through stock PyTorch.

It uses only the public plugin contract (`llmkit.hookspecs`), like any outside vendor's plugin.
Block impls for this backend arrive with the CPU-backend work; until then every block on `cpu`
runs the reference impl, and the dispatch plan says so.
"""

from __future__ import annotations

from llmkit.hookspecs import Backend, hookimpl

from .backend import CpuBackend

LLMKIT_PLUGIN_API = 1


@hookimpl
def llmkit_backends() -> list[Backend]:
    return [CpuBackend()]

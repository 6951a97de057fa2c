"""A minimal, complete llmkit backend plugin to copy: one backend and one impl, certifiable as is.

Copy `backends/template/`, rename the distribution, the package and the backend, point
`device_type` at your torch device, and replace `rmsnorm.forward` with a call into your kernels.
Everything here uses the public contract only (`llmkit.hookspecs`); nothing in `llmkit/` changes.
See `backends/README.md` for the walk-through: register, test, certify, submit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llmkit.hookspecs import Backend, Impl, Target, hookimpl

from . import rmsnorm
from .backend import TemplateBackend

LLMKIT_PLUGIN_API = 1
"""The plugin-contract version this plugin targets (required)."""


def rmsnorm_unsupported(config: Any, target: Target) -> Iterator[str]:
    """Conditions the declarations (dtypes, features) cannot express, as human-readable reasons."""
    if target.fact("quant"):
        yield f"weight-only quantisation (quant={target.fact('quant')!r}) is not implemented"


@hookimpl
def llmkit_backends() -> list[Backend]:
    return [TemplateBackend()]


@hookimpl
def llmkit_impls() -> list[Impl]:
    return [
        Impl(kind="norm@1", backend="template", name="rmsnorm", forward=rmsnorm.forward,
             device_types={"cpu"}, dtypes={"float32", "bfloat16", "float16", "float64"},
             features={"rmsnorm", "cast_before_weight", "cast_after_weight", "unit_offset"},
             priority=10, not_supported_reasons=rmsnorm_unsupported,
             summary="RMSNorm in plain torch, float32 accumulation (the template's sample impl)"),
    ]

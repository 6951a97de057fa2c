"""Implementations and their declared capabilities.

An `Impl` is one implementation of one block kind for one backend. Its capabilities are
declarations (device types, dtypes, modes, feature flags, numeric ranges on config fields) turned
into human-readable reasons by `Impl.reasons`, plus an optional `not_supported_reasons(config,
target)` for combined conditions the declarations cannot express. The certification suite later
tests the claims; here they decide eligibility.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel

from .errors import PluginContractError
from .target import MODES, Target, dtype_name, parse_dtypes

ANY = "*"
"""In `device_types` or `features`: matches every value (used by the reference impls)."""

REFERENCE = "reference"
"""The backend name of the reference impls, which every kind has and which run on any device."""

QUALNAME_PART = r"[a-z][a-z0-9_]*"


@dataclass(frozen=True)
class Range:
    """A numeric constraint on one config field, e.g. `Range(max=256, multiple_of=8)`."""

    min: float | None = None
    max: float | None = None
    multiple_of: int | None = None
    one_of: tuple[Any, ...] | None = None

    def violations(self, field_name: str, value: Any) -> list[str]:
        if value is None:
            return []
        out = []
        if self.one_of is not None and value not in self.one_of:
            out.append(f"{field_name}={value!r} is not one of {list(self.one_of)}")
        if self.min is not None and value < self.min:
            out.append(f"{field_name}={value!r} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            out.append(f"{field_name}={value!r} is above the maximum {self.max}")
        if self.multiple_of is not None and (
            not float(value).is_integer() or int(value) % self.multiple_of
        ):
            out.append(f"{field_name}={value!r} is not a multiple of {self.multiple_of}")
        return out

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min}")
        if self.max is not None:
            parts.append(f"<= {self.max}")
        if self.multiple_of is not None:
            parts.append(f"multiple of {self.multiple_of}")
        if self.one_of is not None:
            parts.append(f"one of {list(self.one_of)}")
        return ", ".join(parts)


NotSupported = Callable[[BaseModel, Target], Iterable[str]]
Prepare = Callable[[torch.nn.Module, Target], None]


@dataclass(frozen=True, eq=False)
class Impl:
    """One implementation of a block kind on one backend.

    `forward(block, *inputs)` must have the kind's reference signature. It is stateless: it reads
    parameters and config from `block`, so impls can be swapped without touching the state dict.
    `prepare(block, target)`, if given, runs once when the impl is bound at build time (compile,
    export, weight re-layout into a buffer...), never during a forward pass.
    """

    kind: str
    backend: str
    name: str
    forward: Callable[..., Any]
    device_types: frozenset[str]
    dtypes: frozenset[torch.dtype]
    modes: frozenset[str] = frozenset({"infer"})
    features: frozenset[str] = frozenset()
    constraints: Mapping[str, Range] = field(default_factory=dict)
    priority: int = 0
    not_supported_reasons: NotSupported | None = None
    prepare: Prepare | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        for label, value in (("backend", self.backend), ("name", self.name)):
            if not isinstance(value, str) or not re.fullmatch(QUALNAME_PART, value):
                raise PluginContractError(
                    f"impl {label} {value!r} must be lower_snake_case (impl of {self.kind})"
                )
        object.__setattr__(self, "device_types", frozenset(self.device_types))
        object.__setattr__(self, "dtypes", parse_dtypes(self.dtypes))
        object.__setattr__(self, "modes", frozenset(self.modes))
        object.__setattr__(self, "features", frozenset(self.features))
        object.__setattr__(self, "constraints", dict(self.constraints))
        unknown = self.modes - set(MODES)
        if unknown:
            raise PluginContractError(
                f"impl {self.qualname}: unknown modes {sorted(unknown)}; valid: {list(MODES)}"
            )
        if not self.device_types:
            raise PluginContractError(f"impl {self.qualname}: declares no device types")
        if not callable(self.forward):
            raise PluginContractError(f"impl {self.qualname}: forward is not callable")

    @property
    def qualname(self) -> str:
        """`backend.name`, unique across all plugins, e.g. `cpu.sdpa`."""
        return f"{self.backend}.{self.name}"

    def reasons(self, config: BaseModel, required_features: frozenset[str], target: Target) -> list[str]:
        """Why this impl cannot run `config` on `target` (empty when it can)."""
        out: list[str] = []
        if ANY not in self.device_types and target.device_type not in self.device_types:
            out.append(
                f"runs on device types {sorted(self.device_types)}, target device type is {target.device_type}"
            )
        if target.dtype not in self.dtypes:
            out.append(
                f"dtype {dtype_name(target.dtype)} not declared "
                f"(declares {sorted(dtype_name(d) for d in self.dtypes)})"
            )
        if target.mode not in self.modes:
            out.append(f"mode {target.mode!r} not declared (declares {sorted(self.modes)})")
        if ANY not in self.features:
            missing = sorted(required_features - self.features)
            if missing:
                out.append(f"config needs feature(s) {missing}, not declared")
        for field_name, rng in self.constraints.items():
            value = getattr(config, field_name, None)
            if isinstance(value, (int, float)) and not (
                isinstance(value, float) and math.isnan(value)
            ):
                out.extend(rng.violations(field_name, value))
        if self.not_supported_reasons is not None:
            try:
                out.extend(str(r) for r in self.not_supported_reasons(config, target))
            except Exception as exc:  # a buggy check rejects its impl, it does not crash the build
                out.append(f"not_supported_reasons raised {type(exc).__name__}: {exc}")
        return out

    def describe(self) -> dict[str, Any]:
        """The declared capabilities, as `llmkit info --json` shows them."""
        return {
            "impl": self.qualname,
            "kind": self.kind,
            "priority": self.priority,
            "device_types": sorted(self.device_types),
            "dtypes": sorted(dtype_name(d) for d in self.dtypes),
            "modes": sorted(self.modes),
            "features": sorted(self.features),
            "constraints": {k: r.describe() for k, r in self.constraints.items()},
            "summary": self.summary,
        }

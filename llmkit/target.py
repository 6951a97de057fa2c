"""The explicit target a block is resolved for: backend, device, dtype, mode and device facts.

Capabilities are always checked against a `Target` passed in, never against "the current device",
so a plan for an H100 can be computed (and tested) on a laptop by injecting the device facts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LlmkitError, UnknownNameError

MODES = ("infer", "train", "export")

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

FLOAT_DTYPES: frozenset[torch.dtype] = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.bfloat16}
)


def parse_dtype(value: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """`torch.bfloat16`, "bfloat16", "bf16" or "torch.bfloat16" -> torch.bfloat16 (floating-point
    dtypes only; `what` names the value in the error)."""
    if isinstance(value, torch.dtype):
        return value
    key = str(value).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise UnknownNameError(what, str(value), _DTYPE_NAMES)
    return _DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def parse_dtypes(values: Iterable[str | torch.dtype]) -> frozenset[torch.dtype]:
    return frozenset(parse_dtype(v) for v in values)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UnknownNameError("mode", mode, MODES)
    return mode


def _freeze(value: Any) -> Any:
    """Make a device-fact value hashable (facts are part of the resolution cache key)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_freeze(v) for v in value]
        return tuple(sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items)
    return value


@dataclass(frozen=True)
class Target:
    """What a block is resolved for.

    `device` is where tensors live; `device_type` is the kind of device the impls must run on. They
    differ only when planning on "meta": the plan is the one the backend's real device would get.
    `facts` are device properties an impl may need to decide support (compute capability, ISA,
    memory size...). Backends fill them from the real device; tests and planners inject them.
    """

    backend: str
    device: str
    dtype: torch.dtype
    mode: str = "infer"
    facts: tuple[tuple[str, Any], ...] = field(default=())
    device_type: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        object.__setattr__(self, "device", str(torch.device(self.device)))
        if not self.device_type:
            object.__setattr__(self, "device_type", torch.device(self.device).type)
        check_mode(self.mode)
        if isinstance(self.facts, Mapping):
            object.__setattr__(self, "facts", _freeze(self.facts))
        elif not isinstance(self.facts, tuple):
            raise LlmkitError(f"Target.facts must be a mapping, got {type(self.facts).__name__}")

    def fact(self, name: str, default: Any = None) -> Any:
        """One device fact, e.g. `target.fact("compute_capability")`."""
        for key, value in self.facts:
            if key == name:
                return value
        return default

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": self.device,
            "device_type": self.device_type,
            "dtype": dtype_name(self.dtype),
            "mode": self.mode,
            "facts": {k: v for k, v in self.facts},
        }

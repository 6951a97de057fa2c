"""Backends: a device or execution engine that impls run on.

A vendor subclasses `Backend`. The defaults suit a synchronous host device; accelerator backends
override `synchronize` (and usually `time` with device events), `available` and `device_facts`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Peak:
    """Peak compute and memory bandwidth for roofline figures, with where the numbers came from."""

    flops_per_s: float
    bytes_per_s: float
    source: str


@dataclass(frozen=True)
class Timing:
    """Seconds per call over `n` timed repetitions after `warmup` untimed ones."""

    samples: tuple[float, ...]
    warmup: int

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[2] - q[0]


class Backend:
    """Base class of every backend. Subclasses set `name` and `device_type`."""

    name: str = ""
    device_type: str = ""
    summary: str = ""
    dist_backend: str | None = None
    """The torch.distributed process-group backend for this device (gloo, nccl, hccl...), used
    when a model runs on several ranks; None when the backend cannot run multi-process."""

    def available(self) -> list[str]:
        """Reasons this backend cannot run here; empty when it can."""
        return []

    def default_device(self) -> str:
        return self.device_type

    def device_facts(self, device: str) -> dict[str, Any]:
        """Properties of `device` that impls' capability checks may read (ISA, compute capability...)."""
        return {}

    def synchronize(self, device: str) -> None:
        """Wait until all work queued on `device` has finished (no-op for synchronous devices)."""

    def time(self, fn: Callable[[], Any], device: str, *, warmup: int = 3, repeat: int = 10) -> Timing:
        """Time `fn()` per call: `warmup` untimed calls, then `repeat` timed ones, synchronising."""
        for _ in range(warmup):
            fn()
        self.synchronize(device)
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            self.synchronize(device)
            samples.append(time.perf_counter() - start)
        return Timing(tuple(samples), warmup)

    def peak(self, device: str, dtype: torch.dtype) -> Peak | None:
        """Peak FLOP/s and bytes/s for `dtype` on `device` (declared or measured); None if unknown."""
        return None

    def capture_decode(self, step: Callable[[torch.Tensor, Any], torch.Tensor], tokens: torch.Tensor,
                       cache: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor, Any], torch.Tensor]] | None:
        """Run one decode step `step(tokens [B, 1], cache) -> logits` and capture it as a device
        graph: returns this step's logits and a function that replays the graph for the next
        steps' tokens (CUDA graphs, HPU graphs); None when this backend has no graphs. `cache` is
        a fixed-shape cache (`FixedLayerCache`): the step's shapes never change and its state
        advances on the device, so each replay is the next step. The step must run exactly once
        here (warm-up runs count: capture without executing, or capture the run itself)."""
        return None

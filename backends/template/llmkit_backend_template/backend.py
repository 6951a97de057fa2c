"""The template's backend: the host CPU, so that the template can be certified on any machine.

A real vendor backend sets `device_type` to its torch device ("cuda", "hpu", "xpu", "privateuseone"
or its own), says in `available()` why it cannot run (no driver, no device) instead of raising,
reports device facts its impls' capability checks read, and overrides `synchronize` / `time` when
its device runs asynchronously (see the cuda plugin's `GpuBackend` for device-event timing).
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from llmkit import peaks
from llmkit.hookspecs import Backend, Peak


class TemplateBackend(Backend):
    name = "template"
    device_type = "cpu"
    dist_backend = "gloo"
    summary = "template backend (host CPU) for vendors to copy"

    def __init__(self) -> None:
        self._peaks: dict[torch.dtype, Peak] = {}

    def available(self) -> list[str]:
        return []

    def device_facts(self, device: str) -> dict[str, Any]:
        return {"arch": platform.machine(), "isa": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads()}

    def peak(self, device: str, dtype: torch.dtype) -> Peak:
        """Measured with llmkit's micro-benchmarks; a vendor may return datasheet figures instead,
        naming the datasheet in `source`."""
        if dtype not in self._peaks:
            self._peaks[dtype] = Peak(flops_per_s=peaks.torch_gemm_flops(dtype),
                                      bytes_per_s=peaks.host_copy_bandwidth(),
                                      source=peaks.describe("torch.mm", dtype))
        return self._peaks[dtype]

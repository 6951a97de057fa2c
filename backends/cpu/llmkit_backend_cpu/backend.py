"""The `cpu` backend: device facts from torch and /proc, peaks measured by micro-benchmarks."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from llmkit import peaks
from llmkit.hookspecs import Backend, Peak

from . import moe, quant


class CpuBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"  # host tensors
    summary = "host CPU through stock PyTorch (oneDNN, inductor)"

    def __init__(self) -> None:
        self._peaks: dict[torch.dtype, Peak] = {}

    def device_facts(self, device: str) -> dict[str, Any]:
        return {
            "arch": platform.machine(),
            "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "logical_cpus": os.cpu_count(),
            "model": _cpu_model(),
            "quant_modes": quant.modes_here(),  # not "quant": that fact is the mode a target asks for
            # how many tokens a MoE layer call runs as one moe_decode kernel call (moe.DECODE_MAX_TOKENS)
            "moe_decode_tokens": [f"{str(d).removeprefix('torch.')} <= {moe.decode_max_tokens(d)}"
                                  for d in moe.DECODE_MAX_TOKENS],
        }

    def peak(self, device: str, dtype: torch.dtype) -> Peak:
        """Measured, not declared: the best of a few GEMMs (FLOP/s) and large copies (bytes/s)."""
        if dtype not in self._peaks:
            self._peaks[dtype] = _measure_peak(dtype)
        return self._peaks[dtype]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _measure_peak(dtype: torch.dtype) -> Peak:
    return Peak(flops_per_s=peaks.torch_gemm_flops(dtype), bytes_per_s=peaks.host_copy_bandwidth(),
                source=peaks.describe("torch.mm", dtype))

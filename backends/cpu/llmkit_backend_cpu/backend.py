"""The `cpu` backend: device facts from torch and /proc, peaks measured by micro-benchmarks."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch

from llmkit.hookspecs import Backend, Peak

# Sizes of the calibration runs: a square GEMM large enough to reach steady state on a few cores,
# and a copy well beyond last-level cache so it measures DRAM bandwidth.
_GEMM_N = 1024
_COPY_BYTES = 256 * 2**20


class CpuBackend(Backend):
    name = "cpu"
    device_type = "cpu"
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


def _best_seconds(fn: Any, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _measure_peak(dtype: torch.dtype) -> Peak:
    n = _GEMM_N
    a = torch.randn(n, n, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, dtype=torch.float32).to(dtype)
    flops = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b))
    src = torch.empty(_COPY_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    # a copy reads and writes every byte once
    bandwidth = 2 * _COPY_BYTES / _best_seconds(lambda: dst.copy_(src))
    return Peak(
        flops_per_s=flops,
        bytes_per_s=bandwidth,
        source=(
            f"measured: best of 5 torch.mm {n}x{n}x{n} in {str(dtype).removeprefix('torch.')} "
            f"and 5 copies of {_COPY_BYTES // 2**20} MiB, {torch.get_num_threads()} threads"
        ),
    )

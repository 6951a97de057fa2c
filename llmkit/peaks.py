"""Micro-benchmarks a backend plugin may use to measure its roofline peaks (`Backend.peak`).

The figures are measured, not declared: the best of a few runs of a square GEMM (FLOP/s) and of a
large host copy (bytes/s). Best-of rather than median because a peak is what the hardware *can* do.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

GEMM_N = 1024
"""A square GEMM large enough to reach steady state on a few cores."""
COPY_BYTES = 256 * 2**20
"""A copy well beyond last-level cache, so it measures DRAM bandwidth."""
REPEAT = 5


def best_seconds(fn: Callable[[], Any], repeat: int = REPEAT) -> float:
    """The fastest of `repeat` timed calls of `fn`, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def torch_gemm_flops(dtype: torch.dtype, n: int = GEMM_N) -> float:
    """FLOP/s of `torch.mm` on n x n host matrices in `dtype` (2 n^3 FLOPs per product)."""
    a = torch.randn(n, n, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, dtype=torch.float32).to(dtype)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b))


def host_copy_bandwidth(nbytes: int = COPY_BYTES) -> float:
    """Host memory bytes/s of one large copy, counting the read and the write of every byte.

    The source is filled first: an untouched allocation maps the shared zero page, so copying from
    it never reads DRAM and reads ~1.6x too fast on this machine (51.6 vs 31.5 GB/s).
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.fill_(0)
    return 2 * nbytes / best_seconds(lambda: dst.copy_(src))


def describe(gemm: str, dtype: torch.dtype, n: int = GEMM_N, nbytes: int = COPY_BYTES) -> str:
    """The `Peak.source` text for figures from these helpers."""
    return (f"measured: best of {REPEAT} {gemm} {n}x{n}x{n} in {str(dtype).removeprefix('torch.')} "
            f"and {REPEAT} host copies of {nbytes // 2**20} MiB, {torch.get_num_threads()} threads")

"""The `cuda` backend: NVIDIA GPUs through a CUDA build of PyTorch.

`GpuBackend` holds what CUDA and ROCm share (both are torch device type "cuda"; HIP events and
streams sit behind the same `torch.cuda` API): synchronisation and device-event timing, the
device properties every GPU reports, and peaks from a datasheet table with a measured fallback.
`CudaBackend` adds what is NVIDIA's: its availability reasons, compute capability, SM count,
driver and library versions, and the NVIDIA peak table.

Nothing here touches CUDA at import time, so the plugin loads (and reports why it is unavailable)
on a machine without a GPU or with a CPU-only torch.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

from llmkit.hookspecs import Backend, Peak, Timing

from . import capability
from . import peaks as _peaks


class GpuBackend(Backend):
    """What CUDA and ROCm builds of PyTorch share. Subclasses set name, `available` and the peak table."""

    device_type = "cuda"
    dist_backend = "nccl"  # RCCL answers to the same name on ROCm
    peak_table: tuple[_peaks.DevicePeaks, ...] = ()

    def __init__(self) -> None:
        self._peaks: dict[tuple[str, torch.dtype], Peak | None] = {}

    def default_device(self) -> str:
        return "cuda:0"

    def synchronize(self, device: str) -> None:
        torch.cuda.synchronize(device)

    def time(self, fn: Callable[[], Any], device: str, *, warmup: int = 3, repeat: int = 10) -> Timing:
        """Per-call device time between two CUDA (or HIP) events recorded around each call on the
        current stream; host-side launch overhead shows up as idle device time, as it should."""
        with torch.cuda.device(device):
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize(device)
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
            for start, end in zip(starts, ends):
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(device)
            return Timing(tuple(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)), warmup)

    def capture_decode(self, step: Callable[[torch.Tensor, Any], torch.Tensor], tokens: torch.Tensor,
                       cache: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor, Any], torch.Tensor]]:
        """A CUDA (or HIP) graph of the decode step (torch.cuda.graphs; tested on an H200, not on ROCm).

        The step runs once eagerly on a side stream (this step's logits, and the warm-up that
        capture needs for cuBLAS workspaces and the caching allocator); capture then records the
        step into a graph without executing it, reading the token from a static buffer; each
        replay copies the new token in and runs the whole step as one launch. The fixed-shape
        cache keeps its state in device tensors, so replays advance it. A host read inside an
        impl fails the capture (the attention paths skip theirs while capturing)."""
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            first = step(tokens, cache).clone()
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        static_tokens = tokens.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = step(static_tokens, cache)

        def replay(new_tokens: torch.Tensor, _cache: Any) -> torch.Tensor:
            static_tokens.copy_(new_tokens)
            graph.replay()
            return static_logits

        return first, replay

    def common_facts(self, device: str) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(device)
        return {
            "name": props.name,
            "total_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "device_count": torch.cuda.device_count(),
            "triton": _version("triton"),
            "llmkit_triton": _version("llmkit-triton-kernels"),
        }

    def table_peak(self, facts: dict[str, Any], dtype: torch.dtype) -> Peak | None:
        entry = _peaks.lookup(self.peak_table, str(facts.get("name", "")), facts)
        return entry.peak(dtype) if entry is not None else None

    def peak(self, device: str, dtype: torch.dtype) -> Peak | None:
        """The datasheet figure for a known device, measured figures otherwise."""
        key = (str(torch.device(device)), dtype)
        if key not in self._peaks:
            facts = self.device_facts(device)
            self._peaks[key] = self.table_peak(facts, dtype) or _peaks.measure(self, device, dtype)
        return self._peaks[key]


class CudaBackend(GpuBackend):
    name = "cuda"
    summary = "NVIDIA GPUs: PyTorch fused paths (SDPA flash/efficient/cuDNN, grouped GEMM) and Triton kernels"
    peak_table = _peaks.NVIDIA

    def available(self) -> list[str]:
        hip = getattr(torch.version, "hip", None)
        if hip:
            return [f"this torch is a ROCm build (torch.version.hip = {hip}); the rocm backend runs it"]
        if torch.version.cuda is None:
            return [f"torch {torch.__version__} was built without CUDA (torch.version.cuda is None); "
                    "install a CUDA build of torch"]
        if not torch.cuda.is_available():
            return ["no CUDA device visible (torch.cuda.is_available() is False; check nvidia-smi, the "
                    "driver and CUDA_VISIBLE_DEVICES)"]
        return []

    def device_facts(self, device: str) -> dict[str, Any]:
        major, minor = torch.cuda.get_device_capability(device)
        sm = major * 10 + minor
        return {
            **self.common_facts(device),
            "compute_capability": f"{major}.{minor}",
            "sm": sm,
            "fp8": capability.supports_fp8(sm),
            "driver": _nvidia_driver(),
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    """The kernel driver release (e.g. "560.35.03") through NVML when nvidia-ml-py is installed,
    else the CUDA driver API version torch reports (e.g. "12060")."""
    if importlib.util.find_spec("pynvml") is not None:
        import pynvml

        try:
            pynvml.nvmlInit()
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else str(version)
        except pynvml.NVMLError:
            pass
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    return f"cuda-driver-api {get()}" if get is not None else None

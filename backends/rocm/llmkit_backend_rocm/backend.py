"""The `rocm` backend: AMD GPUs through a ROCm (HIP) build of PyTorch.

A ROCm torch keeps the device type "cuda" and the `torch.cuda` API (HIP streams and events behind
it), so synchronisation, event timing and the measured peak fallback are the cuda plugin's
`GpuBackend`; what differs is availability (selected exactly when `torch.version.hip` is set),
the facts (gfx architecture, wavefront size, HIP runtime) and the peak table.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from llmkit.hookspecs import Peak
from llmkit_backend_cuda.backend import GpuBackend

from . import capability, peaks


class RocmBackend(GpuBackend):
    name = "rocm"
    summary = "AMD GPUs (ROCm/HIP torch): PyTorch's AOTriton SDPA, grouped GEMM and the shared Triton kernels"

    def available(self) -> list[str]:
        hip = getattr(torch.version, "hip", None)
        if not hip:
            cuda = f"a CUDA build (torch.version.cuda = {torch.version.cuda})" if torch.version.cuda else "a CPU build"
            return [f"torch {torch.__version__} is {cuda}, not a ROCm build (torch.version.hip is None); "
                    "install a ROCm build of torch"]
        if not torch.cuda.is_available():
            return ["no ROCm device visible (torch.cuda.is_available() is False; check rocm-smi, the amdgpu "
                    "driver and HIP_VISIBLE_DEVICES)"]
        return []

    def device_facts(self, device: str) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(device)
        full = str(getattr(props, "gcnArchName", ""))
        arch = full.split(":")[0]
        row = capability.ARCHS.get(arch)
        return {
            **self.common_facts(device),
            "gcn_arch": arch,
            "gcn_arch_full": full,
            "family": row.family if row else None,
            "wavefront": getattr(props, "warp_size", row.wave if row else None),
            "fp8": [str(d).removeprefix("torch.") for d in capability.fp8_dtypes(arch)],
            "hip_runtime": torch.version.hip,
            "aotriton_experimental": os.environ.get(capability.EXPERIMENTAL_ENV, "0") not in ("", "0"),
            "visible_devices": os.environ.get("HIP_VISIBLE_DEVICES"),
        }

    def table_peak(self, facts: dict[str, Any], dtype: torch.dtype) -> Peak | None:
        return peaks.table_peak(facts, dtype)

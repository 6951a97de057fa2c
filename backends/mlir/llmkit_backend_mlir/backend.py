"""The `mlir` backend: host tensors in and out, computed by code MLIR's ExecutionEngine JIT-compiled."""

from __future__ import annotations

import importlib
import importlib.util
import platform
from typing import Any

import torch

from llmkit import peaks
from llmkit.hookspecs import Backend, Peak

from . import engine


class MlirBackend(Backend):
    name = "mlir"
    device_type = "cpu"
    dist_backend = "gloo"  # host tensors
    summary = "block references lowered by torch-mlir to linalg, JIT-compiled by MLIR's ExecutionEngine"

    def __init__(self) -> None:
        self._peaks: dict[torch.dtype, Peak] = {}

    def available(self) -> list[str]:
        if importlib.util.find_spec("torch_mlir") is None:
            return ["torch_mlir is not installed (pip install torch-mlir)"]
        try:
            importlib.import_module("torch_mlir.fx")
            importlib.import_module("torch_mlir.execution_engine")
        except Exception as exc:  # a wheel built for another torch or Python fails here
            return [f"torch_mlir does not import: {type(exc).__name__}: {exc}"]
        return []

    def device_facts(self, device: str) -> dict[str, Any]:
        return {
            "torch_mlir": engine.version(),
            "tracer": "torch.fx make_fx (symbolic sequence dims) + torch_mlir.fx.stateless_fx_import",
            "to_linalg": engine.LINALG,
            "lowering": engine.PIPELINE,
            "jit": f"MLIR ExecutionEngine, LLVM -O{engine.OPT_LEVEL}",
            "arch": platform.machine(),
        }

    def peak(self, device: str, dtype: torch.dtype) -> Peak:
        """The host CPU's peaks, measured as the cpu backend does: what this hardware can do,
        against which the generated loops are placed."""
        if dtype not in self._peaks:
            self._peaks[dtype] = _measure_peak(dtype)
        return self._peaks[dtype]


def _measure_peak(dtype: torch.dtype) -> Peak:
    return Peak(flops_per_s=peaks.torch_gemm_flops(dtype), bytes_per_s=peaks.host_copy_bandwidth(),
                source="host CPU, " + peaks.describe("torch.mm", dtype))

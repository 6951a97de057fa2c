"""Peak FLOP/s and memory bandwidth of known NVIDIA devices, with the source of every figure.

All FLOP/s figures are **dense** (NVIDIA's datasheets print the tensor-core figures "with
sparsity" and mark them with an asterisk; the dense figure is half of it). float32 is the
non-tensor FP32 figure, because PyTorch computes float32 matmuls without TF32 unless
`torch.backends.cuda.matmul.allow_tf32` is set (it is not, by default); float64 is the FP64
Tensor Core figure (cuBLAS DGEMM uses it on A100/H100/H200) where the datasheet lists one.
Bandwidth is the datasheet's HBM/GDDR figure. A device not in the table gets measured figures
(`measure`), and its `Peak.source` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from llmkit.hookspecs import Peak

TERA = 1e12


@dataclass(frozen=True)
class DevicePeaks:
    """One device model's datasheet figures: TFLOP/s per dtype and bandwidth in TB/s."""

    name: str
    tflops: Mapping[torch.dtype, float]
    tb_per_s: float
    source: str
    matches: Callable[[str, dict[str, Any]], bool] = field(repr=False, compare=False)

    def peak(self, dtype: torch.dtype, scale: float = 1.0, note: str = "") -> Peak | None:
        if dtype not in self.tflops:
            return None
        dtype_name = str(dtype).removeprefix("torch.")
        return Peak(flops_per_s=self.tflops[dtype] * TERA * scale, bytes_per_s=self.tb_per_s * TERA * scale,
                    source=f"{self.source}: {self.name}, dense {dtype_name} {self.tflops[dtype]:g} TFLOP/s, "
                           f"{self.tb_per_s:g} TB/s{note}")


def _name_has(*parts: str, absent: tuple[str, ...] = (), min_gib: float | None = None,
              max_gib: float | None = None) -> Callable[[str, dict[str, Any]], bool]:
    def match(name: str, facts: dict[str, Any]) -> bool:
        upper = name.upper()
        if not all(p.upper() in upper for p in parts) or any(a.upper() in upper for a in absent):
            return False
        gib = facts.get("total_memory_gib")
        if min_gib is not None and (gib is None or gib < min_gib):
            return False
        return max_gib is None or (gib is not None and gib <= max_gib)
    return match


_F64, _F32, _F16, _BF16, _F8 = torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn

# Order matters: the first entry that matches the device name wins (H200 NVL before H200, GH200 before
# H200, L40S before L4).
NVIDIA: tuple[DevicePeaks, ...] = (
    DevicePeaks("H200 NVL", {_F64: 60, _F32: 60, _F16: 835.5, _BF16: 835.5, _F8: 1670.5}, 4.8,
                "NVIDIA H200 Tensor Core GPU datasheet (H200 NVL column)", _name_has("H200", "NVL")),
    DevicePeaks("GH200 144GB HBM3e", {_F64: 67, _F32: 67, _F16: 989.5, _BF16: 989.5, _F8: 1979}, 4.9,
                "NVIDIA GH200 Grace Hopper Superchip datasheet (HBM3e variant)", _name_has("GH200", min_gib=120)),
    DevicePeaks("GH200 96GB HBM3", {_F64: 67, _F32: 67, _F16: 989.5, _BF16: 989.5, _F8: 1979}, 4.0,
                "NVIDIA GH200 Grace Hopper Superchip datasheet (HBM3 variant)", _name_has("GH200")),
    DevicePeaks("H200 SXM", {_F64: 67, _F32: 67, _F16: 989.5, _BF16: 989.5, _F8: 1979}, 4.8,
                "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column)", _name_has("H200")),
    DevicePeaks("H100 NVL", {_F64: 60, _F32: 60, _F16: 835.5, _BF16: 835.5, _F8: 1670.5}, 3.9,
                "NVIDIA H100 Tensor Core GPU datasheet (H100 NVL column)", _name_has("H100", "NVL")),
    DevicePeaks("H100 PCIe", {_F64: 51, _F32: 51, _F16: 756.5, _BF16: 756.5, _F8: 1513}, 2.0,
                "NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe column)", _name_has("H100", "PCIE")),
    DevicePeaks("H100 SXM", {_F64: 67, _F32: 67, _F16: 989.5, _BF16: 989.5, _F8: 1979}, 3.35,
                "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column)", _name_has("H100")),
    DevicePeaks("A100 80GB SXM", {_F64: 19.5, _F32: 19.5, _F16: 312, _BF16: 312}, 2.039,
                "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM column)",
                _name_has("A100", absent=("PCIE",), min_gib=60)),
    DevicePeaks("A100 80GB PCIe", {_F64: 19.5, _F32: 19.5, _F16: 312, _BF16: 312}, 1.935,
                "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB PCIe column)", _name_has("A100", "PCIE", min_gib=60)),
    DevicePeaks("A100 40GB", {_F64: 19.5, _F32: 19.5, _F16: 312, _BF16: 312}, 1.555,
                "NVIDIA A100 Tensor Core GPU datasheet (A100 40GB PCIe and SXM columns)",
                _name_has("A100", max_gib=60)),
    DevicePeaks("L40S", {_F32: 91.6, _F16: 362.05, _BF16: 362.05, _F8: 733}, 0.864,
                "NVIDIA L40S datasheet", _name_has("L40S")),
    DevicePeaks("L4", {_F32: 30.3, _F16: 121, _BF16: 121, _F8: 242.5}, 0.3,
                "NVIDIA L4 Tensor Core GPU datasheet", _name_has("L4", absent=("L40",))),
    DevicePeaks("GeForce RTX 4090", {_F32: 82.6, _F16: 165.2, _BF16: 165.2, _F8: 330.3}, 1.008,
                "NVIDIA Ada GPU Architecture whitepaper, appendix table (FP32-accumulate tensor figures)",
                _name_has("RTX 4090")),
)


def lookup(table: tuple[DevicePeaks, ...], name: str, facts: dict[str, Any]) -> DevicePeaks | None:
    """The first table entry whose rule matches the device name (and memory size)."""
    return next((entry for entry in table if entry.matches(name, facts)), None)


GEMM_N = 4096
"""Square GEMM side for the measured fallback: large enough to saturate a datacenter GPU."""
COPY_BYTES = 1 << 30
"""Device-to-device copy size for the measured bandwidth: far beyond any L2."""


def measure(backend: Any, device: str, dtype: torch.dtype) -> Peak:
    """Measured figures for a device the table does not know: the best of a few `n^3` GEMMs and
    1 GiB device copies (read + write), timed by the backend's own device-event timer."""
    a = torch.randn(GEMM_N, GEMM_N, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(GEMM_N, GEMM_N, device=device, dtype=torch.float32).to(dtype)
    gemm = min(backend.time(lambda: torch.mm(a, b), device, warmup=2, repeat=5).samples)
    src = torch.ones(COPY_BYTES // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = min(backend.time(lambda: dst.copy_(src), device, warmup=2, repeat=5).samples)
    dtype_name = str(dtype).removeprefix("torch.")
    return Peak(flops_per_s=2 * GEMM_N**3 / gemm, bytes_per_s=2 * COPY_BYTES / copy,
                source=f"measured: best of 5 torch.mm {GEMM_N}^3 in {dtype_name} and 5 device copies of "
                       f"{COPY_BYTES >> 20} MiB, timed with device events (device not in the datasheet table)")

"""Peak FLOP/s and bandwidth of known AMD Instinct devices, with the source of every figure.

Figures are the datasheets' dense ones (AMD prints structured-sparsity figures separately).
float32 and float64 are the matrix-core (MFMA) figures, which rocBLAS/hipBLASLt GEMMs use.
A datasheet describes a whole package, while torch sees what ROCm exposes as one device: one GCD
of an MI250/MI250X, or one partition of an MI300X in CPX mode. Figures are therefore scaled by
the compute units the device exposes over the package's (`multiprocessors` fact), and the source
says so. Devices not in the table get measured figures (llmkit_backend_cuda.peaks.measure).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmkit.hookspecs import Peak
from llmkit_backend_cuda.peaks import DevicePeaks

_F64, _F32, _F16, _BF16, _F8 = torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fnuz


def _match(*parts: str, cus_per_device: tuple[int, ...] | None = None) -> Callable[[str, dict[str, Any]], bool]:
    def match(name: str, facts: dict[str, Any]) -> bool:
        upper = name.upper()
        if not all(p in upper for p in parts):
            return False
        return cus_per_device is None or facts.get("multiprocessors") in cus_per_device
    return match


@dataclass(frozen=True)
class Package:
    peaks: DevicePeaks
    compute_units: int
    """Compute units of the whole package the datasheet describes."""


AMD: tuple[Package, ...] = (
    Package(DevicePeaks("Instinct MI325X", {_F64: 163.4, _F32: 163.4, _F16: 1307.4, _BF16: 1307.4, _F8: 2614.9}, 6.0,
                        "AMD Instinct MI325X accelerator data sheet", _match("MI325X")), 304),
    Package(DevicePeaks("Instinct MI300X", {_F64: 163.4, _F32: 163.4, _F16: 1307.4, _BF16: 1307.4, _F8: 2614.9}, 5.3,
                        "AMD Instinct MI300X accelerator data sheet", _match("MI300X")), 304),
    Package(DevicePeaks("Instinct MI300A", {_F64: 122.6, _F32: 122.6, _F16: 980.6, _BF16: 980.6, _F8: 1961.2}, 5.3,
                        "AMD Instinct MI300A APU data sheet", _match("MI300A")), 228),
    Package(DevicePeaks("Instinct MI250X", {_F64: 95.7, _F32: 95.7, _F16: 383.0, _BF16: 383.0}, 3.2768,
                        "AMD Instinct MI250X accelerator data sheet", _match("MI250", cus_per_device=(110, 220))), 220),
    Package(DevicePeaks("Instinct MI250", {_F64: 90.5, _F32: 90.5, _F16: 362.1, _BF16: 362.1}, 3.2768,
                        "AMD Instinct MI250 accelerator data sheet", _match("MI250", cus_per_device=(104, 208))), 208),
    Package(DevicePeaks("Instinct MI210", {_F64: 45.3, _F32: 45.3, _F16: 181.0, _BF16: 181.0}, 1.6384,
                        "AMD Instinct MI210 accelerator data sheet", _match("MI210")), 104),
)


def lookup(name: str, facts: dict[str, Any]) -> Package | None:
    return next((p for p in AMD if p.peaks.matches(name, facts)), None)


def table_peak(facts: dict[str, Any], dtype: torch.dtype) -> Peak | None:
    package = lookup(str(facts.get("name", "")), facts)
    if package is None:
        return None
    cus = facts.get("multiprocessors") or package.compute_units
    scale = min(1.0, cus / package.compute_units)
    note = "" if scale == 1.0 else f", scaled by {cus}/{package.compute_units} compute units (one GCD or partition)"
    return package.peaks.peak(dtype, scale, note)

"""Capability ranges per AMD gfx architecture, read from the target's device facts.

`gcn_arch` is what `torch.cuda.get_device_properties(d).gcnArchName` reports, minus the feature
suffix ("gfx942:sramecc+:xnack-" -> "gfx942"); tests and planners inject it. Sources:
- architectures and products: LLVM AMDGPU processor table (llvm.org/docs/AMDGPUUsage.html) and
  the ROCm GPU-hardware-specifications page;
- fused SDPA on ROCm is AOTriton: official on gfx90a / gfx942 / gfx950, experimental on RDNA3/4
  (gfx110x, gfx120x) behind TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL=1 (PyTorch
  aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, ROCm branch); there is no cuDNN backend;
- fp8 formats: gfx942 has the FNUZ variants (float8_e4m3fnuz / e5m2fnuz), gfx950 and RDNA4 the
  OCP ones (float8_e4m3fn / e5m2) (AMD CDNA3 and CDNA4 ISA guides);
- the Triton kernels are declared for CDNA2+ and RDNA3+, the architectures PyTorch's ROCm wheels
  and Triton's AMD backend (triton-lang/triton third_party/amd) are tested on; MI100 is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llmkit.hookspecs import Target


@dataclass(frozen=True)
class Arch:
    family: str
    products: str
    fused_sdpa: str
    """"yes", "experimental" (AOTriton behind an env switch) or "no"."""
    fp8: str | None
    """"fnuz", "ocp" or None."""
    triton: bool
    wave: int


ARCHS: dict[str, Arch] = {
    "gfx908": Arch("CDNA1", "Instinct MI100", "no", None, False, 64),
    "gfx90a": Arch("CDNA2", "Instinct MI210 / MI250 / MI250X", "yes", None, True, 64),
    "gfx942": Arch("CDNA3", "Instinct MI300X / MI300A / MI325X", "yes", "fnuz", True, 64),
    "gfx950": Arch("CDNA4", "Instinct MI350X / MI355X", "yes", "ocp", True, 64),
    "gfx1100": Arch("RDNA3", "Radeon RX 7900 XTX / PRO W7900", "experimental", None, True, 32),
    "gfx1101": Arch("RDNA3", "Radeon RX 7800 XT / PRO W7700", "experimental", None, True, 32),
    "gfx1200": Arch("RDNA4", "Radeon RX 9060 XT", "experimental", "ocp", True, 32),
    "gfx1201": Arch("RDNA4", "Radeon RX 9070 XT / AI PRO R9700", "experimental", "ocp", True, 32),
}

EXPERIMENTAL_ENV = "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"


def gcn_arch(target: Target) -> str | None:
    value = target.fact("gcn_arch")
    return None if value is None else str(value).split(":")[0]


def arch_of(target: Target) -> tuple[str | None, Arch | None, list[str]]:
    """(gfx name, table row, reasons) — reasons when the facts name no arch or one not in the table."""
    name = gcn_arch(target)
    if name is None:
        return None, None, ["the target's device facts name no gfx architecture (plan on a ROCm device, or inject "
                            "facts such as {'gcn_arch': 'gfx942'})"]
    arch = ARCHS.get(name)
    if arch is None:
        return name, None, [f"gfx architecture {name} is not one this plugin declares ({', '.join(ARCHS)})"]
    return name, arch, []


def device(target: Target) -> Iterator[str]:
    """Any impl: a known architecture; bfloat16 matrix math (every declared arch has it)."""
    yield from arch_of(target)[2]


def fused_sdpa(target: Target) -> Iterator[str]:
    name, arch, reasons = arch_of(target)
    yield from reasons
    if arch is None:
        return
    if arch.fused_sdpa == "no":
        yield f"{name} ({arch.products}) has no fused SDPA kernel in PyTorch's AOTriton build"
    elif arch.fused_sdpa == "experimental" and not target.fact("aotriton_experimental", False):
        yield (f"fused SDPA on {name} ({arch.family}) is experimental in PyTorch and off unless "
               f"{EXPERIMENTAL_ENV}=1")


def triton(target: Target) -> Iterator[str]:
    name, arch, reasons = arch_of(target)
    yield from reasons
    if arch is not None and not arch.triton:
        yield (f"the Triton kernels are declared for CDNA2+ and RDNA3+ only; {name} ({arch.family}) is not "
               "among the architectures they are built and tested for")


def fp8_dtypes(name: str) -> tuple[torch.dtype, ...]:
    """The fp8 storage types an architecture's matrix cores take (none before CDNA3)."""
    arch = ARCHS.get(name)
    if arch is None or arch.fp8 is None:
        return ()
    if arch.fp8 == "fnuz":
        return (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
    return (torch.float8_e4m3fn, torch.float8_e5m2)

"""Capability ranges of NVIDIA devices, read from the target's device facts, never from "the current device".

Every check takes a `Target` and reads `target.facts` (`compute_capability` "9.0", or `sm` 90), so a
plan for an H100 can be computed and tested on a machine without a GPU by injecting the facts.

Ranges and where they come from:
- bfloat16 tensor-core math needs sm_80+ (Ampere): CUDA C++ Programming Guide, "Arithmetic
  Instructions" / compute-capability tables (bf16 mma is sm_80+).
- fp8 (e4m3/e5m2) tensor-core math needs sm_89 (Ada) or sm_90+ (Hopper): CUDA Programming Guide,
  PTX ISA `mma` fp8 types (sm_89+).
- Triton compiles for compute capability 8.0+ (triton-lang/triton README, "Compatibility").
- PyTorch's SDPA kernels (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp): FlashAttention-2
  sm_80+, fp16/bf16 only, head_dim <= 256; memory-efficient (cutlass) sm_50+, fp16/bf16/fp32, head
  dims aligned to 8 (half) / 4 (float); cuDNN attention sm_80+, fp16/bf16.
- `torch._grouped_mm` / `F.grouped_mm`: bfloat16 on sm_80+ (its docstring); operand strides must be
  multiples of 16 bytes (torch/_meta_registrations.py, `_meta_grouped_mm_common`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llmkit.hookspecs import Target

HALF = (torch.float16, torch.bfloat16)


def sm(target: Target) -> int | None:
    """The target's compute capability as an integer (8.0 -> 80), or None when the facts lack it."""
    value = target.fact("sm")
    if value is not None:
        return int(value)
    cc = target.fact("compute_capability")
    if cc is None:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major) * 10 + int(minor or 0)


def sm_name(value: int) -> str:
    return f"sm_{value}"


def unknown_device(target: Target) -> Iterator[str]:
    if sm(target) is None:
        yield ("the target's device facts name no compute capability (plan on a CUDA device, or "
               "inject facts such as {'compute_capability': '9.0'})")


def require_sm(target: Target, minimum: int, what: str) -> Iterator[str]:
    """`what` needs compute capability `minimum` or newer."""
    value = sm(target)
    if value is None:
        yield from unknown_device(target)
    elif value < minimum:
        yield f"{what} needs {sm_name(minimum)}+, the target is {sm_name(value)}"


def dtype_on_device(target: Target) -> Iterator[str]:
    """bfloat16 tensor-core math is Ampere (sm_80) and newer."""
    value = sm(target)
    if target.dtype == torch.bfloat16 and value is not None and value < 80:
        yield f"bfloat16 tensor-core math needs sm_80+, the target is {sm_name(value)}"


def supports_fp8(compute_capability: int) -> bool:
    """fp8 e4m3/e5m2 tensor-core math: sm_89 (Ada) and sm_90+ (Hopper, Blackwell)."""
    return compute_capability >= 89


def aligned(dim_name: str, value: int, dtype: torch.dtype, what: str) -> Iterator[str]:
    """`value` elements of `dtype` must span a multiple of 16 bytes (vectorised loads, grouped GEMM strides)."""
    size = torch.empty((), dtype=dtype).element_size()
    step = max(1, 16 // size)
    if value % step:
        yield f"{what} needs {dim_name} to be a multiple of {step} in {str(dtype).removeprefix('torch.')} (16-byte rows), got {value}"

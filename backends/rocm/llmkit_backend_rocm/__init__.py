"""llmkit's `rocm` backend plugin: AMD GPUs through a ROCm build of PyTorch.

The same Triton kernels as the cuda plugin (`llmkit-triton-kernels`) and the same PyTorch paths
(`llmkit_backend_cuda.torch_paths`: a ROCm torch is device type "cuda"), selected when
`torch.version.hip` is set, with ranges per gfx architecture and ROCm's own exclusions declared as
reasons (`capability`): no cuDNN attention, AOTriton's fused SDPA official only on CDNA2-4 and
experimental on RDNA, no Triton kernels declared before CDNA2. Not run on AMD hardware yet: every
claim is unverified until a certificate from a ROCm machine exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.nn.attention import SDPBackend

from llmkit.hookspecs import Backend, Impl, Target, hookimpl
from llmkit_backend_cuda import ATTENTION_FEATURES, MOE_FEATURES
from llmkit_backend_cuda import capability as cuda_capability
from llmkit_backend_cuda import torch_paths
from llmkit_backend_cuda.triton_impls import triton_impls

from . import capability
from .backend import RocmBackend

LLMKIT_PLUGIN_API = 1

ROCM_SDPA_KERNELS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
"""AOTriton's kernels; ROCm has no cuDNN attention."""
SDPA_HEAD_DIM_MAX = 256


def sdpa_unsupported(config: Any, target: Target) -> Iterator[str]:
    yield from capability.fused_sdpa(target)
    if config.head_dim > SDPA_HEAD_DIM_MAX:
        yield f"head_dim {config.head_dim} > {SDPA_HEAD_DIM_MAX}, the largest AOTriton's kernels take"
    if config.head_dim % 8:
        yield f"head_dim {config.head_dim} is not a multiple of 8 (AOTriton needs aligned head dims)"


def norm_unsupported(config: Any, target: Target) -> Iterator[str]:
    yield from capability.device(target)


def grouped_moe_unsupported(config: Any, target: Target) -> Iterator[str]:
    yield from capability.device(target)
    yield from cuda_capability.aligned("d_model", config.d_model, target.dtype, "torch._grouped_mm")
    yield from cuda_capability.aligned("hidden", config.hidden, target.dtype, "torch._grouped_mm")


@hookimpl
def llmkit_backends() -> list[Backend]:
    return [RocmBackend()]


@hookimpl
def llmkit_impls() -> list[Impl]:
    return [
        *torch_paths.impls("rocm", sdpa_kernels=ROCM_SDPA_KERNELS, sdpa_dtypes={"float16", "bfloat16"},
                           sdpa_summary="F.scaled_dot_product_attention on AOTriton's flash / memory-efficient "
                                        "kernels only",
                           attention_features=ATTENTION_FEATURES, moe_features=MOE_FEATURES,
                           sdpa_unsupported=sdpa_unsupported, norm_unsupported=norm_unsupported,
                           moe_unsupported=grouped_moe_unsupported),
        *triton_impls("rocm", capability.triton),
    ]

"""llmkit's `cuda` backend plugin: NVIDIA GPUs through a CUDA build of PyTorch.

Impls: PyTorch's fused paths (`torch_paths`: SDPA restricted to FlashAttention-2 / cuDNN /
memory-efficient kernels, fused norms, grouped-GEMM MoE) and the shared Triton kernels
(`triton_impls`, from the `llmkit-triton-kernels` library). Every capability range is a reason
computed from the target's device facts (`capability`), so it can be checked on any machine.
Only the public plugin contract (`llmkit.hookspecs`) and the block catalogue are used.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llmkit.hookspecs import Backend, Impl, Target, hookimpl

from . import capability, torch_paths
from .backend import CudaBackend
from .triton_impls import triton_impls

LLMKIT_PLUGIN_API = 1

OLDEST_SM = 75
"""The oldest architecture this plugin declares (Turing); PyTorch's CUDA 12.8+ wheels start there."""

ATTENTION_FEATURES = {"mqa", "gqa", "fused_qkv", "qkv_bias", "o_bias", "clip_qkv", "qk_norm", "sliding_window",
                      "non_causal", "rope"}
MOE_FEATURES = {"gated", "ungated", "act_silu", "act_gelu", "act_gelu_tanh", "act_relu", "router_softmax",
                "router_sigmoid", "renormalize_none", "renormalize_sum", "correction_bias", "group_limited",
                "routed_scaling", "jitter", "shared_expert", "shared_gate", "expert_bias", "load_balance_loss",
                "z_loss", "seq_balance_loss"}
"""Every moe@1 feature but `capacity`: dropping rows beyond an expert's capacity breaks the jagged
group layout the grouped GEMM takes."""
SDPA_HEAD_DIM_MAX = 256


def sdpa_unsupported(config: Any, target: Target) -> Iterator[str]:
    """FlashAttention-2 / memory-efficient / cuDNN limits (PyTorch sdp_utils.cpp)."""
    yield from capability.require_sm(target, OLDEST_SM, "the cuda backend")
    yield from capability.dtype_on_device(target)
    if config.head_dim > SDPA_HEAD_DIM_MAX:
        yield f"head_dim {config.head_dim} > {SDPA_HEAD_DIM_MAX}, the largest the fused SDPA kernels take"
    if config.head_dim % 8:
        yield f"head_dim {config.head_dim} is not a multiple of 8 (fused SDPA kernels need aligned head dims)"


def norm_unsupported(config: Any, target: Target) -> Iterator[str]:
    yield from capability.require_sm(target, OLDEST_SM, "the cuda backend")


def grouped_moe_unsupported(config: Any, target: Target) -> Iterator[str]:
    """torch._grouped_mm: bf16 on sm_80+, 16-byte aligned operand rows."""
    yield from capability.require_sm(target, 80, "torch._grouped_mm (grouped GEMM)")
    yield from capability.aligned("d_model", config.d_model, target.dtype, "torch._grouped_mm")
    yield from capability.aligned("hidden", config.hidden, target.dtype, "torch._grouped_mm")


def triton_device(target: Target) -> Iterator[str]:
    yield from capability.require_sm(target, 80, "Triton")


@hookimpl
def llmkit_backends() -> list[Backend]:
    return [CudaBackend()]


@hookimpl
def llmkit_impls() -> list[Impl]:
    return [
        *torch_paths.impls("cuda", sdpa_kernels=torch_paths.CUDA_SDPA_KERNELS,
                           sdpa_dtypes={"float16", "bfloat16", "float32"},
                           sdpa_summary="F.scaled_dot_product_attention on FlashAttention-2 / cuDNN / "
                                        "memory-efficient kernels only",
                           attention_features=ATTENTION_FEATURES, moe_features=MOE_FEATURES,
                           sdpa_unsupported=sdpa_unsupported, norm_unsupported=norm_unsupported,
                           moe_unsupported=grouped_moe_unsupported),
        *triton_impls("cuda", triton_device),
    ]

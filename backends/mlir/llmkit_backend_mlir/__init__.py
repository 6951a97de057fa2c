"""llmkit's MLIR backend plugin: each block's reference computation imported by torch-mlir's fx
importer, lowered to linalg-on-tensors and then LLVM, and run by MLIR's ExecutionEngine on the host.

The kernels are the reference functions themselves, so every feature of a covered kind is claimed
except what a traced function cannot express (named in `not_supported_reasons`). Only float32 and
inference are claimed. float64 passes the quick suite but for RoPE at positions near 2^15, where
the C library's pow (in the frequency table) differs from PyTorch's by an ulp and the angle error
(4e-12) exceeds the float64 floor; bfloat16 and float16 have not been certified. Kinds without an
impl here (embedding, layer, MLA) run the reference, and the dispatch plan says so.
"""

from __future__ import annotations

from llmkit.hookspecs import ANY, Backend, Impl, hookimpl

from . import blocks
from .backend import MlirBackend

LLMKIT_PLUGIN_API = 1

_DTYPES = {"float32"}


@hookimpl
def llmkit_backends() -> list[Backend]:
    return [MlirBackend()]


@hookimpl
def llmkit_impls() -> list[Impl]:
    common = {"backend": "mlir", "name": "linalg", "device_types": {"cpu"}, "dtypes": _DTYPES,
              "features": {ANY}, "priority": 10, "prepare": blocks.prepare}
    return [
        Impl(kind="norm@1", forward=blocks.norm_forward, **common,
             summary="the reference norm as one MLIR kernel"),
        Impl(kind="mlp@1", forward=blocks.mlp_forward, **common,
             summary="the reference MLP as one MLIR kernel"),
        Impl(kind="head@1", forward=blocks.head_forward, **common,
             summary="the reference LM head (tied or not, multiplier, soft-cap) as one MLIR kernel"),
        Impl(kind="rope@1", forward=blocks.rope_forward, not_supported_reasons=blocks.rope_unsupported, **common,
             summary="the reference RoPE (tables included) as one MLIR kernel"),
        Impl(kind="attention@1", forward=blocks.attention_forward, **common,
             summary="two MLIR kernels, project and attend+output, around the Python LayerCache"),
        Impl(kind="moe@1", forward=blocks.moe_forward, not_supported_reasons=blocks.moe_unsupported, **common,
             summary="routing in torch; all experts densely in one MLIR kernel, weighted by the routing matrix"),
    ]

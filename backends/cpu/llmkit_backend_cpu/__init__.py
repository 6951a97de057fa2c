"""llmkit's CPU backend plugin: the host CPU through stock PyTorch.

It uses only the public plugin contract (`llmkit.hookspecs`) and the public block catalogue
(`llmkit_blocks`), like any outside vendor's plugin. Block kinds without an impl here (MLA,
embedding, layer) run the reference impl on `cpu`, and the dispatch plan says so.
"""

from __future__ import annotations

from llmkit.hookspecs import ANY, Backend, Impl, hookimpl

from . import attention, dense, moe, norm, rope
from .backend import CpuBackend

LLMKIT_PLUGIN_API = 1

_FLOATS = {"float32", "float64", "bfloat16", "float16"}
_ATTENTION = {"mqa", "gqa", "fused_qkv", "qkv_bias", "o_bias", "clip_qkv", "qk_norm", "sliding_window",
              "non_causal", "rope"}


@hookimpl
def llmkit_backends() -> list[Backend]:
    return [CpuBackend()]


@hookimpl
def llmkit_impls() -> list[Impl]:
    return [
        Impl(kind="attention@1", backend="cpu", name="sdpa", forward=attention.sdpa_forward,
             device_types={"cpu"}, dtypes=_FLOATS, features=_ATTENTION, priority=20, prepare=attention.prepare,
             summary="F.scaled_dot_product_attention (is_causal flash kernel, native GQA), chunked masks"),
        Impl(kind="attention@1", backend="cpu", name="flash", forward=attention.flash_forward,
             device_types={"cpu"}, dtypes=_FLOATS, features=_ATTENTION | {"softcap"}, priority=10,
             prepare=attention.prepare,
             summary="chunked online-softmax attention: soft-cap, windows, O(T * chunk) memory"),
        Impl(kind="moe@1", backend="cpu", name="grouped", forward=moe.grouped_forward, prepare=moe.prepare,
             device_types={"cpu"}, dtypes=_FLOATS, features={ANY}, priority=10,
             summary="tokens sorted by expert, one GEMM chain per active expert (GEMVs of this plugin's "
                     "kernel at decode), index_add back"),
        Impl(kind="rope@1", backend="cpu", name="cached", forward=rope.cached_forward,
             device_types={"cpu"}, dtypes=_FLOATS, features={ANY}, priority=10,
             not_supported_reasons=rope.unsupported, prepare=rope.prepare,
             summary="RoPE with frequencies computed once and cos/sin shared by q and k"),
        Impl(kind="norm@1", backend="cpu", name="fused", forward=norm.fused_forward,
             device_types={"cpu"}, dtypes=_FLOATS, features={ANY}, priority=10,
             summary="RMSNorm / LayerNorm statistics in one fused kernel, float32 accumulation"),
        Impl(kind="mlp@1", backend="cpu", name="linear", forward=dense.mlp_forward, prepare=dense.mlp_prepare,
             device_types={"cpu"}, dtypes=_FLOATS, features={ANY}, priority=10,
             summary="gated/ungated MLP; packed int8/int4/w4a8/fp16 linears with quant (gate and up as one)"),
        Impl(kind="head@1", backend="cpu", name="linear", forward=dense.head_forward, prepare=dense.head_prepare,
             device_types={"cpu"}, dtypes=_FLOATS, features={ANY}, priority=10,
             summary="LM head (tied or not, multiplier, soft-cap); packed int8/int4/w4a8/fp16 with quant"),
    ]

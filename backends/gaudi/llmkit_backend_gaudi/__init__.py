"""llmkit's `gaudi` backend plugin: Intel Gaudi HPUs through `habana_frameworks.torch`.

Written against the SynapseAI API, not yet certified on hardware: the impls call FusedSDPA,
FusedRMSNorm, the fused RoPE op and `torch.ops.hpu.mixture_of_experts` (`ops`), the backend
synchronises and times with `mark_step` and HPU events (`backend`), and `capture_decode` wraps
the decode step in an HPU graph (`generate(graphs=True)`, over the fixed-shape cache whose state
is on the device; the growing static cache keeps its length on the host, so a replay over it would
repeat the first step). `habana_frameworks` is not on PyPI; without it the plugin
loads, registers everything (so plans can be made with injected device facts) and reports itself
unavailable with "habana_frameworks not installed".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llmkit.hookspecs import Backend, Impl, Target, hookimpl

from . import capability, ops
from .backend import GaudiBackend

LLMKIT_PLUGIN_API = 1

UNCERTIFIED = "written against the SynapseAI API, not yet certified on hardware"
DTYPES = {"bfloat16", "float32"}
ATTENTION_FEATURES = {"mqa", "gqa", "fused_qkv", "qkv_bias", "o_bias", "clip_qkv", "qk_norm", "sliding_window",
                      "non_causal", "rope"}
MOE_FEATURES = {"gated", "act_silu", "act_relu", "router_softmax", "router_sigmoid", "renormalize_none",
                "renormalize_sum", "correction_bias", "group_limited", "routed_scaling", "jitter", "shared_expert",
                "shared_gate", "load_balance_loss", "z_loss", "seq_balance_loss"}
"""Not declared: ungated experts, expert biases and capacity (the op has no inputs for them), and the
GELU activations (the op's "gelu" mode does not say whether it is erf or tanh GELU)."""


def sdpa_unsupported(config: Any, target: Target) -> Iterator[str]:
    yield from capability.require(target, "gaudi2", "FusedSDPA")


def rms_unsupported(config: Any, target: Target) -> Iterator[str]:
    yield from capability.require(target, "gaudi", "FusedRMSNorm")


def rope_unsupported(config: Any, target: Target) -> Iterator[str]:
    yield from capability.require(target, "gaudi2", "the fused RoPE op")


def moe_unsupported(config: Any, target: Target) -> Iterator[str]:
    yield from capability.moe_op(target)


@hookimpl
def llmkit_backends() -> list[Backend]:
    return [GaudiBackend()]


@hookimpl
def llmkit_impls() -> list[Impl]:
    return [
        Impl(kind="attention@1", backend="gaudi", name="fused_sdpa", forward=ops.fused_sdpa_forward,
             device_types={"hpu"}, dtypes=DTYPES, features=ATTENTION_FEATURES, priority=30,
             not_supported_reasons=sdpa_unsupported,
             summary=f"hpex FusedSDPA (causal or additive mask, native GQA); {UNCERTIFIED}"),
        Impl(kind="norm@1", backend="gaudi", name="fused_rms", forward=ops.fused_rms_forward,
             device_types={"hpu"}, dtypes=DTYPES, features={"rmsnorm", "cast_before_weight", "cast_after_weight",
                                                              "unit_offset"},
             priority=30, not_supported_reasons=rms_unsupported,
             summary=f"hpex FusedRMSNorm in float32; {UNCERTIFIED}"),
        Impl(kind="rope@1", backend="gaudi", name="fused_rope", forward=ops.fused_rope_forward,
             device_types={"hpu"}, dtypes=DTYPES, features={"interleaved", "partial_rotary", "scaling_linear",
                                                              "scaling_dynamic", "scaling_yarn", "scaling_llama3"},
             priority=30, not_supported_reasons=rope_unsupported, prepare=ops.rope_prepare,
             summary=f"hpex apply_rotary_pos_emb, BLOCKWISE or PAIRWISE; {UNCERTIFIED}"),
        Impl(kind="moe@1", backend="gaudi", name="moe_op", forward=ops.moe_op_forward,
             device_types={"hpu"}, dtypes=DTYPES, features=MOE_FEATURES, priority=30,
             not_supported_reasons=moe_unsupported,
             summary=f"reference router + torch.ops.hpu.mixture_of_experts; {UNCERTIFIED}"),
    ]

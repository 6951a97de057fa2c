"""Capability ranges of Intel Gaudi generations, read from the target's device facts.

Facts: `generation` ("gaudi", "gaudi2", "gaudi3"), and `moe_op` (whether this SynapseAI build
registers `torch.ops.hpu.mixture_of_experts`); tests and planners inject them. Ranges are what
this plugin declares, after the Intel Gaudi documentation (docs.habana.ai, "Intel Gaudi PyTorch
Python API": hpex.kernels / hpex.normalization) and the bridge sources (HabanaAI
gaudi-pytorch-bridge): FusedSDPA, the fused RoPE op and the MoE op are used on Gaudi 2 and Gaudi 3;
first-generation Gaudi is declared for FusedRMSNorm only.
"""

from __future__ import annotations

from collections.abc import Iterator

from llmkit.hookspecs import Target

GENERATIONS = ("gaudi", "gaudi2", "gaudi3")
ORDER = {name: i for i, name in enumerate(GENERATIONS)}


def generation(target: Target) -> str | None:
    value = target.fact("generation")
    return None if value is None else str(value).lower()


def require(target: Target, minimum: str, what: str) -> Iterator[str]:
    gen = generation(target)
    if gen is None:
        yield ("the target's device facts name no Gaudi generation (plan on an HPU, or inject facts such as "
               "{'generation': 'gaudi3'})")
    elif gen not in ORDER:
        yield f"Gaudi generation {gen!r} is not one this plugin declares ({', '.join(GENERATIONS)})"
    elif ORDER[gen] < ORDER[minimum]:
        yield f"{what} is declared for {minimum}+ only, the target is {gen}"


def moe_op(target: Target) -> Iterator[str]:
    yield from require(target, "gaudi2", "torch.ops.hpu.mixture_of_experts")
    if generation(target) in ORDER and not target.fact("moe_op", False):
        yield "this SynapseAI build does not register torch.ops.hpu.mixture_of_experts (device fact moe_op)"

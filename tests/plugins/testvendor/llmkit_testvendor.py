"""A vendor plugin as an outside vendor would write it: backend `testvendor` on the CPU device.

Its impls compute the real thing (so outputs can be compared with the reference) and count their
calls, so tests can see which impl actually ran.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from llmkit.hookspecs import Backend, Impl, Range, hookimpl

LLMKIT_PLUGIN_API = 1

CALLS: Counter[str] = Counter()
PREPARED: Counter[str] = Counter()


class TestVendorBackend(Backend):
    name = "testvendor"
    device_type = "cpu"
    summary = "test vendor backend on the host CPU"

    def device_facts(self, device: str) -> dict[str, int]:
        return {"generation": 2}


def rmsnorm(block, x):
    CALLS["rmsnorm"] += 1
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + block.config.eps)
    return h.to(x.dtype) * block.weight


def swiglu(block, x):
    CALLS["swiglu"] += 1
    return F.linear(F.silu(F.linear(x, block.w_gate)) * F.linear(x, block.w_up), block.w_down)


def swiglu_unsupported(config, target) -> Iterator[str]:
    if target.fact("generation", 0) < 2:
        yield f"needs a generation >= 2 device (target has generation {target.fact('generation')})"
    if target.mode == "train" and config.hidden > 4096:
        yield f"training needs hidden <= 4096 (config has {config.hidden})"


def swiglu_prepare(block, target) -> None:
    PREPARED["swiglu"] += 1


@hookimpl
def llmkit_backends():
    return [TestVendorBackend()]


@hookimpl
def llmkit_impls():
    norm_features = {"rmsnorm", "cast_before_weight"}
    return [
        Impl(
            kind="norm@1", backend="testvendor", name="rmsnorm", forward=rmsnorm,
            device_types={"cpu"}, dtypes={"float32", "float64"}, modes={"infer", "train"},
            features=norm_features, constraints={"dim": Range(multiple_of=8, max=8192)},
            priority=10, summary="RMSNorm, float32/float64",
        ),
        Impl(
            kind="norm@1", backend="testvendor", name="rmsnorm_lowp", forward=rmsnorm,
            device_types={"cpu"}, dtypes={"float32", "bfloat16", "float16"}, features=norm_features,
            priority=5, summary="RMSNorm for low-precision storage",
        ),
        Impl(
            kind="mlp@1", backend="testvendor", name="swiglu", forward=swiglu,
            device_types={"cpu"}, dtypes={"float32"}, modes={"infer", "train"},
            features={"gated", "act_silu"}, not_supported_reasons=swiglu_unsupported,
            prepare=swiglu_prepare, priority=10,
        ),
        # A kind this llmkit does not have: skipped with a warning, the rest still registers.
        Impl(
            kind="attention@9", backend="testvendor", name="flash", forward=rmsnorm,
            device_types={"cpu"}, dtypes={"float32"},
        ),
    ]

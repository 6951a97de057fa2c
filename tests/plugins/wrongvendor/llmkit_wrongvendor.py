"""A vendor plugin whose impls are deliberately wrong, for the certification tests.

Each impl makes a mistake vendors make: a sliding window off by one, RoPE angles in bfloat16, a
router that renormalises when it should not, a matmul accumulating in float16, a claimed dtype
that crashes, a capability check that raises. Loaded by the tests with `Registry.load(plugins=...)`.
"""

from __future__ import annotations

from typing import Any

import torch
from llmkit_blocks import attention, moe, norm, positional

from llmkit.hookspecs import Backend, Impl, hookimpl

LLMKIT_PLUGIN_API = 1


class WrongBackend(Backend):
    name = "wrong"
    device_type = "cpu"
    summary = "deliberately wrong impls (tests)"


class _Config:
    """The block as the reference sees it, with some config fields replaced."""

    def __init__(self, block: Any, **update: Any) -> None:
        self._block, self.config = block, block.config.model_copy(update=update)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._block, name)


def window_off_by_one(block: Any, x: torch.Tensor, positions: torch.Tensor, cache: Any = None) -> torch.Tensor:
    w = block.config.window
    return attention.attention(_Config(block, window=None if w is None else w + 1), x, positions, cache)


def rope_bf16_angles(block: Any, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    c = block.config
    w = positional.inv_freq(c).to(torch.bfloat16)
    angles = positions.to(torch.bfloat16)[:, None, :, None] * w
    return positional.rotate(c, x, angles.cos().to(x.dtype), angles.sin().to(x.dtype))


def always_renormalise(block: Any, x: torch.Tensor) -> torch.Tensor:
    proxy = _Config(block, renormalize="sum")
    out = moe.moe(proxy, x)
    block.routing = proxy.routing
    return out


def _fp16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(*x.shape[:-1], w.shape[0], dtype=torch.float16)
    for k in range(x.shape[-1]):
        acc = acc + x[..., k:k + 1] * w[:, k]
    return acc


def mlp_fp16_accumulate(block: Any, x: torch.Tensor) -> torch.Tensor:
    c = block.config
    act = {"silu": torch.nn.functional.silu, "relu": torch.relu}[c.activation]
    h = act(_fp16_linear(x, block.w_gate)) * _fp16_linear(x, block.w_up)
    return _fp16_linear(h, block.w_down)


def norm_crashes_on_bf16(block: Any, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bfloat16:
        raise RuntimeError("kernel not compiled for bfloat16")
    return norm.norm(block, x)


def raising_check(config: Any, target: Any) -> list[str]:
    raise KeyError("compute_capability")


F32 = frozenset({torch.float32})


@hookimpl
def llmkit_backends() -> list[Backend]:
    return [WrongBackend()]


@hookimpl
def llmkit_impls() -> list[Impl]:
    return [
        Impl(kind="attention@1", backend="wrong", name="window_plus_one", forward=window_off_by_one,
             device_types=frozenset({"cpu"}), dtypes=F32, features=frozenset({"*"})),
        Impl(kind="rope@1", backend="wrong", name="bf16_angles", forward=rope_bf16_angles,
             device_types=frozenset({"cpu"}), dtypes=F32, features=frozenset({"*"})),
        Impl(kind="moe@1", backend="wrong", name="renormalise", forward=always_renormalise,
             device_types=frozenset({"cpu"}), dtypes=F32, features=frozenset({"*"})),
        Impl(kind="mlp@1", backend="wrong", name="fp16_accumulate", forward=mlp_fp16_accumulate,
             device_types=frozenset({"cpu"}), dtypes=frozenset({torch.float16}), features=frozenset({"*"}),
             not_supported_reasons=lambda c, t: [] if c.gated and c.activation in ("silu", "relu") and not c.bias
             else ["gated silu/relu without bias only"]),
        Impl(kind="norm@1", backend="wrong", name="crashes_on_bf16", forward=norm_crashes_on_bf16,
             device_types=frozenset({"cpu"}), dtypes=frozenset({torch.float32, torch.bfloat16}),
             features=frozenset({"*"})),
        Impl(kind="norm@1", backend="wrong", name="raising_check", forward=norm.norm,
             device_types=frozenset({"cpu"}), dtypes=F32, features=frozenset({"*"}),
             not_supported_reasons=raising_check),
    ]

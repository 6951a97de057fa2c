"""Feed-forward blocks, kind `mlp@1`: gated (SwiGLU, GeGLU) and ungated (GELU, ReLU) MLPs.

gated:   y = W_down (act(W_gate x + b_gate) * (W_up x + b_up)) + b_down
ungated: y = W_down act(W_up x + b_up) + b_down

Matches transformers' LlamaMLP (gated, silu), GemmaMLP (gated, gelu_tanh), Grok-1's experts
(GeGLU with tanh GELU) and GPT-2-style MLPs (ungated). Weights are stored [out, in] like
nn.Linear; biases only when `bias: true`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, PositiveInt

from llmkit.hookspecs import BlockKind, Cost, ParamSpec

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]


class MLPConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["mlp"] = "mlp"
    """Tag that tells a dense MLP from a MoE (`type: moe`) in a layer's `mlp` slot."""
    d_model: PositiveInt
    hidden: PositiveInt
    gated: bool = True
    activation: Activation = "silu"
    """silu (SwiGLU); gelu = erf GELU; gelu_tanh = tanh-approximated GELU (Gemma, Grok-1); relu."""
    bias: bool = False


def params(c: MLPConfig) -> dict[str, ParamSpec]:
    out = {}
    if c.gated:
        out["w_gate"] = ParamSpec((c.hidden, c.d_model))
    out["w_up"] = ParamSpec((c.hidden, c.d_model))
    out["w_down"] = ParamSpec((c.d_model, c.hidden))
    if c.bias:
        if c.gated:
            out["b_gate"] = ParamSpec((c.hidden,), init="zeros")
        out["b_up"] = ParamSpec((c.hidden,), init="zeros")
        out["b_down"] = ParamSpec((c.d_model,), init="zeros")
    return out


def features(c: MLPConfig) -> set[str]:
    out = {"gated" if c.gated else "ungated", f"act_{c.activation}"}
    if c.bias:
        out.add("bias")
    return out


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


def feed_forward(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation_name: str,
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The formula of the module docstring; gated when `w_gate` is given (shared with moe@1's experts)."""
    up = F.linear(x, w_up, b_up)
    if w_gate is not None:
        h = activation(activation_name, F.linear(x, w_gate, b_gate)) * up
    else:
        h = activation(activation_name, up)
    return F.linear(h, w_down, b_down)


def mlp(block: Any, x: torch.Tensor) -> torch.Tensor:
    """Apply the (gated) MLP to the last dimension of `x`."""
    c: MLPConfig = block.config
    bias = c.bias
    return feed_forward(
        x, block.w_up, block.w_down, c.activation,
        w_gate=block.w_gate if c.gated else None,
        b_up=block.b_up if bias else None,
        b_down=block.b_down if bias else None,
        b_gate=block.b_gate if bias and c.gated else None,
    )


def cost(c: MLPConfig, context: int) -> Cost:
    """(2 or 3) * d_model * hidden weights (+ biases); 2 FLOPs per weight."""
    matmul = (3 if c.gated else 2) * c.d_model * c.hidden
    bias = (2 * c.hidden if c.gated else c.hidden) + c.d_model if c.bias else 0
    return Cost(params=matmul + bias, flops=2 * matmul)

KIND = BlockKind(
    name="mlp",
    version=1,
    config=MLPConfig,
    params=params,
    reference=mlp,
    features=features,
    cost=cost,
    summary="gated (SwiGLU/GeGLU) or ungated (GELU/ReLU) feed-forward",
)

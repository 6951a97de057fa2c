"""Small models built only from registry blocks, for tests and benchmarks of the core machinery."""

from __future__ import annotations

import torch
from torch import nn

from .assembly import Block
from .registry import Registry


class _MLPLayer(nn.Module):
    def __init__(self, norm: Block, mlp: Block) -> None:
        super().__init__()
        self.norm = norm
        self.mlp = mlp


class ResidualMLPLM(nn.Module):
    """Token embedding, `n_layers` pre-norm residual MLP layers, final norm, LM head.

    h = E[ids]; for each layer: h = h + mlp(norm(h)); logits = head(norm(h)).
    No attention: the smallest language model made only of `embedding@1`, `norm@1`, `mlp@1` and
    `head@1` blocks. It exercises resolution, binding and the dispatch path, not model quality.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        vocab_size: int = 256,
        d_model: int = 64,
        hidden: int = 128,
        n_layers: int = 2,
        tied: bool = False,
        activation: str = "silu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype, "generator": generator}
        kind = registry.kind
        self.tied = tied
        self.embedding = Block(kind("embedding"), {"vocab_size": vocab_size, "d_model": d_model}, **kw)
        self.layers = nn.ModuleList(
            _MLPLayer(
                Block(kind("norm"), {"dim": d_model}, **kw),
                Block(kind("mlp"), {"d_model": d_model, "hidden": hidden, "activation": activation}, **kw),
            )
            for _ in range(n_layers)
        )
        self.norm = Block(kind("norm"), {"dim": d_model}, **kw)
        self.head = Block(kind("head"), {"d_model": d_model, "vocab_size": vocab_size, "tied": tied}, **kw)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids)
        for layer in self.layers:
            h = h + layer.mlp(layer.norm(h))
        h = self.norm(h)
        return self.head(h, self.embedding.weight) if self.tied else self.head(h)

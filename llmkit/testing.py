"""Small models built only from registry blocks, for tests and benchmarks of the core machinery."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .assembly import Block
from .registry import Registry, reference_impl
from .target import Target


def bind_reference(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Bind every Block in `module` to its kind's reference impl, without a registry.

    For testing block semantics directly; models for use go through `assemble`.
    """
    for m in module.modules():
        if isinstance(m, Block):
            p = next(m.parameters(), None)
            dt = dtype or (p.dtype if p is not None else torch.get_default_dtype())
            m.bind(reference_impl(m.kind), Target(backend="cpu", device="cpu", dtype=dt))
    return module


def randomize(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Give every Block test weights under which each quirk of a config is visible.

    Default init (std 0.02) makes attention nearly uniform and hides soft-caps, scalings and clamps
    (DESIGN.md, "Testing against outside oracles"): weights and biases get std 0.1 here, and norm
    weights 1 + 0.2 N(0, 1) (0.2 N(0, 1) when the norm scales by 1 + w).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, Block):
                continue
            for name, p in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
                if m.kind.name == "norm" and name == "weight":
                    value = 0.2 * noise + (0.0 if m.config.unit_offset else 1.0)
                else:
                    value = std * noise
                p.copy_(value)
    return module


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


def hf_checkpoint(path: Path, make: Callable[[], nn.Module], seed: int = 0) -> Path:
    """Save a transformers model (`make()`, seeded) to `path` with test weights: norm weights
    1 + 0.2 N(0, 1), everything else 0.1 N(0, 1), so that greedy picks are not near-ties."""
    torch.manual_seed(seed)
    model = make()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path

"""Forward time of a model built through the registry vs the same model written by hand.

The registry-built model (`llmkit.testing.ResidualMLPLM`: Blocks resolved and bound by `assemble`)
and a hand-written twin (plain nn.Modules whose forward calls the same reference functions
directly, same parameter tensors) are timed alternately in the same process. The ratio
registry/hand is the cost of going through llmkit's dispatch on the forward path; the target is
<= 1.02 (median over rounds). Shapes range from overhead-dominated (one token through a tiny
model, where any per-call cost would show most) to compute-dominated.

    .venv/bin/python benchmarks/dispatch_overhead.py [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from llmkit import Registry, Selection, assemble
from llmkit_blocks import embedding, mlp, norm
from llmkit.testing import ResidualMLPLM

CASES = [
    # name, model sizes, (batch, tokens)
    ("tiny-decode", {"vocab_size": 256, "d_model": 64, "hidden": 128, "n_layers": 4}, (1, 1)),
    ("small-decode", {"vocab_size": 4096, "d_model": 512, "hidden": 1408, "n_layers": 8}, (1, 1)),
    ("small-prefill", {"vocab_size": 4096, "d_model": 512, "hidden": 1408, "n_layers": 8}, (1, 128)),
]


class _Hand(nn.Module):
    """A plain module holding the same config and parameters as a Block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.config = block.config
        for name, p in block.named_parameters(recurse=False):
            self.register_parameter(name, p)


class HandEmbedding(_Hand):
    def forward(self, ids):
        return embedding.embedding(self, ids)


class HandNorm(_Hand):
    def forward(self, x):
        return norm.norm(self, x)


class HandMLP(_Hand):
    def forward(self, x):
        return mlp.mlp(self, x)


class HandHead(_Hand):
    def forward(self, x):
        return embedding.head(self, x)


class HandLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.norm = HandNorm(layer.norm)
        self.mlp = HandMLP(layer.mlp)


class HandLM(nn.Module):
    """ResidualMLPLM written by hand: same module structure and forward, same parameter tensors;
    only the blocks differ (hand-written modules instead of registry-bound Blocks)."""

    def __init__(self, m: ResidualMLPLM) -> None:
        super().__init__()
        self.tied = m.tied
        self.embedding = HandEmbedding(m.embedding)
        self.layers = nn.ModuleList(HandLayer(layer) for layer in m.layers)
        self.norm = HandNorm(m.norm)
        self.head = HandHead(m.head)

    forward = ResidualMLPLM.forward


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def run(rounds: int) -> dict:
    registry = Registry.load(allow=["blocks", "cpu"])
    backend = registry.backend("cpu")
    results = []
    for name, sizes, (batch, tokens) in CASES:
        model = ResidualMLPLM(registry, generator=torch.Generator().manual_seed(0), **sizes).eval()
        assemble(model, registry.target("cpu"), Selection(policy="reference"), registry=registry)
        hand = HandLM(model).eval()
        ids = torch.randint(0, sizes["vocab_size"], (batch, tokens))
        with torch.inference_mode():
            torch.testing.assert_close(model(ids), hand(ids), rtol=0, atol=0)
            # calibrate the calls per measurement to ~50 ms
            per_call = backend.time(lambda: model(ids), "cpu", warmup=5, repeat=5).median
            calls = max(1, int(0.05 / per_call))
            reg_t, hand_t, ratios = [], [], []
            for r in range(rounds):
                # alternate which goes first, so drift does not favour one side
                pair = [("reg", model), ("hand", hand)] if r % 2 == 0 else [("hand", hand), ("reg", model)]
                t = {k: _time(lambda m=m: m(ids), calls) for k, m in pair}
                reg_t.append(t["reg"])
                hand_t.append(t["hand"])
                ratios.append(t["reg"] / t["hand"])
        results.append({
            "case": name, **sizes, "batch": batch, "tokens": tokens, "calls_per_round": calls,
            "rounds": rounds, "registry_median_s": statistics.median(reg_t),
            "hand_median_s": statistics.median(hand_t), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
        })
    return {
        "benchmark": "dispatch_overhead",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": registry.backend("cpu").device_facts("cpu"),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "target_ratio": 1.02,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    report = run(args.rounds)
    print(f"{'case':14} {'registry':>12} {'hand':>12} {'ratio (median, min-max)':>26}")
    for r in report["results"]:
        print(f"{r['case']:14} {r['registry_median_s'] * 1e6:10.1f}us {r['hand_median_s'] * 1e6:10.1f}us "
              f"{r['ratio_median']:10.4f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})")
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()

"""How far `moe_decode` stays the faster path: the whole MoE layer as one kernel call against the
grouped path, by token count.

The Mixtral-proportioned layer of `moe_layer.py` (d_model 1024, expert hidden 3584, 8 experts,
top-2), float32 and bfloat16. For each token count it times `cpu.grouped`'s two paths on the same
block and tokens: `_decode` (one `llmkit_cpu::moe_decode` call: routing, experts, weighted sum) and
`_grouped` (the catalogue's routing, then the GEMV kernel or `moe_experts` per expert). Both
without the routing record every call keeps, which is the same for both. Interleaved turns with
cold caches (`moe_layer._interleaved_s`): medians, and the median of the per-turn ratios
(grouped / decode; > 1: moe_decode faster). The record backs `cpu.grouped`'s DECODE_MAX_TOKENS.

    .venv/bin/python benchmarks/moe_decode_range.py [--tokens 4,8,...] [--repeat 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from llmkit import Block
from llmkit.atomic import write_json_atomic
from llmkit.registry import default_registry
from llmkit.testing import bind_reference
from llmkit_backend_cpu import moe as cpu_moe

from moe_layer import D, EXPERTS, HIDDEN, TOP_K, _interleaved_s, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4,8,16,32,64,128,256,512")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_decode_range.json")
    args = parser.parse_args()

    reg = default_registry()
    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        block = Block(reg.kind("moe"), {"d_model": D, "n_experts": EXPERTS, "top_k": TOP_K, "hidden": HIDDEN},
                      dtype=dtype)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.02)
        bind_reference(block)
        block.bind(reg.impl("moe@1", "cpu.grouped"), reg.target("cpu", dtype=dtype))
        for n in [int(t) for t in args.tokens.split(",")]:
            h = torch.randn(n, D).to(dtype)
            with torch.inference_mode():
                decoded = cpu_moe._decode(block, h, None)
                if decoded[6][0]:  # an exact tie decided moe_decode's routing: it would not serve this call
                    raise SystemExit(f"{n} tokens: moe_decode met an exact routing tie; use other tokens")
                counts = decoded[5]
                times = _interleaved_s({"moe_decode": lambda: cpu_moe._decode(block, h, None),
                                        "grouped": lambda: cpu_moe._grouped(block, h, None, True)}, args.repeat)
            row = {"dtype": str(dtype).removeprefix("torch."), "tokens": n,
                   "active_experts": int((counts > 0).sum()), "most_tokens_per_expert": int(counts.max()),
                   **{f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()},
                   "grouped_over_moe_decode": statistics.median(g / d for g, d in zip(times["grouped"],
                                                                                       times["moe_decode"])),
                   "limit_here": cpu_moe.decode_max_tokens(dtype)}
            rows.append(row)
            print(f"{row['dtype']:8} {n:4} tokens (at most {row['most_tokens_per_expert']} per expert): "
                  f"moe_decode {row['moe_decode_ms']:7.2f} ms, grouped {row['grouped_ms']:7.2f} ms, "
                  f"{row['grouped_over_moe_decode']:.2f}x", flush=True)
    record = {"benchmark": "moe_decode_range",
              "shape": {"d_model": D, "hidden": HIDDEN, "experts": EXPERTS, "top_k": TOP_K},
              "machine": machine(), "rows": rows}
    write_json_atomic(args.out, record)


if __name__ == "__main__":
    main()

"""A Mixtral-proportioned MoE layer on the CPU backend against transformers, with the roofline.

d_model 1024, expert hidden 3584, 8 experts, top-2 (Mixtral 8x7B scaled down), at 1, 4 and 512
tokens, float32 and bfloat16; the same weights in llmkit's `cpu.grouped`, the reference impl, and
transformers' `MixtralSparseMoeBlock` (its default experts implementation), measured in the same
run. Roofline: at 1-4 tokens the layer is bandwidth-bound — it must read the active experts'
weights (3 * d * hidden each) and the router once; at 512 tokens it is FLOP-bound —
2 * tokens * top_k * 3 * d * hidden FLOPs. The peaks are measured in the same turns as the engines,
since a shared VM's speed moves within a session (large copies on the AVX-512 EPYC: 46 to 82 GB/s
within an hour): the bandwidth roofline is the time to read exactly those weights (a sum over
each active expert's matrices and the router, their bytes read as float32), the FLOP roofline the
FLOPs at the rate of a 1024^3 `torch.mm` (`llmkit.peaks`). That GEMM runs in the layer's dtype,
or in float32 where PyTorch's GEMM in the 16-bit dtype is slower (a CPU without bf16
instructions, such as an AVX2 one, multiplies bf16 weights fastest by widening them to float32,
as cpu.grouped's GEMV kernel does). The engines and the two peak measurements take turns,
`--repeat` times after warm-up (the order reversed every turn), each call with cold caches:
medians of each one's times, and the medians of the per-turn ratios to transformers and to the
roofline (a turn's roofline from that turn's peaks: the memory's speed moved within seconds here,
45 to 70 GB/s between two consecutive rows, and a ratio within a turn cancels it).

    .venv/bin/python benchmarks/moe_layer.py [--repeat 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmkit import peaks
from llmkit.atomic import write_json_atomic
from llmkit.bench import cpu_model

D, HIDDEN, EXPERTS, TOP_K = 1024, 3584, 8, 2


def _interleaved_s(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Seconds of `repeat` calls of each fn after two warm-up calls, the fns taking turns (the
    order reversed every repetition), so that a drift of the machine's speed reaches all alike.
    Each timed call starts with cold caches (a 256 MiB buffer read first), as a layer's weights
    do in a model, whose other layers run in between: without it, part of a bfloat16 expert pair
    (44 MB) stayed in the 32 MiB L3 from the call before, read at 148 against 72 GB/s."""
    flush = torch.ones(peaks.COPY_BYTES // 4)
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeat):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            flush.sum()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def machine() -> dict[str, object]:
    """The machine a record was measured on (this file's records and moe_decode_range.py's)."""
    return {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose GEMM gives `dtype`'s compute peak (module docstring)."""
    if dtype == torch.float32 or peaks.torch_gemm_flops(dtype) >= peaks.torch_gemm_flops(torch.float32):
        return dtype
    return torch.float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--tokens", default="1,4,512")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_layer.json")
    args = parser.parse_args()

    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from llmkit import Block
    from llmkit.registry import default_registry
    from llmkit.testing import bind_reference

    reg = default_registry()
    torch.manual_seed(0)
    hf32 = MixtralSparseMoeBlock(MixtralConfig(hidden_size=D, intermediate_size=HIDDEN, num_local_experts=EXPERTS,
                                               num_experts_per_tok=TOP_K)).eval()
    with torch.no_grad():
        for p in hf32.parameters():
            p.normal_(0, 0.02)
    params = dict(hf32.named_parameters())
    gate_up = params["experts.gate_up_proj"]  # [E, 2 * hidden, d]: gate rows first, then up
    state = {"router": params["gate.weight"], "w_gate": gate_up[:, :HIDDEN], "w_up": gate_up[:, HIDDEN:],
             "w_down": params["experts.down_proj"]}
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        hf = hf32.to(dtype)
        blocks = {}
        for impl in ("cpu.grouped", "reference.eager"):
            block = Block(reg.kind("moe"), {"d_model": D, "n_experts": EXPERTS, "top_k": TOP_K, "hidden": HIDDEN},
                          dtype=dtype)
            block.load_state_dict({k: v.detach().to(dtype) for k, v in state.items()})
            bind_reference(block)
            block.bind(reg.impl("moe@1", impl), reg.target("cpu", dtype=dtype))
            blocks[impl] = block
        ours = blocks["cpu.grouped"]
        gemm_dtype = _gemm_dtype(dtype)
        a, b = (torch.randn(peaks.GEMM_N, peaks.GEMM_N).to(gemm_dtype) for _ in range(2))
        for n in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(1, n, D).to(dtype)
            with torch.inference_mode():
                ours(x)
                experts = (ours.routing.tokens_per_expert > 0).nonzero().flatten().tolist()
                weights = [ours.router] + [getattr(ours, w)[e] for e in experts for w in ("w_gate", "w_up", "w_down")]
                times = _interleaved_s({"llmkit_cpu_grouped": lambda: ours(x),
                                        "llmkit_reference": lambda: blocks["reference.eager"](x),
                                        "transformers": lambda: hf(x),
                                        "read": lambda: [w.view(torch.float32).sum() for w in weights],
                                        "gemm": lambda: torch.mm(a, b)}, args.repeat)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            flops = 2 * n * TOP_K * 3 * D * HIDDEN
            flops_per_s = 2 * peaks.GEMM_N**3 / (ms["gemm"] / 1e3)
            read_bytes = sum(w.numel() * w.element_size() for w in weights)
            bandwidth_ms, flops_ms = ms["read"], 1e3 * flops / flops_per_s
            turn_roofline = [max(r, flops / (2 * peaks.GEMM_N**3) * g)
                             for r, g in zip(times["read"], times["gemm"])]
            row = {"dtype": str(dtype).removeprefix("torch."), "tokens": n, "active_experts": len(experts),
                   **{f"{name}_ms": ms[name] for name in ("llmkit_cpu_grouped", "llmkit_reference", "transformers")},
                   "roofline_ms": max(bandwidth_ms, flops_ms),
                   "bound": "bandwidth" if bandwidth_ms > flops_ms else "flops",
                   "fraction_of_roofline": statistics.median(r / o for r, o in zip(turn_roofline,
                                                                                   times["llmkit_cpu_grouped"])),
                   "vs_transformers": statistics.median(t / o for t, o in zip(times["transformers"],
                                                                              times["llmkit_cpu_grouped"])),
                   "peaks": {"read_bytes": read_bytes, "read_ms": ms["read"],
                             "read_bytes_per_s": 1e3 * read_bytes / ms["read"],
                             "gemm_dtype": str(gemm_dtype).removeprefix("torch."), "flops_per_s": flops_per_s}}
            rows.append(row)
            print(f"{row['dtype']:8} {n:4} tok: cpu.grouped {row['llmkit_cpu_grouped_ms']:8.2f} ms, "
                  f"reference {row['llmkit_reference_ms']:8.2f} ms, transformers {row['transformers_ms']:8.2f} ms, "
                  f"roofline {row['roofline_ms']:7.2f} ms ({row['bound']}), "
                  f"{100 * row['fraction_of_roofline']:.0f}% of roofline, {row['vs_transformers']:.2f}x transformers")
    record = {"benchmark": "moe_layer", "shape": {"d_model": D, "hidden": HIDDEN, "experts": EXPERTS, "top_k": TOP_K},
              "machine": machine(), "rows": rows}
    write_json_atomic(args.out, record)


if __name__ == "__main__":
    main()

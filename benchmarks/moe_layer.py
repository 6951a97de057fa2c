"""A Mixtral-proportioned MoE layer on the CPU backend against transformers, with the roofline.

d_model 1024, expert hidden 3584, 8 experts, top-2 (Mixtral 8x7B scaled down), at 1, 4 and 512
tokens, float32 and bfloat16; the same weights in llmkit's `cpu.grouped`, the reference impl, and
transformers' `MixtralSparseMoeBlock` (its default experts implementation), measured in the same
run. Roofline: at 1-4 tokens the layer is bandwidth-bound — it must read the active experts'
weights (3 * d * hidden each) and the router once; at 512 tokens it is FLOP-bound —
2 * tokens * top_k * 3 * d * hidden FLOPs. Peaks are this machine's, measured by the CPU
backend's calibration (best torch.mm and large copy) and, for the bandwidth, also as the best of
large reads (`peaks.host_read_bandwidth`) just before each row, as the VM's memory bandwidth moves
within a session (46 to 82 GB/s for copies on the AVX-512 EPYC): the roofline takes the higher of
the two, since the layer's decode reads its weights and writes almost nothing. The compute peak
of a 16-bit dtype is float32's where PyTorch's GEMM in that dtype is slower (a CPU without bf16
instructions, such as an AVX2 one, multiplies bf16 weights fastest by widening them to float32,
as cpu.grouped's GEMV kernel does). Median of `--repeat` runs after warm-up.

    .venv/bin/python benchmarks/moe_layer.py [--repeat 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from llmkit import peaks
from llmkit.atomic import write_json_atomic
from llmkit.bench import cpu_model

D, HIDDEN, EXPERTS, TOP_K = 1024, 3584, 8, 2


def _median_s(fn, repeat: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--tokens", default="1,4,512")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_layer.json")
    args = parser.parse_args()

    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from llmkit import Block
    from llmkit.registry import default_registry
    from llmkit.testing import bind_reference
    from llmkit_backend_cpu.backend import CpuBackend

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
    backend = CpuBackend()
    peak32 = backend.peak("cpu", torch.float32)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        hf = hf32.to(dtype)
        peak = backend.peak("cpu", dtype)
        flops_per_s, peak_source = peak.flops_per_s, peak.source
        if peak32.flops_per_s > flops_per_s:
            flops_per_s = peak32.flops_per_s
            peak_source = (f"{peak32.source}; float32's FLOP/s, as PyTorch's {str(dtype).removeprefix('torch.')} "
                           f"GEMM is slower here ({peak.flops_per_s / 1e9:.1f} GFLOP/s)")
        blocks = {}
        for impl in ("cpu.grouped", "reference.eager"):
            block = Block(reg.kind("moe"), {"d_model": D, "n_experts": EXPERTS, "top_k": TOP_K, "hidden": HIDDEN},
                          dtype=dtype)
            block.load_state_dict({k: v.detach().to(dtype) for k, v in state.items()})
            bind_reference(block)
            block.bind(reg.impl("moe@1", impl), reg.target("cpu", dtype=dtype))
            blocks[impl] = block
        for n in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(1, n, D).to(dtype)
            read_bytes_per_s = peaks.host_read_bandwidth()
            bytes_per_s = max(peak.bytes_per_s, read_bytes_per_s)
            with torch.inference_mode():
                ours = blocks["cpu.grouped"]
                ours(x)
                active = int((ours.routing.tokens_per_expert > 0).sum())
                row = {"dtype": str(dtype).removeprefix("torch."), "tokens": n, "active_experts": active}
                for name, fn in (("llmkit_cpu_grouped", lambda: ours(x)),
                                 ("llmkit_reference", lambda: blocks["reference.eager"](x)),
                                 ("transformers", lambda: hf(x))):
                    row[name + "_ms"] = 1e3 * _median_s(fn, args.repeat)
            weight_bytes = (active * 3 * D * HIDDEN + EXPERTS * D) * x.element_size()
            flops = 2 * n * TOP_K * 3 * D * HIDDEN
            roofline_s = max(weight_bytes / bytes_per_s, flops / flops_per_s)
            row |= {"roofline_ms": 1e3 * roofline_s,
                    "bound": "bandwidth" if weight_bytes / bytes_per_s > flops / flops_per_s else "flops",
                    "copy_bytes_per_s": peak.bytes_per_s, "read_bytes_per_s": read_bytes_per_s,
                    "fraction_of_roofline": 1e3 * roofline_s / row["llmkit_cpu_grouped_ms"],
                    "vs_transformers": row["transformers_ms"] / row["llmkit_cpu_grouped_ms"],
                    "peak_source": peak_source}
            rows.append(row)
            print(f"{row['dtype']:8} {n:4} tok: cpu.grouped {row['llmkit_cpu_grouped_ms']:8.2f} ms, "
                  f"reference {row['llmkit_reference_ms']:8.2f} ms, transformers {row['transformers_ms']:8.2f} ms, "
                  f"roofline {row['roofline_ms']:7.2f} ms ({row['bound']}), "
                  f"{100 * row['fraction_of_roofline']:.0f}% of roofline, {row['vs_transformers']:.2f}x transformers")
    record = {"benchmark": "moe_layer", "shape": {"d_model": D, "hidden": HIDDEN, "experts": EXPERTS, "top_k": TOP_K},
              "machine": {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(),
                          "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                          "python": platform.python_version(), "torch": torch.__version__}, "rows": rows}
    write_json_atomic(args.out, record)


if __name__ == "__main__":
    main()

"""SmolLM2-135M prefill against the float32 GEMM floor: how fast can any engine on PyTorch's GEMMs be?

One process holds llmkit (`llmkit.load(smollm2-135m, dtype)`), transformers (the same GGUF
through its own loader, in the same dtype unless --baseline-dtype names another: the issue's
baseline is transformers in float32) and, when installed, llama.cpp (the GGUF's own Q4_1). In
alternating rounds it times each engine's prefill of the same PROMPT_LEN tokens (the logits of
the last position only, as a generate does) and, in the same rounds, the **GEMM floor**: the
model's linears alone, `F.linear` of a [PROMPT_LEN, in] input by each of the 210 layer matrices
(q, k, v, o, gate, up, down of 30 layers), which an engine computing in this dtype on PyTorch's
GEMMs has to run whatever else it does. Also measured: the GEMM peak (best of 5 1024^3
`torch.mm`, `llmkit.peaks`). FLOPs are counted from the model: 2 T x (layer matrix elements) for
the linears, 4 T(T+1)/2 x head_dim x heads a layer for causal attention (QK^T and PV, the masked
half not counted), 2 x d_model x vocab for the last position's logits.

Reported per engine: prefill ms and tok/s (medians over rounds), achieved GFLOP/s, fraction of
the GEMM peak, ratio against the floor; what 2x transformers would take against the floor; and
transformers' time over llmkit's per round (median, min, max).

    .venv/bin/python benchmarks/prefill_roofline.py [--dtype float32] [--baseline-dtype D]
        [--prompt-len 512] [--rounds 8] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import llmkit
from llmkit import peaks
from llmkit.atomic import write_json_atomic
from llmkit.bench import cpu_model, llamacpp_greedy, llmkit_greedy, transformers_greedy, transformers_model

from interleaved_decode import TEXT
from model_bench import SOURCE

LAYER_MATRICES = (("attention", ("wq", "wk", "wv", "wo")), ("mlp", ("w_gate", "w_up", "w_down")))


def layer_matrices(model: llmkit.Model) -> list[torch.Tensor]:
    """Every layer's linear weights [out, in], in the order a layer runs them."""
    return [getattr(getattr(layer, block), name).detach()
            for layer in model.layers for block, names in LAYER_MATRICES for name in names]


def prefill_flops(model: llmkit.Model, matrices: list[torch.Tensor], t: int) -> dict[str, float]:
    spec = model.spec
    attention = sum(4 * t * (t + 1) / 2 * layer.attention.head_dim * layer.attention.n_heads for layer in spec.layers)
    return {"linears": 2 * t * sum(w.numel() for w in matrices), "attention": attention,
            "head": 2 * spec.d_model * spec.vocab_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--baseline-dtype", help="transformers' dtype (default: --dtype)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefill_roofline.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    model = llmkit.load(SOURCE, dtype=args.dtype)
    ids = (model.tokenizer.encode(TEXT) * (args.prompt_len // 8 + 1))[:args.prompt_len]
    matrices = layer_matrices(model)
    x = {k: torch.randn(args.prompt_len, k, generator=torch.Generator().manual_seed(k)).to(dtype)
         for k in {w.shape[1] for w in matrices}}

    def gemm_floor() -> float:
        start = time.perf_counter()
        for w in matrices:
            F.linear(x[w.shape[1]], w)
        return time.perf_counter() - start

    baseline_dtype = args.baseline_dtype or args.dtype
    hf = transformers_model(model.source, getattr(torch, baseline_dtype))
    engines = {"gemm floor": gemm_floor,
               "llmkit": lambda: llmkit_greedy(model, ids, 1)[0],
               "transformers": lambda: transformers_greedy(hf, ids, 1)[0]}
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        print(f"llama.cpp skipped: {exc}")
    else:
        llm = Llama(model_path=model.source, n_ctx=args.prompt_len + 1, n_batch=args.prompt_len,
                    n_threads=args.threads, n_threads_batch=args.threads, logits_all=False, verbose=False)
        engines["llamacpp"] = lambda: llamacpp_greedy(llm, ids, 1)[0]
    for run in engines.values():
        run()
    peak = peaks.torch_gemm_flops(dtype)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name in (list(engines) if r % 2 == 0 else list(reversed(engines))):
            times[name].append(engines[name]())
        print(f"round {r}: " + ", ".join(f"{n} {1e3 * v[-1]:.0f} ms" for n, v in times.items()), flush=True)

    flops = prefill_flops(model, matrices, args.prompt_len)
    total = sum(flops.values())
    floor = statistics.median(times["gemm floor"])
    figures = {}
    for name, samples in times.items():
        s = statistics.median(samples)
        work = flops["linears"] if name == "gemm floor" else total
        figures[name] = {"ms": round(1e3 * s, 1), "tok_s": round(args.prompt_len / s, 1),
                         "gflop_s": round(work / s / 1e9, 1), "of_peak": round(work / s / peak, 3),
                         "vs_floor": round(s / floor, 3), "runs_ms": [round(1e3 * v, 1) for v in samples]}
    target = statistics.median(times["transformers"]) / 2
    per_round = [t / o for t, o in zip(times["transformers"], times["llmkit"])]
    record = {
        "benchmark": "prefill_roofline", "source": SOURCE, "path": model.source,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
                    "torch": torch.__version__},
        "workload": {"dtype": args.dtype, "transformers_dtype": baseline_dtype, "prompt_len": args.prompt_len,
                     "rounds": args.rounds,
                     "llamacpp": "the GGUF's own Q4_1 weights"},
        "flops": flops, "gemm_peak_gflop_s": round(peak / 1e9, 1), "peak_source": peaks.describe("torch.mm", dtype),
        "engines": figures,
        "two_x_transformers": {"ms": round(1e3 * target, 1), "vs_floor": round(target / floor, 3),
                               "gflop_s_needed": round(total / target / 1e9, 1)},
        "llmkit_vs_transformers": {"median": round(statistics.median(per_round), 3),
                                   "min": round(min(per_round), 3), "max": round(max(per_round), 3)},
    }
    for name, f in figures.items():
        print(f"{name:>12}: {f['ms']:7.1f} ms  {f['tok_s']:7.1f} tok/s  {f['gflop_s']:6.1f} GFLOP/s "
              f"({100 * f['of_peak']:.0f}% of the {record['gemm_peak_gflop_s']} GFLOP/s GEMM peak)  "
              f"{f['vs_floor']:.2f}x the floor")
    print(f"2x transformers: {record['two_x_transformers']}; llmkit / transformers per round: "
          f"{record['llmkit_vs_transformers']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

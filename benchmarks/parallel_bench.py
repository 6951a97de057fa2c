"""Multi-process runs against one process (`llmkit bench --nproc N`): tokens/s, and per block the
time spent computing and inside collectives, on this machine.

Workloads (each `bench` call measures the single-process run and the sharded one in the same run):
- `moe-ep2`, `moe-tp2xep2`: a 2-layer Mixtral-proportioned model with random weights (d_model 1024,
  16 heads / 8 KV heads, 8 experts of hidden 3584, top-2, vocab 8192: the MoE layer of
  benchmarks/moe_layer.py), written as a transformers checkpoint to a temporary directory; expert
  parallel over 2 ranks, and tp=2 x ep=2 on the same 2 ranks.
- `smollm2-cp2`: SmolLM2-135M (real weights), context parallel over 2 ranks, 1024-token prompt.
- `smollm2-tp3`: SmolLM2-135M, tensor parallel over 3 ranks (its 3 KV heads), on 2 cores.

    .venv/bin/python benchmarks/parallel_bench.py [--only NAME,...] [--repeats 3] [--out-dir DIR]

Writes one `llmkit bench` record per workload to DIR/parallel-NAME.json (default
benchmarks/results/). On a 2-core CPU with gloo the collectives are memory copies between
processes; the figures say what the split costs here, not what it gains on a multi-device machine.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path
from typing import Any

import torch

from llmkit.atomic import write_json_atomic
from llmkit.bench import bench, profile_summary

RESULTS = Path(__file__).parent / "results"


def mixtral_checkpoint(path: Path) -> Path:
    import transformers

    config = transformers.MixtralConfig(vocab_size=8192, hidden_size=1024, intermediate_size=3584,
                                        num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
                                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
                                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(path)
    return path


def workloads(tmp: Path) -> dict[str, dict[str, Any]]:
    # written once, and only when a workload asks for it
    moe = functools.cache(lambda: str(mixtral_checkpoint(tmp / "mixtral")))
    return {
        "moe-ep2": {"source": moe, "nproc": 2, "parallel": {"ep": 2}, "prompt_len": 256, "gen_len": 32},
        "moe-tp2xep2": {"source": moe, "nproc": 2, "parallel": {"tp": 2, "ep": 2}, "prompt_len": 256, "gen_len": 32},
        "smollm2-cp2": {"source": lambda: "smollm2-135m", "nproc": 2, "parallel": {"cp": 2}, "prompt_len": 1024,
                        "gen_len": 32},
        "smollm2-tp3": {"source": lambda: "smollm2-135m", "nproc": 3, "parallel": {"tp": 3}, "prompt_len": 256,
                        "gen_len": 32},
    }


def summary(name: str, record: dict[str, Any]) -> str:
    engines = record["engines"]
    sharded = next(k for k in engines if k != "llmkit")
    lines = [f"{name}: " + ", ".join(f"{k} prefill {e['prefill_tok_s']:.1f} tok/s decode {e['decode_tok_s']:.2f} tok/s"
                                     for k, e in engines.items() if "decode_tok_s" in e)]
    for phase in ("prefill", "decode"):
        # the blocks of the model (not the all-layers sums at the end)
        rows = [r for r in profile_summary(engines[sharded]["profile"]["ranks"], phase)
                if not r["block"].endswith("all layers")]
        total, comm, a2a = (sum(r[key] for r in rows) for key in ("time_ms", "comm_ms", "all_to_all_ms"))
        lines.append(f"  {sharded} {phase}: {total:.1f} ms, of which collectives {comm:.1f} ms ({comm / total:.0%}), "
                     f"all_to_all {a2a:.1f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated workload names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmkit-parallel-bench-") as tmp:
        jobs = workloads(Path(tmp))
        names = args.only.split(",") if args.only else list(jobs)
        unknown = sorted(set(names) - set(jobs))
        if unknown:
            parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(jobs)}")
        for name in names:
            job = jobs[name]
            record = bench(job["source"](), nproc=job["nproc"], parallel=job["parallel"], prompt_len=job["prompt_len"],
                           gen_len=job["gen_len"], repeats=args.repeats, baselines=())
            write_json_atomic(args.out_dir / f"parallel-{name}.json", record)
            print(summary(name, record), flush=True)


if __name__ == "__main__":
    main()

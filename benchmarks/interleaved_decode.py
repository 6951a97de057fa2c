"""Decode speed (SmolLM2-135M by default), llmkit against a baseline engine, both in one process, in alternating rounds.

`model_bench.py` runs each engine once in a process of its own, one after the other; on a shared
VM whose speed drifts by 10-30% between minutes that spread lands in the ratio. Here one process
holds both engines (llmkit `llmkit.load(smollm2-135m, ...)` in a configuration DTYPE[+QUANT]
[+compile][+kv16] as in model_bench, and the baseline: llama-cpp-python on the same GGUF's own Q4_1
weights, or transformers loading the same GGUF through its own loader, in float32 unless
--baseline-dtype says otherwise), and each round decodes the same greedy continuation of the same
prompt with each engine in turn, the order swapped every round. Decode speed of a run is
(gen_len - 1) / (time from the first generated token to the last), measured by `llmkit bench`'s
own loops (`llmkit_greedy`, `llamacpp_greedy`, `transformers_greedy`); the ratio is taken per
round (the two runs of a round are seconds apart) and the median over rounds is reported, with
the spread. Both engines use the same number of threads. `--baseline eager` compares a compiled
configuration with llmkit's own eager decode of the same model (no other engine), and `--source`
takes another checkpoint (one without a tokenizer gets `llmkit bench`'s random prompt ids), such
as a MoE model written by moe_checkpoint.py.

    .venv/bin/python benchmarks/interleaved_decode.py [--config float32+w4a8+compile+kv16]
        [--baseline llamacpp|transformers|eager] [--baseline-dtype float32] [--source smollm2-135m]
        [--prompt-len 512] [--gen-len 64] [--rounds 8] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

import llmkit
from llmkit.atomic import write_json_atomic
from llmkit.bench import cpu_model, llamacpp_greedy, llmkit_greedy, prompt_ids, transformers_greedy, transformers_model

from model_bench import SOURCE, _configs

TEXT = "The three primary colours are red, yellow and blue. Mixing two of them gives a secondary colour. "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="float32+w4a8+compile+kv16")
    parser.add_argument("--baseline", choices=("llamacpp", "transformers", "eager"), default="llamacpp")
    parser.add_argument("--source", default=SOURCE, help="a preset with local weights, a .gguf or a checkpoint dir")
    parser.add_argument("--baseline-dtype", default="float32", help="transformers' dtype (llama.cpp runs the GGUF's)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "interleaved_decode.json")
    args = parser.parse_args()
    (config,) = _configs(args.config)
    torch.set_num_threads(args.threads)

    model = llmkit.load(args.source, dtype=config["dtype"], quant=config["quant"])
    if model.tokenizer is None:
        ids, prompt = prompt_ids(None, model.spec.vocab_size, args.prompt_len)
    else:
        ids, prompt = (model.tokenizer.encode(TEXT) * (args.prompt_len // 8 + 1))[:args.prompt_len], TEXT
    engines = {"llmkit": lambda: llmkit_greedy(model, ids, args.gen_len, compile=config["compile"],
                                               kv_dtype=config["kv_dtype"])}
    if args.baseline == "eager":
        engines["eager"] = lambda: llmkit_greedy(model, ids, args.gen_len, kv_dtype=config["kv_dtype"])
        described = "llmkit's eager decode of the same model"
    elif args.baseline == "llamacpp":
        from llama_cpp import Llama

        llm = Llama(model_path=model.source, n_ctx=args.prompt_len + args.gen_len, n_batch=args.prompt_len,
                    n_threads=args.threads, n_threads_batch=args.threads, logits_all=False, verbose=False)
        engines["llamacpp"] = lambda: llamacpp_greedy(llm, ids, args.gen_len)
        described = "the GGUF's own Q4_1 weights, F16 KV cache (its default)"
    else:
        hf = transformers_model(model.source, getattr(torch, args.baseline_dtype))
        engines["transformers"] = lambda: transformers_greedy(hf, ids, args.gen_len)
        described = f"the GGUF's weights dequantised by transformers' loader, {args.baseline_dtype}"
    for run in engines.values():  # warm-up: llmkit compiles its decode step here
        run()
    rounds = []
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        got = {name: engines[name]() for name in order}
        speed = {name: (args.gen_len - 1) / decode_s for name, (_, _, decode_s, _) in got.items()}
        rounds.append({name: round(tok_s, 2) for name, tok_s in speed.items()})
        tokens = [got[name][3] for name in engines]
        agree = next((i for i, (a, b) in enumerate(zip(*tokens)) if a != b), args.gen_len)
        rounds[-1].update(ratio=round(speed["llmkit"] / speed[args.baseline], 3), agree=agree)
        print(f"round {r}: {rounds[-1]}", flush=True)
    ratios = [x["ratio"] for x in rounds]
    summary = {name: statistics.median(x[name] for x in rounds) for name in engines}
    record = {
        "benchmark": "interleaved_decode", "source": args.source, "path": model.source, "prompt": prompt,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
                    "torch": torch.__version__},
        "workload": {"config": args.config, **config, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                     "rounds": args.rounds, "baseline": args.baseline, args.baseline: described},
        "rounds": rounds,
        "median_decode_tok_s": summary,
        "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
    }
    print(f"median decode tok/s {summary}; llmkit / {args.baseline} per round: median {record['ratio']['median']:.3f} "
          f"(min {record['ratio']['min']:.3f}, max {record['ratio']['max']:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

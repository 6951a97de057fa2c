"""Run by tests/test_parallel.py under torchrun: each rank builds the same model whole, computes the
single-process logits and greedy tokens, shards it with the layout given, and computes them again.
Rank 0 writes what it measured (JSON) to the path given; the test judges it.

    torchrun --nproc-per-node 2 tests/parallel_worker.py OUT.json '{"tp": 2}' PRESET[:skewed] ...

With `fault:die` or `fault:hang` as the only preset (launched without torchrun, whose agent would
stop the survivors itself), rank 1 exits or hangs after sharding and rank 0 reports what its next
collective did.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import llmkit
from llmkit import LlmkitError, parallel


def long_context(preset: str, length: int, layout: dict) -> dict:
    """Precision rule against the float64 model at `length` tokens: the sharded float32 model's
    error may be at most 2 x the single-process float32 model's + 2 ulps of the logits' scale."""
    model = llmkit.build(preset, dtype="float32", seed=3).eval()
    exact = copy.deepcopy(model).to(torch.float64)
    ids = torch.randint(0, model.spec.embedding.vocab_size, (1, length), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = exact(ids)
        naive = (model(ids).double() - ref).abs().max().item()
        parallel.shard(model, layout)
        err = (model(ids).double() - ref).abs().max().item()
    floor = 2 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    return {"preset": f"{preset}@{length}", "e_max": err, "e_naive": naive, "threshold": 2 * naive + floor}


def check(preset: str, layout: dict) -> dict:
    name, _, variant = preset.partition(":")
    if variant.isdigit():
        return long_context(name, int(variant), layout)
    model = llmkit.build(name, dtype="float32", seed=3).eval()
    if variant == "skewed":
        # a zero router scores every expert alike: every token goes to the same top-k experts, so
        # under ep one rank gets all rows and the other none
        for m in model.modules():
            if getattr(m, "kind", None) is not None and m.kind.name == "moe":
                with torch.no_grad():
                    m.router.zero_()
    ids = torch.randint(0, model.spec.embedding.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    # two prompts of different lengths (left-padded); "window": longer than the sliding window
    lengths = (21, 17) if variant == "window" else (5, 3)
    prompts = [ids[0, :lengths[0]].tolist(), ids[1, :lengths[1]].tolist()]
    ids = ids[:, :11]
    with torch.no_grad():
        want_tokens = model.generate(prompts, max_new_tokens=8, eos=False)
        want = model(ids)  # last, so the routing statistics below are this call's
        routing = [m.routing.tokens_per_expert.tolist() for m in model.modules()
                   if getattr(m, "kind", None) is not None and m.kind.name == "moe"]
    lines = parallel.shard(model, layout)
    with torch.no_grad():
        got_tokens = model.generate(prompts, max_new_tokens=8, eos=False)
        kept = None
        if layout.get("cp", 1) > 1:
            # 11 prompt tokens, then 3 decode steps: how many tokens each rank's first cache keeps
            cache = model.new_cache()
            model(ids[:1], cache=cache)
            for _ in range(3):
                model(ids[:1, :1], cache=cache)
            kept = [None] * dist.get_world_size()
            dist.all_gather_object(kept, len(cache[0]))
        got = model(ids)
        got_routing = [m.routing.tokens_per_expert.tolist() for m in model.modules()
                       if getattr(m, "kind", None) is not None and m.kind.name == "moe"]
    return {
        "preset": preset,
        "max_abs_diff": (got - want).abs().max().item(),
        "logit_scale": want.abs().max().item(),
        "tokens_equal": torch.equal(got_tokens, want_tokens),
        "routing_equal": routing == got_routing,
        "routing": got_routing,
        "plan": lines,
        "kept": kept,
    }


def fault(how: str, layout: dict) -> None:
    model = llmkit.build("tiny-llama-3-8b", dtype="float32", seed=3).eval()
    parallel.shard(model, layout)
    if dist.get_rank() == 1:
        if how == "die":
            os._exit(3)
        time.sleep(600)
    start = time.monotonic()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long))
    except LlmkitError as exc:
        print(f"FAULT-ERROR after {time.monotonic() - start:.1f}s: {exc}", flush=True)
        os._exit(1)
    print("FAULT-MISSED: the forward completed", flush=True)
    os._exit(0)


def main() -> None:
    out, layout, presets = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
    parallel.init("gloo")
    if presets[0].startswith("fault:"):
        fault(presets[0].removeprefix("fault:"), layout)
    results = [check(p, layout) for p in presets]
    if dist.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

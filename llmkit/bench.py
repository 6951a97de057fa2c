"""`llmkit bench`: prefill and decode speed of one checkpoint under llmkit and under baselines.

Workload: batch 1, a prompt of `prompt_len` tokens, then `gen_len` greedy tokens (end-of-sequence
ignored). The prompt is the same token ids for every engine: a fixed English text, tokenised by the
checkpoint's tokenizer and repeated until cut to `prompt_len`, or, without a tokenizer, ids drawn
uniformly from the vocabulary with seed 0. Figures per engine, each the median over `repeats`
measured runs after one warm-up run:

  prefill_tok_s  prompt_len / the time of the forward pass over the prompt that fills the KV cache
  ttft_s         time to first token: from handing the prompt ids to the engine until the first
                 generated id is read back (cache set-up, the prefill forward, the greedy pick)
  decode_tok_s   (gen_len - 1) / the time from reading the first generated id to reading the last;
                 each step is one forward of one token through the KV cache and a greedy pick
  peak_rss_mib   the largest resident set of the engine's process (ru_maxrss), loading included
  other_load     the share of the machine's CPU time that other processes used (or the hypervisor
                 stole) while the engine's process ran, loading included (Linux; 0 = it had the
                 machine to itself); from `BUSY` on, the table flags its figures as distorted

Every engine runs in a fresh subprocess, one after the other, so its peak RSS is its own and no
engine warms caches or allocators for another; the parent collects one JSON record per engine.

Engines:
  llmkit        `llmkit.load(source, ...)` and `Model.generate` with its preallocated static KV
                cache; prefill time is generate's own `prefill_s` (logits of the last position only);
                with `compile`, decode steps run as one torch.compile'd graph, compiled in the warm-up;
                with `kv_dtype`, the cache stores keys and values in that dtype.
  transformers  the same weights through transformers (`from_pretrained(dir)`, or its GGUF loader,
                which dequantises to the dtype) in the dtype llmkit ran in; a hand-written greedy
                loop over `model(ids, cache=..., use_cache=True, logits_to_keep=1)` with its own
                (dynamic) KV cache, so neither engine pays `generate()` bookkeeping; logits of the
                last position only, as transformers' own generate asks for.
  llmkit xN     (with `nproc` N) llmkit sharded over N processes launched by torchrun with the given
                layout (tp/ep/cp), each with os.cpu_count() / N torch threads unless `threads` is
                set; figures of rank 0, peak RSS the largest rank's. Both llmkit runs then also
                record `profile`: each block's time over one prefill and per decode step, and the
                time inside collectives by name (all_reduce, all_to_all_single, ...), per rank, in a
                separate pass after the timed runs (`llmkit.parallel.Profile`).
  llamacpp      llama-cpp-python on the GGUF file: `Llama.eval(prompt)` for prefill, then
                `sample(temp=0)` + `eval([token])` per step. It computes with the file's stored
                quantisation (e.g. Q4_1), llmkit and transformers with dequantised weights: the same
                weights, not the same arithmetic. Skipped for HF directories or when
                llama-cpp-python is missing.

`ratios[baseline]` = llmkit's figure / the baseline's, from the same run (> 1: llmkit is faster).
`agree_tokens` counts the leading generated ids a baseline shares with llmkit, a check that both
ran the same weights (a near-tie or a different quantisation may end it early).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata, util
from pathlib import Path
from typing import Any

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .errors import LlmkitError, LlmkitWarning
from .target import parse_dtype

BASELINES = ("transformers", "llamacpp")
INSTALL = {
    "transformers": "transformers is not installed (pip install transformers)",
    "llamacpp": "llama-cpp-python is not installed (pip install llama-cpp-python; it builds llama.cpp from source)",
}
MODULE = {"transformers": "transformers", "llamacpp": "llama_cpp"}
BUSY = 0.1
"""From this share of the CPUs used by other processes while an engine ran, its figures are flagged."""

PROMPT_TEXT = (
    "The history of the lighthouse is a history of people trying to make the sea a little less "
    "dangerous. Early towers burned wood or coal in open fires; later ones used oil lamps, mirrors "
    "and finally large glass lenses that bent the light into a narrow beam visible for many miles. "
    "Keepers trimmed wicks, wound clockwork and logged the weather through long and lonely nights."
)

# The child reads its job from argv[1] and writes its record to argv[2]; stdout is not used, so
# whatever an engine prints there cannot corrupt the record.
_CHILD = "from llmkit.bench import _child_main; _child_main()"


def bench(
    source: str | Path,
    *,
    backend: str = "cpu",
    dtype: str | None = None,
    quant: str | None = None,
    policy: str | None = None,
    device: str | None = None,
    impl: Sequence[str] | None = None,
    deny: Sequence[str] | None = None,
    strict: bool = False,
    certs: Sequence[str | Path] | None = None,
    prompt_len: int = 128,
    gen_len: int = 64,
    baselines: Sequence[str] = ("transformers",),
    threads: int | None = None,
    repeats: int = 3,
    compile: bool = False,
    kv_dtype: str | None = None,
    nproc: int | None = None,
    parallel: Any = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure `source` under llmkit and each baseline; returns the benchmark record (module docstring).

    With `nproc` N, llmkit also runs sharded over N processes (torchrun, the `parallel` layout,
    e.g. {"tp": 2}), and both llmkit runs record a per-block profile (`profile`).

    The load options are `llmkit.load`'s. `kv_dtype` stores llmkit's KV cache in that dtype
    (`generate`'s `cache_dtype`; the baselines keep their own: transformers the model's dtype,
    llama.cpp float16). `threads` sets torch's thread count in every process and
    llama.cpp's (default: torch's own default; os.cpu_count() for llama.cpp). `progress(engine)` is
    called before each engine starts. llmkit's warnings from the child processes (fallbacks, broken
    plugins) are re-issued here, so callers see them as if the model had been loaded in-process.
    """
    if prompt_len < 1:
        raise LlmkitError(f"prompt_len must be >= 1, got {prompt_len}")
    if gen_len < 2:
        raise LlmkitError(f"gen_len must be >= 2 (decode speed is timed from the first to the last token), got {gen_len}")
    if repeats < 1:
        raise LlmkitError(f"repeats must be >= 1, got {repeats}")
    if threads is not None and threads < 1:
        raise LlmkitError(f"threads must be >= 1, got {threads}")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise LlmkitError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    layout = _check_nproc(nproc, parallel)
    if kv_dtype is not None:
        parse_dtype(kv_dtype, "KV cache dtype")
    job = {"prompt_len": prompt_len, "gen_len": gen_len, "threads": threads, "repeats": repeats}
    llmkit_job = _llmkit_job(source, job, backend=backend, dtype=dtype, quant=quant, policy=policy, device=device,
                             impl=impl, deny=deny, strict=strict, certs=certs, compile=compile,
                             kv_dtype=kv_dtype, profile=nproc is not None)
    if progress:
        progress("llmkit")
    ours = _run_child(llmkit_job)
    if "error" in ours:
        raise LlmkitError(ours["error"])
    # policy: the one in effect (the caller's, else the checkpoint spec's, else auto)
    ids, tokens, prompt, policy = ours.pop("ids"), ours.pop("tokens"), ours.pop("prompt"), ours.pop("policy")
    engines: dict[str, dict[str, Any]] = {"llmkit": ours}
    if layout is not None:
        name = f"llmkit x{nproc}"
        if progress:
            progress(f"{name} ({layout}, torchrun)")
        record = _run_child({**llmkit_job, "parallel": dataclasses.asdict(layout)}, nproc=nproc)
        for key in ("ids", "prompt", "policy"):
            record.pop(key, None)
        engines[name] = _agree(record, tokens)
    for name in dict.fromkeys(baselines):  # in the order given, once each
        if util.find_spec(MODULE[name]) is None:
            engines[name] = {"skipped": INSTALL[name]}
            continue
        if name == "llamacpp" and not ours["source"].lower().endswith(".gguf"):
            engines[name] = {"skipped": "llama.cpp reads GGUF files only; convert the directory with "
                                        "llama.cpp's convert_hf_to_gguf.py and bench the .gguf"}
            continue
        if progress:
            progress(name)
        record = _run_child({**job, "engine": name, "source": ours["source"], "dtype": ours["dtype"], "ids": ids})
        engines[name] = _agree(record, tokens)

    for engine, record in engines.items():
        for w in record.get("warnings", []):
            warnings.warn(_warning_class(w["category"])(f"{engine} process: {w['message']}"), stacklevel=2)
    ratios = {
        name: {"prefill_ratio": ours["prefill_tok_s"] / r["prefill_tok_s"],
               "decode_ratio": ours["decode_tok_s"] / r["decode_tok_s"]}
        for name, r in engines.items() if name != "llmkit" and "decode_tok_s" in r
    }
    return _record(source, ours, engines, ratios, backend=backend, device=device, quant=quant, compile=compile,
                   kv_dtype=kv_dtype, policy=policy, prompt_len=prompt_len, gen_len=gen_len, prompt=prompt, repeats=repeats,
                   threads=threads, parallel=None if layout is None else {"nproc": nproc, **dataclasses.asdict(layout)})


def bench_here(source: str | Path, *, parallel: Any, prompt_len: int = 128, gen_len: int = 64,
               repeats: int = 3, threads: int | None = None, compile: bool = False, kv_dtype: str | None = None,
               **load: Any) -> dict[str, Any] | None:
    """`bench` inside a torchrun-launched process: every rank measures its shard of `source` here
    (no baselines, no subprocesses); rank 0 gets the record, the other ranks None."""
    import torch.distributed as dist

    from .parallel import Parallel, env_world

    layout = Parallel.make(parallel)
    world = env_world() or 1
    if layout.trivial:
        raise LlmkitError(f"under torchrun ({world} processes) bench needs a layout over them: --tp/--ep/--cp {world}")
    job = _llmkit_job(source, {"prompt_len": prompt_len, "gen_len": gen_len, "threads": threads, "repeats": repeats},
                      compile=compile, kv_dtype=kv_dtype, profile=True, parallel=dataclasses.asdict(layout), **load)
    ours = _run_job(job)
    if dist.get_rank() != 0:
        return None
    if "error" in ours:
        raise LlmkitError(ours["error"])
    for w in ours.get("warnings", []):
        warnings.warn(_warning_class(w["category"])(f"rank 0: {w['message']}"), stacklevel=2)
    prompt, policy = ours.pop("prompt"), ours.pop("policy")
    ours.pop("ids"), ours.pop("tokens")
    return _record(source, ours, {f"llmkit x{world}": ours}, {}, backend=job["backend"], device=job["device"],
                   quant=job["quant"], compile=compile, kv_dtype=kv_dtype, policy=policy, prompt_len=prompt_len, gen_len=gen_len,
                   prompt=prompt, repeats=repeats, threads=threads, parallel={"nproc": world, **job["parallel"]})


def _llmkit_job(source: str | Path, workload: dict[str, Any], *, backend: str = "cpu", dtype: str | None = None,
                quant: str | None = None, policy: str | None = None, device: str | None = None,
                impl: Sequence[str] | None = None, deny: Sequence[str] | None = None, strict: bool = False,
                certs: Sequence[str | Path] | None = None, compile: bool = False, kv_dtype: str | None = None,
                profile: bool = False, parallel: dict[str, Any] | None = None) -> dict[str, Any]:
    """The llmkit engine's job (JSON-ready): the workload and `llmkit.load`'s options."""
    return {**workload, "engine": "llmkit", "source": str(source), "backend": backend, "dtype": dtype,
            "quant": quant, "policy": policy, "device": device, "impl": list(impl or []), "deny": list(deny or []),
            "strict": strict, "certs": None if certs is None else [str(c) for c in certs], "compile": compile,
            "kv_dtype": kv_dtype, "profile": profile, "parallel": parallel}


def _check_nproc(nproc: int | None, parallel: Any) -> Any:
    """The layout `nproc` processes run (refused with the reason), or None without `nproc`."""
    from .parallel import Parallel

    layout = Parallel.make(parallel)
    if nproc is None:
        if not layout.trivial:
            raise LlmkitError(f"a parallel layout ({layout}) needs --nproc N here, or launch bench under torchrun")
        return None
    if nproc < 2:
        raise LlmkitError(f"nproc must be >= 2 (the single-process run is always measured), got {nproc}")
    if layout.world != nproc:
        raise LlmkitError(f"--nproc {nproc} needs a layout over {nproc} ranks (--tp/--ep/--cp {nproc}), got {layout}")
    return layout


def _agree(record: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    """Count the leading generated ids an engine shares with llmkit's single-process run."""
    if "tokens" in record:
        theirs = record.pop("tokens")
        record["agree_tokens"] = next((i for i, (a, b) in enumerate(zip(tokens, theirs)) if a != b), len(tokens))
    return record


def _record(source: str | Path, ours: dict[str, Any], engines: dict[str, dict[str, Any]],
            ratios: dict[str, Any], **workload: Any) -> dict[str, Any]:
    return {
        "benchmark": "llmkit bench",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # the ISA tells apart VMs that share a CPU name (AVX2 vs AVX-512 EPYCs differ 15x in bf16 GEMMs)
        "machine": {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(),
                    "logical_cpus": os.cpu_count(), "torch_threads": ours["threads"],
                    "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "workload": {"source": str(source), "path": ours["source"], "dtype": ours["dtype"], "batch": 1,
                     "warmup": 1, **workload},
        "engines": engines,
        "ratios": ratios,
    }


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(record: dict[str, Any]) -> Group:
    """The record as a rich table (one row per engine, ratios against llmkit on baseline rows),
    followed by why each skipped or failed baseline has no figures and which engines shared the CPUs."""
    w = record["workload"]
    m = record["machine"]
    table = Table(
        title=f"{w['source']}: prompt {w['prompt_len']}, generate {w['gen_len']}, batch 1, {w['dtype']}"
              f"{', ' + w['quant'] if w['quant'] else ''}"
              f"{', KV cache ' + w['kv_dtype'] if w.get('kv_dtype') else ''}, median of {w['repeats']}; "
              f"{m['cpu']}, {m['torch_threads']} torch threads",
        title_justify="left",
        caption="ratios: llmkit / baseline (> 1: llmkit faster); agree: leading greedy tokens equal to llmkit's",
        caption_justify="left",
    )
    for col in ("engine", "prefill tok/s", "decode tok/s", "TTFT s", "peak RSS MiB", "prefill x", "decode x",
                "agree"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    notes = []
    for name, r in record["engines"].items():
        if "skipped" in r or "error" in r:
            status, style = ("skipped", "dim") if "skipped" in r else ("failed", "red")
            table.add_row(name, Text(status, style=style))
            notes.append(Text(f"{name}: {status}: {r.get('skipped') or r['error']}", style=style))
            continue
        ratio = record["ratios"].get(name)
        table.add_row(
            name, f"{r['prefill_tok_s']:,.1f}", f"{r['decode_tok_s']:,.2f}", f"{r['ttft_s']:.3f}",
            f"{r['peak_rss_mib']:,.0f}",
            f"{ratio['prefill_ratio']:.2f}" if ratio else "",
            f"{ratio['decode_ratio']:.2f}" if ratio else "",
            f"{r['agree_tokens']}/{w['gen_len']}" if "agree_tokens" in r else "",
        )
    for name, r in record["engines"].items():
        if (r.get("other_load") or 0) >= BUSY:
            notes.append(Text(f"{name}: other processes used {r['other_load']:.0%} of the CPUs while it ran; "
                              "its figures are distorted", style="yellow"))
    return Group(table, *notes, *profile_tables(record))


def profile_summary(ranks: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    """Rows of one phase, each figure the mean over ranks in ms: the embedding, every layer, the
    final norm and head, then all layers' attention and all layers' mlp/moe summed."""
    def mean(values: list[float]) -> float:
        return 1000 * sum(values) / len(values)

    rows = [list(r[phase]) for r in ranks]
    out = []
    for i, first in enumerate(rows[0]):
        if first["block"].count(".") < 2:
            out.append({"block": first["block"], "time_ms": mean([r[i]["time_s"] for r in rows]),
                        "comm_ms": mean([sum(r[i]["comm_s"].values()) for r in rows]),
                        "all_to_all_ms": mean([r[i]["comm_s"].get("all_to_all_single", 0.0) for r in rows])})
    for label, kinds in (("attention, all layers", (".attention",)), ("mlp/moe, all layers", (".mlp",))):
        picked = [[row for row in r if row["block"].endswith(kinds)] for r in rows]
        if picked[0]:
            out.append({"block": label, "time_ms": mean([sum(x["time_s"] for x in p) for p in picked]),
                        "comm_ms": mean([sum(sum(x["comm_s"].values()) for x in p) for p in picked]),
                        "all_to_all_ms": mean([sum(x["comm_s"].get("all_to_all_single", 0.0) for x in p)
                                               for p in picked])})
    return out


def profile_tables(record: dict[str, Any]) -> list[Table]:
    """Per-block time of the engines that recorded a profile, side by side: time (mean over
    ranks), and for a sharded run the share spent in collectives and in all_to_all."""
    profiled = {name: r["profile"]["ranks"] for name, r in record["engines"].items() if "profile" in r}
    if not profiled:
        return []
    w = record["workload"]
    tables = []
    for phase, what in (("prefill", f"the prompt of {w['prompt_len']} tokens"), ("decode", "per decode step")):
        table = Table(title=f"per block, {phase} ({what}), ms; sharded runs: mean over ranks", title_justify="left",
                      caption="comm: time inside collectives (transfers and waiting for peers); "
                              "compute = time - comm", caption_justify="left")
        table.add_column("block")
        summaries = {name: profile_summary(ranks, phase) for name, ranks in profiled.items()}
        for name, ranks in profiled.items():
            table.add_column(f"{name} time", justify="right")
            if len(ranks) > 1:
                for col in ("comm", "all_to_all"):
                    table.add_column(f"{name} {col}", justify="right")
        for i, row in enumerate(next(iter(summaries.values()))):
            cells = [row["block"]]
            for name, ranks in profiled.items():
                mine = summaries[name][i]
                cells.append(f"{mine['time_ms']:.2f}")
                if len(ranks) > 1:
                    share = mine["comm_ms"] / mine["time_ms"] if mine["time_ms"] else 0.0
                    cells += [f"{mine['comm_ms']:.2f} ({share:.0%})", f"{mine['all_to_all_ms']:.2f}"]
            table.add_row(*cells)
        tables.append(table)
    return tables


# --- the parent side of a child process ------------------------------------------------------


def _run_child(job: dict[str, Any], nproc: int | None = None) -> dict[str, Any]:
    """Run one engine in a fresh process (with `nproc`, in `nproc` processes under torchrun, whose
    rank 0 writes the record)."""
    with tempfile.TemporaryDirectory(prefix="llmkit-bench-") as tmp:
        job_file, out_file = Path(tmp, "job.json"), Path(tmp, "record.json")
        job_file.write_text(json.dumps(job))
        before = _cpu_seconds()
        launch = [sys.executable, "-c", _CHILD] if nproc is None else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "llmkit.bench"]
        proc = subprocess.run([*launch, str(job_file), str(out_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        after = _cpu_seconds()
        if proc.returncode != 0 or not out_file.is_file():
            tail = proc.stderr.strip()[-3000:]
            return {"error": f"the {job['engine']} process failed (exit status {proc.returncode}):\n{tail}"}
        record = json.loads(out_file.read_text())
        if before and after and after[2] > before[2]:
            # the machine's busy CPU time less the child's own, over all CPUs' time, while it ran;
            # clamped because the two clocks tick in different units (jiffies vs rusage)
            other = (after[0] - before[0]) - (after[1] - before[1])
            record["other_load"] = round(min(1.0, max(0.0, other / (after[2] - before[2]))), 3)
        return record


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process's finished children,
    CPU seconds elapsed over all CPUs), or None where /proc/stat is missing (not Linux)."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # steal is time the hypervisor gave to other guests: contention as much as a local process
    return ((user + nice + system + irq + softirq + steal) / tick, children.ru_utime + children.ru_stime,
            sum(fields) / tick)


def _warning_class(name: str) -> type[Warning]:
    from . import errors

    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, LlmkitWarning) else LlmkitWarning


# --- inside a child process -------------------------------------------------------------------


def _child_main() -> None:
    import torch.distributed as dist

    job_file, out_file = sys.argv[1], sys.argv[2]
    record = _run_job(json.loads(Path(job_file).read_text()))
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(record))


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One engine's record, measured in this process (on every rank, when sharded)."""
    import torch.distributed as dist

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LlmkitWarning)
        try:
            record = {"llmkit": _measure_llmkit, "transformers": _measure_transformers,
                      "llamacpp": _measure_llamacpp}[job["engine"]](job)
        except LlmkitError as exc:
            record = {"error": str(exc)}
        except Exception as exc:
            if job["engine"] == "llmkit":
                raise  # a bug in llmkit, not a verdict on a baseline: the traceback goes to the parent
            record = {"error": f"{type(exc).__name__}: {exc}"}
    # only llmkit's own warnings travel: the others are the baselines' business
    record["warnings"] = [{"category": type(w.message).__name__, "message": str(w.message)}
                          for w in caught if isinstance(w.message, LlmkitWarning)]
    if "skipped" not in record and "error" not in record:
        record["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        if dist.is_initialized():
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, record["peak_rss_mib"])
            record["peak_rss_mib"], record["peak_rss_mib_ranks"] = max(ranks), ranks
    return record


def _threads(job: dict[str, Any]) -> int:
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    return torch.get_num_threads()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _figures(job: dict[str, Any], once: Callable[[int], tuple[float, float, float, list[int]]]) -> dict[str, Any]:
    """One warm-up run (the whole prompt, two generated tokens), then `repeats` measured runs of
    `once(gen_len) -> (prefill_s, ttft_s, decode_s, generated ids)`; medians as rates."""
    once(2)
    runs = [once(job["gen_len"]) for _ in range(job["repeats"])]
    prefill, ttft, decode = ([r[i] for r in runs] for i in range(3))
    return {
        "prefill_tok_s": job["prompt_len"] / statistics.median(prefill),
        "decode_tok_s": (job["gen_len"] - 1) / statistics.median(decode),
        "ttft_s": statistics.median(ttft),
        "runs": {"prefill_s": prefill, "ttft_s": ttft, "decode_s": decode},
        "tokens": runs[-1][3],
    }


def prompt_ids(tokenizer: Any, vocab_size: int, n: int) -> tuple[list[int], str]:
    """`n` prompt ids and how they were made (see the module docstring)."""
    if tokenizer is None:
        ids = torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
        return ids, "random ids, seed 0"
    per_copy = max(1, len(tokenizer.encode(PROMPT_TEXT)))
    ids = tokenizer.encode(" ".join([PROMPT_TEXT] * (n // per_copy + 1)))[:n]
    return ids, "fixed English text"


def llmkit_greedy(model: Any, ids: list[int], gen_len: int, *, compile: bool = False,
                  kv_dtype: str | None = None) -> tuple[float, float, float, list[int]]:
    """One timed greedy continuation of `ids` by an llmkit model: (prefill s, time to the first
    token s, decode s from the first generated token to the last, the tokens)."""
    marks: list[float] = []

    def stream(token: torch.Tensor) -> None:
        token.tolist()  # read the id back, as a caller would (synchronises an asynchronous device)
        marks.append(time.perf_counter())

    stats: dict[str, Any] = {}
    start = time.perf_counter()
    out = model.generate([ids], gen_len, eos=False, stream=stream, stats=stats, compile=compile, cache_dtype=kv_dtype)
    return stats["prefill_s"], marks[0] - start, marks[-1] - marks[0], out[0, len(ids):].tolist()


def llamacpp_greedy(llm: Any, ids: list[int], gen_len: int) -> tuple[float, float, float, list[int]]:
    """`llmkit_greedy` for a llama-cpp-python `Llama`: a hand-written greedy loop (eval, then
    sample at temperature 0 without repeat penalty), from an empty context."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefilled = time.perf_counter()
    token = llm.sample(temp=0.0, repeat_penalty=1.0)
    tokens = [token]
    first = time.perf_counter()
    for _ in range(gen_len - 1):
        llm.eval([token])
        token = llm.sample(temp=0.0, repeat_penalty=1.0)
        tokens.append(token)
    return prefilled - start, first - start, time.perf_counter() - first, tokens


def _measure_llmkit(job: dict[str, Any]) -> dict[str, Any]:
    from .loading import load
    from .parallel import env_world

    world = env_world()
    if world and not job["threads"]:
        # the ranks share the machine's CPUs (torchrun would leave each one thread)
        job = {**job, "threads": max(1, (os.cpu_count() or 1) // world)}
    threads = _threads(job)
    model = load(job["source"], backend=job["backend"], dtype=job["dtype"], device=job["device"],
                 policy=job["policy"], impl=job["impl"], deny=job["deny"], strict=job["strict"], certs=job["certs"],
                 quant=job["quant"], parallel=job["parallel"])
    ids, how = prompt_ids(model.tokenizer, model.spec.vocab_size, job["prompt_len"])

    def once(gen_len: int) -> tuple[float, float, float, list[int]]:
        return llmkit_greedy(model, ids, gen_len, compile=job["compile"], kv_dtype=job["kv_dtype"])

    assert model.plan is not None
    record = {"engine": "llmkit", "version": _version("llmkit"), "source": model.source, "threads": threads,
              "dtype": str(model.plan.target.dtype).removeprefix("torch."), "impls": model.plan.counts(),
              "fallbacks": len(model.plan.fallbacks), **_figures(job, once), "ids": ids, "prompt": how,
              "policy": model.plan.selection.policy}
    if model.parallel_plan:
        record["parallel"] = job["parallel"]
    if job.get("profile"):
        record["profile"] = profile(model, ids, job["gen_len"])
    return record


@torch.no_grad()
def profile(model: Any, ids: list[int], gen_len: int) -> dict[str, Any]:
    """Per-block time and communication (`llmkit.parallel.Profile`) of one prefill of `ids` and of
    the `gen_len - 1` greedy decode steps after it (their mean per step), run apart from the timed
    runs; every rank's, gathered (rank order) when the model is sharded: {"ranks": [{"prefill":
    rows, "decode": rows}, ...]}."""
    import torch.distributed as dist

    from .parallel import Profile

    device = model.embedding.weight.device
    cache = model.new_cache(capacity=len(ids) + gen_len)
    with Profile(model) as prefill:
        token = model(torch.tensor([ids], device=device), cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    with Profile(model) as decode:
        for _ in range(gen_len - 1):
            token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    mine = {"prefill": prefill.rows(), "decode": decode.rows(per=gen_len - 1)}
    if not model.parallel_plan:
        return {"ranks": [mine]}
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return {"ranks": ranks}


def _hf_from_gguf(path: Path, dtype: Any) -> Any:
    """transformers' own GGUF loader. It asks for accelerate but uses none of it on CPU; it parses
    the file twice and rebuilds gguf's tensor-name table once per module (12 s for SmolLM2 on two
    cores), so both pure functions are memoised for the duration of the load."""
    import functools
    from unittest import mock

    import gguf
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM

    with mock.patch.object(modeling_utils, "is_accelerate_available", return_value=True), \
         mock.patch.object(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader)), \
         mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map)):
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)


def transformers_model(source: str | Path, dtype: torch.dtype) -> Any:
    """A transformers causal LM of `source` (a GGUF file through transformers' own loader, or a
    checkpoint directory) in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(source)
    hf = (_hf_from_gguf(path, dtype) if path.suffix.lower() == ".gguf"
          else AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype))
    return hf.eval()


@torch.inference_mode()
def transformers_greedy(hf: Any, ids: list[int], gen_len: int) -> tuple[float, float, float, list[int]]:
    """`llmkit_greedy` for a transformers model: a hand-written greedy loop over its forward with
    its own KV cache, logits of the last position only where the model supports it."""
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    start = time.perf_counter()
    out = hf(torch.tensor([ids]), use_cache=True, **keep)
    prefilled = time.perf_counter()
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    first = time.perf_counter()
    for _ in range(gen_len - 1):
        out = hf(token, cache=out.cache, use_cache=True, **keep)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return prefilled - start, first - start, time.perf_counter() - first, tokens


def _measure_transformers(job: dict[str, Any]) -> dict[str, Any]:
    threads = _threads(job)
    hf = transformers_model(job["source"], getattr(torch, job["dtype"]))

    def once(gen_len: int) -> tuple[float, float, float, list[int]]:
        return transformers_greedy(hf, job["ids"], gen_len)

    return {"engine": "transformers", "version": _version("transformers"), "threads": threads,
            "dtype": job["dtype"], **_figures(job, once)}


def _measure_llamacpp(job: dict[str, Any]) -> dict[str, Any]:
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        return {"skipped": f"llama-cpp-python cannot be imported: {exc}"}
    threads = job["threads"] or os.cpu_count() or 1
    n = job["prompt_len"]
    llm = Llama(model_path=job["source"], n_ctx=n + job["gen_len"], n_batch=n, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    ids = job["ids"]

    def once(gen_len: int) -> tuple[float, float, float, list[int]]:
        return llamacpp_greedy(llm, ids, gen_len)

    return {"engine": "llamacpp", "version": _version("llama-cpp-python"), "threads": threads,
            "dtype": "as stored in the GGUF", **_figures(job, once)}


if __name__ == "__main__":  # a torchrun-launched engine process (`_run_child` with nproc)
    _child_main()

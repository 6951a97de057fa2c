"""`llmkit export onnx`: a whole model as one ONNX graph that runs in onnxruntime without llmkit.

`model.onnx`: (input_ids [B, T], positions [B, T], past_positions [B, S], then per layer the
cached tensors so far, e.g. `past.3.k` [B, S, Hkv, D]) -> (logits [B, T, V], then the cache with the
T new tokens appended, `present.3.k` [B, S + T, Hkv, D]).

The cache is explicit: a caller keeps the tensors between steps (as llmkit's LayerCache does) and
passes them back. Prefill is the same graph with an empty past (S = 0); decode passes T = 1. One
graph rather than a prefill/decode pair halves the export time and the weights on disk. It is
exported from the model built on the reference impls (the portable semantics), with
`torch.onnx.export(dynamo=True)` and dynamic batch, token and cache dims, and saved without
onnxscript's graph optimisation: onnxruntime optimises the graph itself when it opens a session,
and on SmolLM2 the extra pass cost ~50 s of export for no onnxruntime speed-up (README, Export).
`manifest.json` names inputs and outputs and the per-token shape of each cached tensor (to build
the empty past); `run.py` (numpy + onnxruntime + tokenizers only) runs greedy generation from it;
`tokenizer.json` is written when the model has a tokenizer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write
from .cache import LayerCache
from .errors import LlmkitError

RUNNER = Path(__file__).with_name("onnx_runner.py")
FORMAT = "llmkit-onnx/2"  # run.py (onnx_runner.py) checks it; it keeps its own copy: it imports nothing of llmkit


def _example_cache(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each layer's cached tensors after running `ids` through a fresh cache (names, shapes, dtypes)."""
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, positions, cache)
    return [dict(sorted(c.tensors.items())) for c in cache]


class _Step(nn.Module):
    """T new tokens over an S-token past (S may be 0): the graph for prefill and decode alike."""

    def __init__(self, model: nn.Module, names: list[list[str]]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, past_positions: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache, i = [], 0
        for names in self.names:
            c = LayerCache()
            c.tensors = {n: past[i + j] for j, n in enumerate(names)}
            c.positions = past_positions
            i += len(names)
            cache.append(c)
        logits = self.model(input_ids, positions, cache)
        return (logits, *(c.tensors[n] for c, names in zip(cache, self.names) for n in names))


def _check_exportable(model: nn.Module) -> None:
    windows = [getattr(layer.config.attention, "window", None) for layer in model.layers]
    if any(w is not None for w in windows):
        # a sliding-window cache drops old tokens: the explicit cache would need that logic too
        raise LlmkitError("export onnx: sliding-window layers are not supported yet (the exported cache "
                          "would have to drop tokens outside the window)")


def export_onnx(model: nn.Module, out: str | Path, *, opset: int = 18) -> Path:
    """Write model.onnx (+ its weights file), manifest.json, run.py (and tokenizer.json) to `out`."""
    out = Path(out)
    _check_exportable(model)
    model = model.eval()
    # traced at B=2, S=5, T=3 so that no dim is specialised to 0 or 1; the graph then runs at any size
    past_pos = torch.arange(5).expand(2, 5).contiguous()
    example = _example_cache(model, torch.zeros(2, 5, dtype=torch.long), past_pos)
    names = [list(layer) for layer in example]
    past = [x.detach() for layer in example for x in layer.values()]
    ids, pos = torch.zeros(2, 3, dtype=torch.long), torch.arange(5, 8).expand(2, 3).contiguous()
    b, t, s = torch.export.Dim("batch", min=1), torch.export.Dim("tokens", min=1), torch.export.Dim("past", min=2)
    inputs = ["input_ids", "positions", "past_positions", *(f"past.{i}.{n}" for i, ns in enumerate(names) for n in ns)]
    outputs = ["logits", *(f"present.{i}.{n}" for i, ns in enumerate(names) for n in ns)]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with torch.no_grad():
            torch.onnx.export(
                _Step(model, names), (ids, pos, past_pos, *past), tmp / "model.onnx", dynamo=True,
                opset_version=opset, input_names=inputs, output_names=outputs,
                dynamic_shapes={"input_ids": {0: b, 1: t}, "positions": {0: b, 1: t},
                                "past_positions": {0: b, 1: s}, "past": tuple({0: b, 1: s} for _ in past)},
                external_data=True, optimize=False, verbose=False,
            )
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = getattr(model, "tokenizer", None)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "model": model.spec.name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "vocab_size": model.spec.vocab_size,
        "cache": [{"layer": i, "tensors": {n: {"shape": list(x.shape[2:]), "dtype": str(x.dtype).removeprefix("torch.")}
                                           for n, x in layer.items()}}
                  for i, layer in enumerate(example)],
        "graph": {"file": "model.onnx", "inputs": inputs, "outputs": outputs},
        "eos_ids": sorted(tokenizer.eos_ids) if tokenizer is not None else [],
        "tokenizer": "tokenizer.json" if tokenizer is not None else None,
        "add_bos": bool(tokenizer is not None and tokenizer.add_bos),
        "bos_id": tokenizer.bos_id if tokenizer is not None else None,
    }
    if tokenizer is not None:
        atomic_write(out / "tokenizer.json", tokenizer.backend.to_str())
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    atomic_write(out / "run.py", RUNNER.read_text())
    return out


def load_runner(out: str | Path) -> Any:
    """The `run.py` written next to an export, imported as a module (its `Exported` class)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("llmkit_onnx_run", Path(out) / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def greedy(out: str | Path, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation through the exported graph (the same code `run.py` runs)."""
    return load_runner(out).Exported(Path(out)).greedy(list(prompt_ids), max_new_tokens)

"""`llmkit export onnx`: a whole model as two ONNX graphs that run in onnxruntime without llmkit.

- `prefill.onnx`: (input_ids [B, T], positions [B, T]) -> (logits [B, T, V], then per layer the
  cached tensors of the prompt, e.g. `present.3.k` [B, T, Hkv, D]);
- `decode.onnx`: (input_ids [B, 1], positions [B, 1], past_positions [B, S], then per layer the
  cache so far, `past.3.k` [B, S, ...]) -> (logits [B, 1, V], the cache with the new token).

The cache is explicit: a caller keeps the tensors between steps (as llmkit's LayerCache does) and
passes them back. Both graphs are exported from the model built on the reference impls (the
portable semantics), with `torch.onnx.export(dynamo=True)` and dynamic batch/sequence/cache dims.
`manifest.json` names inputs and outputs; `run.py` (numpy + onnxruntime + tokenizers only) runs
greedy generation from it; `tokenizer.json` is written when the model has a tokenizer.
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


def _cache_names(model: nn.Module) -> list[list[str]]:
    """The tensor names each layer caches, found by running one token through a fresh cache."""
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    return [sorted(c.tensors) for c in cache]


class _Prefill(nn.Module):
    def __init__(self, model: nn.Module, names: list[list[str]]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = [LayerCache() for _ in self.names]
        logits = self.model(input_ids, positions, cache)
        return (logits, *(c.tensors[n] for c, names in zip(cache, self.names) for n in names))


class _Decode(nn.Module):
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
    """Write prefill.onnx, decode.onnx, manifest.json, run.py (and tokenizer.json) to `out`."""
    out = Path(out)
    _check_exportable(model)
    model = model.eval()
    names = _cache_names(model)
    out.mkdir(parents=True, exist_ok=True)
    b, t, s = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2), torch.export.Dim("past", min=2)
    ids = torch.zeros(2, 5, dtype=torch.long)
    pos = torch.arange(5).expand(2, 5).contiguous()
    outputs = ["logits", *(f"present.{i}.{n}" for i, layer in enumerate(names) for n in layer)]
    with torch.no_grad():
        prefill_out = _Prefill(model, names)(ids, pos)
    past = [x.detach() for x in prefill_out[1:]]
    past_inputs = [f"past.{i}.{n}" for i, layer in enumerate(names) for n in layer]
    tmp = out / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with torch.no_grad():
            torch.onnx.export(
                _Prefill(model, names), (ids, pos), tmp / "prefill.onnx", dynamo=True, opset_version=opset,
                input_names=["input_ids", "positions"], output_names=outputs,
                dynamic_shapes={"input_ids": {0: b, 1: t}, "positions": {0: b, 1: t}},
                external_data=True, verbose=False,
            )
            step_ids = torch.zeros(2, 1, dtype=torch.long)
            step_pos = torch.full((2, 1), 5, dtype=torch.long)
            torch.onnx.export(
                _Decode(model, names), (step_ids, step_pos, pos, *past), tmp / "decode.onnx", dynamo=True,
                opset_version=opset, input_names=["input_ids", "positions", "past_positions", *past_inputs],
                output_names=outputs,
                dynamic_shapes={"input_ids": {0: b}, "positions": {0: b}, "past_positions": {0: b, 1: s},
                                "past": tuple({0: b, 1: s} for _ in past)},
                external_data=True, verbose=False,
            )
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = getattr(model, "tokenizer", None)
    manifest: dict[str, Any] = {
        "format": "llmkit-onnx/1",
        "model": model.spec.name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "vocab_size": model.spec.vocab_size,
        "cache": [{"layer": i, "tensors": layer} for i, layer in enumerate(names)],
        "prefill": {"file": "prefill.onnx", "inputs": ["input_ids", "positions"], "outputs": outputs},
        "decode": {"file": "decode.onnx", "inputs": ["input_ids", "positions", "past_positions", *past_inputs],
                   "outputs": outputs},
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


def greedy(out: str | Path, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation through the exported graphs (the same code `run.py` runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("llmkit_onnx_run", Path(out) / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Exported(Path(out)).greedy(list(prompt_ids), max_new_tokens)

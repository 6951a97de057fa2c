"""`llmkit export onnx`: one graph with an explicit KV cache (empty for prefill) that onnxruntime runs
alone and that generates what llmkit generates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.cli import main
from llmkit.export import export_onnx, greedy, load_runner as _runner
from llmkit.testing import randomize

pytest.importorskip("onnxruntime", reason="onnx export tests need onnxruntime (installed by make test)")

# runs the exported model's run.py with torch and llmkit made unimportable: onnxruntime alone
ALONE = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['llmkit'] = None; "
         "sys.argv = [sys.argv[1], *sys.argv[2:]]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.fixture(scope="module", params=["tiny-llama-3-8b", "tiny-deepseek-v3"])
def tiny_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """llama (GQA, RoPE) and deepseek-v3 (MLA cache, sigmoid group-limited MoE, dense layers)."""
    model = randomize(llmkit.build(request.param, dtype="float32", policy="reference"), seed=3)
    return model, export_onnx(model, tmp_path_factory.mktemp(request.param))


def test_tiny_exports_generate_what_llmkit_generates(tiny_export: tuple[torch.nn.Module, Path]) -> None:
    model, out = tiny_export
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "llmkit-onnx/2" and sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx"]
    assert manifest["graph"]["outputs"][0] == "logits" and len(manifest["cache"]) == model.spec.n_layers
    # one exported graph serves several prompt lengths (dynamic dims), prefill over an empty cache
    # and decode one token at a time
    for prompt in ([1, 5, 9], [7, 3, 200, 11, 4, 4, 90, 2]):
        want = model.generate([prompt], max_new_tokens=12, eos=False)[0, len(prompt):].tolist()
        assert greedy(out, prompt, 12) == want


def test_the_graph_takes_any_batch_and_chunk_over_any_past(tiny_export: tuple[torch.nn.Module, Path]) -> None:
    """Two rows, a 4-token chunk over a 6-token past and one over none: the reference model's logits
    and cache under the float32 tolerance (the runner itself only ever feeds one row)."""
    import numpy as np

    model, out = tiny_export
    session = _runner(out).Exported(out)
    names = session.manifest["graph"]["inputs"][3:]
    ids = torch.randint(0, model.spec.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(10).expand(2, 10)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :6], positions[:, :6], cache)
        want = model(ids[:, 6:], positions[:, 6:], cache).numpy()
    past = [c.tensors[n].numpy() for c in cache for n in sorted(c.tensors)]
    for start, past_in in ((6, [p[:, :6] for p in past]), (0, session.empty_cache(2))):
        feed = {"input_ids": ids[:, start:].numpy(), "positions": positions[:, start:].numpy(),
                "past_positions": positions[:, :start].numpy(), **dict(zip(names, past_in))}
        logits, *present = session.session.run(None, feed)
        assert np.abs(logits[:, -4:] - want).max() <= 1e-4 * np.abs(want).max()
        assert all(got.shape == p.shape and np.abs(got - p).max() <= 1e-4 * max(np.abs(p).max(), 1.0)
                   for got, p in zip(present, past))


def test_run_py_refuses_an_export_of_another_format(tiny_export: tuple[torch.nn.Module, Path],
                                                     tmp_path: Path) -> None:
    _, out = tiny_export
    manifest = json.loads((out / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": "llmkit-onnx/1"}))
    with pytest.raises(SystemExit, match="format 'llmkit-onnx/1', this run.py reads 'llmkit-onnx/2'"):
        _runner(out).Exported(tmp_path)


def test_sliding_window_models_are_refused(tmp_path: Path) -> None:
    model = llmkit.build("tiny-mistral-7b-v0.1", dtype="float32", policy="reference")
    if all(layer.config.attention.window is None for layer in model.layers):
        pytest.skip("tiny-mistral has no window")
    with pytest.raises(llmkit.LlmkitError, match="sliding-window"):
        export_onnx(model, tmp_path)


@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-onnx")
    assert main(["export", "onnx", "smollm2-135m", "--out", str(out)]) == 0
    return out


def test_exported_smollm2_generates_the_cpu_backends_32_tokens_in_onnxruntime_alone(smollm2_export: Path) -> None:
    with pytest.warns(llmkit.FallbackWarning):  # embedding and layer run the reference on cpu
        model = llmkit.load("smollm2-135m", dtype="float32")  # the cpu backend's impls
    prompt = model.tokenizer.encode("The three primary colours are")
    want = model.generate([prompt], max_new_tokens=32)[0, len(prompt):].tolist()
    run = subprocess.run([sys.executable, "-c", ALONE, str(smollm2_export / "run.py"), "--ids",
                          ",".join(map(str, prompt)), "--max-new-tokens", "32"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = [int(t) for t in run.stdout.strip().split(",")]
    assert got == want and len(got) == 32
    text = subprocess.run([sys.executable, "-c", ALONE, str(smollm2_export / "run.py"), "--prompt",
                           "The capital of France is", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "Paris" in text.stdout, text.stderr

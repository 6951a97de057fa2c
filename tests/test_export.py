"""`llmkit export onnx`: prefill and decode graphs with an explicit KV cache that onnxruntime runs
alone and that generate what llmkit generates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import llmkit
from llmkit.cli import main
from llmkit.export import export_onnx, greedy
from llmkit.testing import randomize

pytest.importorskip("onnxruntime", reason="onnx export tests need onnxruntime (installed by make test)")

# runs the exported model's run.py with torch and llmkit made unimportable: onnxruntime alone
ALONE = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['llmkit'] = None; "
         "sys.argv = [sys.argv[1], *sys.argv[2:]]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize("preset", ["tiny-llama-3-8b", "tiny-deepseek-v3"])
def test_tiny_exports_generate_what_llmkit_generates(preset: str, tmp_path: Path) -> None:
    """llama (GQA, RoPE) and deepseek-v3 (MLA cache, sigmoid group-limited MoE, dense layers)."""
    model = randomize(llmkit.build(preset, dtype="float32", policy="reference"), seed=3)
    export_onnx(model, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["prefill"]["outputs"][0] == "logits" and len(manifest["cache"]) == model.spec.n_layers
    # one exported pair serves several prompt lengths and batch rows (dynamic dims)
    for prompt in ([1, 5, 9], [7, 3, 200, 11, 4, 4, 90, 2]):
        want = model.generate([prompt], max_new_tokens=12, eos=False)[0, len(prompt):].tolist()
        assert greedy(tmp_path, prompt, 12) == want


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

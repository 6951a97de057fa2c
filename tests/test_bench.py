"""`llmkit bench`: a tiny random transformers Llama benched against transformers, in fresh processes.

The figures of so small a model measure nothing but overheads; what is checked is the record: both
engines measured with positive figures, ratios that are the quotients of those figures, the same
greedy tokens (so both ran the same weights), llama.cpp reported as skipped when it cannot be
imported, and the CLI's JSON, --out file, warnings and errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from llmkit.bench import INSTALL, bench
from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.testing import hf_checkpoint

transformers = pytest.importorskip("transformers")

PROMPT, GEN = 8, 4
FIGURES = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mib")
# every kind the tiny Llama uses: denying them all on cpu makes llmkit.load fall back (and warn)
# whatever impls the cpu backend has
KINDS = ("embedding", "layer", "attention", "rope", "mlp", "norm", "head")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (vocab 96, d_model 64) with weights of std 0.1, so greedy picks are not near-ties."""
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return hf_checkpoint(tmp_path_factory.mktemp("tiny-llama"), lambda: transformers.LlamaForCausalLM(config))


def _no_llama_cpp(mp: pytest.MonkeyPatch) -> None:
    # a None entry makes both `import llama_cpp` and find_spec fail, installed or not
    mp.setitem(sys.modules, "llama_cpp", None)


@pytest.fixture(scope="module")
def record(checkpoint: Path) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        _no_llama_cpp(mp)
        return bench(checkpoint, policy="reference", prompt_len=PROMPT, gen_len=GEN,
                     baselines=("transformers", "llamacpp"), repeats=1, threads=1)


def test_both_engines_measured(record: dict[str, Any], checkpoint: Path) -> None:
    engines = record["engines"]
    for name in ("llmkit", "transformers"):
        for figure in FIGURES:
            assert engines[name][figure] > 0, (name, figure)
        assert engines[name]["threads"] == 1 and engines[name]["warnings"] == []
        assert 0 <= engines[name]["other_load"] <= 1
        assert [len(v) for v in engines[name]["runs"].values()] == [1, 1, 1]
    assert engines["llmkit"]["impls"] == {"reference.eager": 15} and engines["llmkit"]["fallbacks"] == 0
    assert engines["transformers"]["agree_tokens"] == GEN  # the same weights, the same greedy tokens
    w = record["workload"]
    assert (w["prompt_len"], w["gen_len"], w["dtype"], w["path"]) == (PROMPT, GEN, "float32", str(checkpoint))
    assert w["prompt"] == "random ids, seed 0"  # the checkpoint has no tokenizer
    m = record["machine"]
    assert m["cpu"] and m["torch"] == torch.__version__ and m["torch_threads"] == 1 and m["python"]
    assert m["isa"] == torch.backends.cpu.get_cpu_capability()
    assert record["created_at"]


def test_ratios_are_quotients_of_the_figures(record: dict[str, Any]) -> None:
    ours, theirs = record["engines"]["llmkit"], record["engines"]["transformers"]
    assert record["ratios"] == {"transformers": {
        "prefill_ratio": pytest.approx(ours["prefill_tok_s"] / theirs["prefill_tok_s"]),
        "decode_ratio": pytest.approx(ours["decode_tok_s"] / theirs["decode_tok_s"]),
    }}
    # and each figure is the rate of its median run time
    assert ours["prefill_tok_s"] == pytest.approx(PROMPT / ours["runs"]["prefill_s"][0])
    assert ours["decode_tok_s"] == pytest.approx((GEN - 1) / ours["runs"]["decode_s"][0])


def test_llamacpp_missing_is_skipped_with_how_to_install(record: dict[str, Any]) -> None:
    assert record["engines"]["llamacpp"] == {"skipped": INSTALL["llamacpp"]}
    assert "pip install llama-cpp-python" in INSTALL["llamacpp"]
    assert "llamacpp" not in record["ratios"]


def test_cli_json_out_and_child_warnings(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _no_llama_cpp(monkeypatch)
    out = tmp_path / "bench.json"
    deny = [arg for kind in KINDS for arg in ("--deny", f"{kind}=cpu")]
    code = main(["bench", str(checkpoint), "--baseline", "llamacpp", "--prompt-len", str(PROMPT), "--gen-len",
                 str(GEN), "--repeats", "1", "--json", "--out", str(out), *deny])
    stdout, stderr = capsys.readouterr()
    assert code == 0
    printed = json.loads(stdout)
    assert json.loads(out.read_text()) == printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no temporary file left behind
    assert printed["engines"]["llamacpp"]["skipped"] == INSTALL["llamacpp"] and printed["ratios"] == {}
    assert printed["engines"]["llmkit"]["decode_tok_s"] > 0
    # the child's fallback warning comes back in the record and is printed by the CLI, not raised
    assert [w["category"] for w in printed["engines"]["llmkit"]["warnings"]] == ["FallbackWarning"]
    assert "llmkit: warning: llmkit process: 15 of 15 blocks fall back" in stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"gen_len": 1}, "gen_len must be >= 2"),
    ({"prompt_len": 0}, "prompt_len must be >= 1"),
    ({"repeats": 0}, "repeats must be >= 1"),
    ({"threads": 0}, "threads must be >= 1"),
    ({"baselines": ("vllm",)}, "unknown baseline 'vllm'; choose from transformers, llamacpp"),
])
def test_bad_arguments_fail_before_any_process_starts(checkpoint: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LlmkitError, match=message):
        bench(checkpoint, **kwargs)


def test_a_missing_source_is_the_loaders_error(tmp_path: Path) -> None:
    with pytest.raises(LlmkitError, match="no such file or directory"):
        bench(tmp_path / "missing", baselines=())

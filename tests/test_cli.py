"""The `llmkit` command line: info and explain, output and exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest



@pytest.fixture
def cli(with_plugins, make_cli):
    """Run `llmkit ARGS` in process with blocks, cpu and testvendor; return (code, out, err)."""
    return make_cli("blocks,cpu,testvendor", 200)


def test_info_shows_plugins_backends_and_the_impl_table(cli) -> None:
    code, out, err = cli("info")
    assert code == 0 and err == ""
    for text in ("llmkit-testvendor 1.2.3", "Backends", "testvendor", "rmsnorm, rmsnorm_lowp",
                 "Block kinds x backends", "(block, x, tied_weight=None)"):
        assert text in out, text


def test_info_json_describes_impl_capabilities(cli) -> None:
    code, out, _ = cli("info", "--json")
    info = json.loads(out)
    norm = next(k for k in info["block_kinds"] if k["id"] == "norm@1")
    assert norm["by_backend"] == {"reference": ["eager"], "cpu": ["fused"], "testvendor": ["rmsnorm", "rmsnorm_lowp"]}
    rms = next(i for i in norm["impls"] if i["impl"] == "testvendor.rmsnorm")
    assert rms["dtypes"] == ["float32", "float64"] and rms["constraints"] == {"dim": "<= 8192, multiple of 8"}
    assert rms["plugin"] == "testvendor"
    cpu = next(b for b in info["backends"] if b["name"] == "cpu")
    assert cpu["available"] and cpu["device_facts"]["arch"] and cpu["peak"] is None


def test_info_peak_measures_the_cpu(cli) -> None:
    _, out, _ = cli("info", "--json", "--peak")
    peak = next(b for b in json.loads(out)["backends"] if b["name"] == "cpu")["peak"]
    assert peak["flops_per_s"] > 1e8 and peak["bytes_per_s"] > 1e8
    assert peak["source"].startswith("measured: best of 5 torch.mm 1024x1024x1024 in float32")


def test_explain_shows_the_choice_and_every_rejection(cli) -> None:
    code, out, _ = cli("explain", "norm", "--set", "dim=60", "--backend", "testvendor")
    assert code == 0
    assert "dim=60 is not a multiple of 8" in out
    assert "testvendor.rmsnorm_lowp" in out and "chosen" in out
    code, out, _ = cli("explain", "norm", "--config", '{"dim": 60}', "--backend", "testvendor", "--json")
    data = json.loads(out)
    assert data["impl"] == "testvendor.rmsnorm_lowp"
    assert {"impl": "testvendor.rmsnorm", "reasons": ["dim=60 is not a multiple of 8"]} in data["rejected"]
    assert {"impl": "cpu.fused", "reasons": ["belongs to backend 'cpu', target is 'testvendor'"]} in data["rejected"]


def test_explain_with_injected_facts_on_meta(cli) -> None:
    _, out, _ = cli("explain", "mlp", "--set", "d_model=64", "--set", "hidden=128", "--backend", "testvendor",
                    "--device", "meta", "--fact", "generation=1", "--json")
    data = json.loads(out)
    assert data["target"]["facts"] == {"generation": 1} and data["impl"] == "reference.eager"
    swiglu = next(r for r in data["rejected"] if r["impl"] == "testvendor.swiglu")
    assert "needs a generation >= 2 device (target has generation 1)" in swiglu["reasons"]


@pytest.mark.parametrize(("args", "message"), [
    (["explain", "embedding", "--set", "vocab_size=10", "--set", "d_model=8", "--strict"],
     "policy 'strict': embedding@1 would fall back to reference.eager on backend 'cpu' (cpu, float32, infer); backend 'cpu' registers no impl of embedding@1"),
    (["explain", "norm", "--set", "dim=64", "--set", "bias=true"],
     "invalid norm@1 config:\n  <config>: Value error, bias applies to LayerNorm only"),
    (["explain", "norm", "--set", "dim=64", "--backend", "testvendor", "--impl", "norm=testvendor.rmsnorm", "--dtype", "fp16"],
     "cannot honour pin norm=testvendor.rmsnorm for norm@1 on backend 'testvendor' (cpu, float16, infer):\n  - testvendor.rmsnorm: dtype float16 not declared"),
    (["explain", "nrom"], "unknown block kind 'nrom'"),
    (["explain", "norm", "--set", "dim=8", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["explain", "norm", "--config", "{dim: 3}"], "--config is not valid JSON"),
    (["explain", "norm", "--set", "dim"], "--set expects KEY=VALUE, got 'dim'"),
])
def test_errors_exit_2_with_a_precise_message(cli, args, message) -> None:
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    assert err.startswith("llmkit: error: ") and message in err, err


def test_console_script_is_installed() -> None:
    exe = __import__("pathlib").Path(sys.executable).parent / "llmkit"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "info" in out.stdout and "explain" in out.stdout


def test_inspect_json_keys_and_values(cli) -> None:
    code, out, _ = cli("inspect", "llama-3-8b", "--json")
    data = json.loads(out)
    assert code == 0
    assert {"params_total", "params_active", "flops_per_token", "kv_cache_bytes_per_token", "weight_bytes"} <= set(data)
    assert data["params_total"] == 8_030_261_248 and data["kv_cache_bytes_per_token"] == 131_072
    code, out, _ = cli("inspect", "mixtral-8x7b", "--context", "1024", "--dtype", "float32")
    assert code == 0 and "12,879,925,248" in out and "46,702,792,704" in out and "1,024" in out


def test_build_prints_the_plan_and_respects_strict(cli, tmp_path) -> None:
    code, out, err = cli("build", "tiny-mixtral-8x7b", "--policy", "reference")
    assert code == 0 and "Dispatch plan" in out and "moe@1" in out and err == ""
    code, out, err = cli("build", "tiny-llama-3-8b", "--backend", "testvendor", "--dtype", "float32", "--json")
    plan = json.loads(out)
    impls = {b["path"]: b["impl"] for b in plan["blocks"]}
    assert impls["layers.0.mlp"] == "testvendor.swiglu" and impls["layers.0.attn_norm"] == "testvendor.rmsnorm"
    assert "blocks fall back from backend 'testvendor'" in err  # visible, not silent
    code, out, err = cli("build", "tiny-llama-3-8b", "--backend", "testvendor", "--strict")
    assert code == 2 and "policy 'strict'" in err


def test_build_reports_spec_errors_with_lines(cli, tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: tiny-llama-3-8b\nname: bad\nlayer:\n  attention: {n_kv_heads: 3}\n")
    code, out, err = cli("build", str(bad), "--device", "meta")
    assert code == 2
    assert f"{bad}:4: layer.attention: n_heads (4) must be a multiple of n_kv_heads (3)" in err


def test_presets_lists_them_with_sources(cli) -> None:
    code, out, _ = cli("presets")
    assert code == 0 and "deepseek-v3" in out and "tiny-grok-1" in out and "huggingface.co" in out


def test_generate_streams_real_text_from_smollm2_and_summarises(subprocess_env) -> None:
    env = dict(subprocess_env, LLMKIT_PLUGINS="blocks,cpu")
    out = subprocess.run([sys.executable, "-m", "llmkit", "generate", "smollm2-135m", "--prompt",
                          "What is the capital of France?", "--max-new-tokens", "24", "--kv-dtype", "float16"],
                         env=env, capture_output=True, text=True, check=True, timeout=300)
    assert "Paris" in out.stdout
    summary = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ prompt tokens, \d+ generated, prefill [\d.]+ tok/s, decode [\d.]+ tok/s", summary), summary


@pytest.mark.parametrize("command", [["generate", "smollm2-135m", "--prompt", "x"], ["bench", "smollm2-135m"]])
def test_an_unknown_kv_cache_dtype_is_refused_by_name_before_loading(cli, capsys, command) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(*command, "--kv-dtype", "int8")
    assert exited.value.code == 2
    assert "argument --kv-dtype: unknown KV cache dtype 'int8'" in capsys.readouterr().err


def test_chat_loop_keeps_the_conversation(subprocess_env) -> None:
    env = dict(subprocess_env, LLMKIT_PLUGINS="blocks,cpu")
    out = subprocess.run([sys.executable, "-m", "llmkit", "chat", "smollm2-135m", "--max-new-tokens", "16"],
                         input="What is the capital of France?\nAnd of Italy?\n\n", env=env,
                         capture_output=True, text=True, check=True, timeout=300)
    assert "Paris" in out.stdout and "Rome" in out.stdout

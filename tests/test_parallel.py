"""Multi-process execution (llmkit.parallel) on gloo: tensor, expert and context parallel give the
single-process logits and greedy tokens; impossible layouts are refused before any process-group
work; a dead or hung rank makes the survivor fail with a precise error within the timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llmkit
from llmkit import LlmkitError
from llmkit.parallel import Parallel, layout_reasons
from llmkit.spec import load_spec

WORKER = Path(__file__).parent / "parallel_worker.py"
PRESETS = ["tiny-mixtral-8x7b", "tiny-deepseek-v3", "tiny-grok-1", "tiny-llama-3-8b", "tiny-mixtral-8x7b:skewed"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _torchrun(tmp_path: Path, nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-port", str(_free_port()), *args],
                          capture_output=True, text=True, timeout=timeout, env=_env(), cwd=tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAYOUTS = [({"tp": 2}, 2), ({"tp": 4}, 4), ({"ep": 2}, 2), ({"tp": 2, "ep": 2}, 2), ({"tp": 2, "ep": 2}, 4),
           ({"cp": 2}, 2), ({"cp": 2, "cp_mode": "allgather"}, 2), ({"tp": 2, "cp": 2}, 4)]


# tp4: 4 ranks, 2 KV heads (each rank keeps a copy of the KV head its q head uses)
@pytest.mark.parametrize("layout, nproc", LAYOUTS, ids=["tp2", "tp4-kv-replicated", "ep2", "tp2xep2-shared",
                                                       "tp2xep2-grid", "cp2-ring", "cp2-allgather", "tp2xcp2-grid"])
def test_sharded_models_match_the_single_process_model(tmp_path: Path, layout: dict, nproc: int) -> None:
    out = tmp_path / "results.json"
    presets = PRESETS + ["tiny-mistral-7b-v0.1:window"] if layout.get("cp") else PRESETS
    run = _torchrun(tmp_path, nproc, str(WORKER), str(out), json.dumps(layout), *presets)
    assert run.returncode == 0, run.stderr[-3000:]
    results = {r["preset"]: r for r in json.loads(out.read_text())}
    assert sorted(results) == sorted(presets)
    for preset, r in results.items():
        assert r["max_abs_diff"] <= 1e-5, (preset, r)
        assert r["tokens_equal"], (preset, r)
        assert r["routing_equal"], (preset, r)
    plan = "\n".join(results["tiny-mixtral-8x7b"]["plan"])
    if layout.get("tp"):
        per = 4 // layout["tp"]
        assert f"layers.0.attention [attention@1] tp: q heads 0..{per - 1}, all_reduce" in plan
        assert f"head [head@1] tp: vocab 0..{256 // layout['tp'] - 1}, all_gather" in plan
    if layout.get("cp"):
        # zig-zag: rank 0 holds chunks 0 and 3 of 11 tokens (3 + 2), rank 1 chunks 1 and 2 (3 + 3);
        # the decode steps' tokens are kept by rank 0, 1, 0
        # (on the tp x cp grid, ranks 0-1 are cp rank 0 and ranks 2-3 cp rank 1)
        assert results["tiny-llama-3-8b"]["kept"] == [7] * nproc
        assert plan.splitlines()[0] == f"cp ({layout.get('cp_mode', 'ring')}): sequence chunks 0 and 3 of 4 " \
                                       "(zig-zag); attention sees every rank's K/V; logits gathered in token order"
    elif layout.get("ep") and nproc == 4:
        # rank 0 = (ep group 0, tp rank 0): experts 0..3, the first half of each one's hidden
        assert "layers.0.mlp [moe@1] ep: experts 0..3, all_to_all_single dispatch; tp: expert hidden 0..63, " \
               "all_reduce" in plan
    elif layout.get("ep"):
        assert "layers.0.mlp [moe@1] ep: experts 0..3, all_to_all_single dispatch" in plan
        # the zero router scores all experts alike, so every token goes to the same two experts,
        # owned by one rank: the other rank dispatches everything and receives nothing, and the
        # result is still exact
        for counts in results["tiny-mixtral-8x7b:skewed"]["routing"]:
            used = [e for e, n in enumerate(counts) if n]
            assert len(used) == 2 and used[0] // 4 == used[1] // 4, counts
    else:
        assert "ep:" not in plan


@pytest.mark.parametrize("layout, nproc", [({"cp": 2}, 2), ({"cp": 2, "cp_mode": "allgather"}, 2),
                                           ({"cp": 2, "tp": 2}, 4)], ids=["ring", "allgather", "ring-tp2-grid"])
def test_context_parallel_at_thousands_of_tokens_meets_the_precision_rule(tmp_path: Path, layout: dict,
                                                                          nproc: int) -> None:
    # sliding window (mistral), soft-cap (grok-1), plain GQA (llama), MLA (deepseek-v3); float64 model as the oracle
    cases = ["tiny-mistral-7b-v0.1:2048", "tiny-grok-1:1024", "tiny-llama-3-8b:3001", "tiny-deepseek-v3:1024"]
    out = tmp_path / "results.json"
    run = _torchrun(tmp_path, nproc, str(WORKER), str(out), json.dumps(layout), *cases)
    assert run.returncode == 0, run.stderr[-3000:]
    for r in json.loads(out.read_text()):
        assert r["e_max"] <= r["threshold"], r


@pytest.mark.parametrize("layout", [["--tp", "3"], ["--cp", "2"]], ids=["tp3", "cp2"])
def test_torchrun_generate_with_real_weights_prints_the_single_process_text(tmp_path: Path, layout: list[str]) -> None:
    # SmolLM2-135M has 3 KV heads: tp=3 (3 processes on this 2-core machine); cp=2 splits the
    # prompt and spreads the KV cache over 2 ranks
    cmd = ["generate", "smollm2-135m", "--prompt", "The capital of France is", "--max-new-tokens", "12",
           "--no-chat"]
    single = subprocess.run([sys.executable, "-m", "llmkit", *cmd], capture_output=True, text=True, timeout=240,
                            env=_env(), cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = _torchrun(tmp_path, int(layout[1]), "-m", "llmkit", *cmd, *layout)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert single.stdout.strip() and sharded.stdout == single.stdout  # printed once, by rank 0


@pytest.mark.parametrize("how,within", [("die", 30.0), ("hang", 30.0)])
def test_a_dead_or_hung_rank_fails_the_survivor_within_the_timeout(tmp_path: Path, how: str, within: float) -> None:
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "LLMKIT_DIST_TIMEOUT": "5"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "unused.json"), '{"tp": 2}', f"fault:{how}"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    start = time.monotonic()
    try:
        out, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1, out[-2000:]
    assert "FAULT-ERROR" in out and "rank 0: collective all_reduce failed — a peer rank died or hung" in out, out[-2000:]
    assert time.monotonic() - start < within + 60  # start-up included; the fault itself is bounded below
    waited = float(out.split("FAULT-ERROR after ")[1].split("s:")[0])
    assert waited <= 5 + 2 if how == "hang" else waited < 5


def test_impossible_layouts_are_refused_with_reasons() -> None:
    llama = load_spec("tiny-llama-3-8b")
    reasons = layout_reasons(llama, Parallel(tp=3))
    assert "embedding: vocab_size 256 is not divisible by tp=3" in reasons
    assert any("n_kv_heads 2 and tp=3: neither divides the other" in r for r in reasons)
    assert layout_reasons(llama, Parallel(tp=4), world=4) == []  # KV heads replicated
    assert layout_reasons(llama, Parallel(tp=2), world=4) == ["tp=2 ep=1 cp=1 needs 2 ranks, the process group has 4"]
    assert layout_reasons(llama, Parallel(cp=2)) == []
    assert layout_reasons(llama, Parallel(tp=2, cp=2), world=4) == []  # the tp x cp grid
    assert layout_reasons(llama, Parallel(tp=2, cp=2), world=2) == [
        "tp=2 ep=1 cp=2 (ring) runs on 4 ranks (tp groups x cp groups), the process group has 2"]
    assert any("context parallelism combined with ep is not built" in r
               for r in layout_reasons(load_spec("tiny-mixtral-8x7b"), Parallel(ep=2, cp=2)))
    assert layout_reasons(load_spec("tiny-deepseek-v3"), Parallel(cp=2)) == []
    mixtral = load_spec("tiny-mixtral-8x7b")
    assert any("each degree is 1 or the world size, or tp x ep is the world size" in r
               for r in layout_reasons(mixtral, Parallel(tp=2, ep=4)))
    assert layout_reasons(mixtral, Parallel(tp=2, ep=2)) == []
    assert layout_reasons(mixtral, Parallel(tp=2, ep=2), world=4) == []  # the 2 x 2 grid
    assert layout_reasons(mixtral, Parallel(tp=2, ep=2), world=3) == [
        "tp=2 ep=2 cp=1 needs 2 ranks (or 4: tp groups x ep groups), the process group has 3"]
    assert any("expert hidden 128 is not divisible by tp=3 (each expert is split across its tp group)" in r
               for r in layout_reasons(mixtral, Parallel(tp=3, ep=2), world=6))
    assert any("n_experts 8 is not divisible by ep=3" in r
               for r in layout_reasons(load_spec("tiny-mixtral-8x7b"), Parallel(ep=3)))
    with pytest.raises(LlmkitError, match="unknown key"):
        Parallel.make({"pp": 2})
    with pytest.raises(LlmkitError, match="positive integer"):
        Parallel.make({"tp": 0})
    with pytest.raises(LlmkitError, match="cp_mode must be one of ring, allgather"):
        Parallel.make({"cp": 2, "cp_mode": "tree"})


def test_a_spec_names_its_layout_and_the_caller_overrides_it_key_by_key(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from llmkit import SpecError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    spec = tmp_path / "llama-tp2.yaml"
    spec.write_text("extends: tiny-llama-3-8b\nname: llama-tp2\nparallel: {tp: 2}\n")
    assert load_spec(spec).parallel == {"tp": 2}
    with pytest.raises(LlmkitError, match=r"parallel layout tp=2 ep=1 cp=1 needs 2 processes"):
        llmkit.build(spec, policy="reference")
    assert llmkit.build(spec, policy="reference", parallel={"tp": 1}).parallel_plan == []
    run = _torchrun(tmp_path, 2, "-m", "llmkit", "build", str(spec), "--policy", "reference")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "layers.0.attention [attention@1] tp: q heads 0..1, all_reduce" in run.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: tiny-llama-3-8b\nname: bad\nparallel:\n  tp: 2\n  pp: 2\n")
    with pytest.raises(SpecError, match=r"bad.yaml:3: parallel: parallel: unknown key\(s\) pp"):
        load_spec(bad)


def test_build_refuses_before_any_process_group_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LlmkitError, match="refused for tiny-llama-3-8b: embedding: vocab_size 256"):
        llmkit.build("tiny-llama-3-8b", parallel={"tp": 3})
    with pytest.raises(LlmkitError, match="needs 2 processes: launch with torchrun"):
        llmkit.build("tiny-llama-3-8b", parallel={"tp": 2})
    assert not dist.is_initialized()
    assert llmkit.build("tiny-llama-3-8b", policy="reference", parallel={"tp": 1}).parallel_plan == []


@pytest.fixture(scope="module")
def mixtral_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 4-expert transformers Mixtral with weights of std 0.1 (greedy picks are no near-ties)."""
    import transformers

    from llmkit.testing import hf_checkpoint

    config = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        num_local_experts=4, num_experts_per_tok=2, bos_token_id=None,
                                        eos_token_id=None, pad_token_id=None)
    return hf_checkpoint(tmp_path_factory.mktemp("tiny-mixtral"), lambda: transformers.MixtralForCausalLM(config))


def _rows(record: dict, engine: str, phase: str) -> list[list[dict]]:
    return [r[phase] for r in record["engines"][engine]["profile"]["ranks"]]


def test_bench_nproc_splits_each_block_into_compute_and_communication(mixtral_checkpoint: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from llmkit.bench import bench, render

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    record = bench(mixtral_checkpoint, policy="reference", prompt_len=12, gen_len=4, repeats=1, baselines=(), threads=1, nproc=2,
                   parallel={"ep": 2})
    single, sharded = record["engines"]["llmkit"], record["engines"]["llmkit x2"]
    assert "error" not in sharded, sharded["error"]
    assert record["workload"]["parallel"] == {"nproc": 2, "tp": 1, "ep": 2, "cp": 1, "cp_mode": "ring"}
    assert sharded["agree_tokens"] == 4 and sharded["decode_tok_s"] > 0 and len(sharded["peak_rss_mib_ranks"]) == 2
    assert record["ratios"]["llmkit x2"]["decode_ratio"] == single["decode_tok_s"] / sharded["decode_tok_s"]
    for phase in ("prefill", "decode"):
        (alone,) = _rows(record, "llmkit", phase)
        assert all(not row["comm_s"] for row in alone)  # one process: no collectives
        for rank in _rows(record, "llmkit x2", phase):
            by_block = {row["block"]: row for row in rank}
            assert [row["block"] for row in rank] == [row["block"] for row in alone]
            for i in range(2):
                moe, attention = by_block[f"layers.{i}.mlp"], by_block[f"layers.{i}.attention"]
                assert moe["comm_s"]["all_to_all_single"] > 0 and not attention["comm_s"]  # ep: attention is whole
                # a layer's time holds its blocks', and its collectives are those of its moe
                assert by_block[f"layers.{i}"]["time_s"] >= moe["time_s"] + attention["time_s"]
                assert by_block[f"layers.{i}"]["comm_s"] == moe["comm_s"]
                assert moe["time_s"] >= sum(moe["comm_s"].values())
    text = "\n".join(str(x) for x in render(record).renderables)
    assert "per block, decode (per decode step)" in str(render(record).renderables[-1].title) and text


def test_torchrun_bench_measures_the_shards_and_rank_0_reports(mixtral_checkpoint: Path, tmp_path: Path) -> None:
    run = _torchrun(tmp_path, 2, "-m", "llmkit", "bench", str(mixtral_checkpoint), "--tp", "2", "--policy", "reference", "--prompt-len", "12",
                    "--gen-len", "4", "--repeats", "1", "--baseline", "none", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(run.stdout)  # printed once, by rank 0
    assert list(record["engines"]) == ["llmkit x2"] and record["workload"]["parallel"]["tp"] == 2
    for rank in _rows(record, "llmkit x2", "decode"):
        by_block = {row["block"]: row for row in rank}
        assert by_block["layers.0.attention"]["comm_s"]["all_reduce"] > 0  # tp: partial outputs summed
        assert by_block["head"]["comm_s"]["all_gather"] > 0  # vocab-parallel logits joined


@pytest.mark.parametrize("nproc, layout, message", [
    (2, {"tp": 3}, r"--nproc 2 needs a layout over 2 ranks \(--tp/--ep/--cp 2\), got tp=3 ep=1 cp=1"),
    (1, {}, "nproc must be >= 2"),
    (None, {"tp": 2}, r"a parallel layout \(tp=2 ep=1 cp=1\) needs --nproc N here"),
])
def test_bench_refuses_a_layout_that_does_not_fit_nproc(nproc: int | None, layout: dict, message: str) -> None:
    from llmkit.bench import bench

    with pytest.raises(LlmkitError, match=message):
        bench("unused", nproc=nproc, parallel=layout)

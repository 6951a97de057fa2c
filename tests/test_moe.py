"""moe@1: routing semantics, statistics and aux losses, dtypes, gradients, parity with transformers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import llmkit
from llmkit.registry import reference_impl
from llmkit_blocks import mlp, moe

SMALL = {"d_model": 8, "n_experts": 4, "top_k": 2, "hidden": 12}


def bind_all(block: llmkit.Block, dtype: torch.dtype) -> llmkit.Block:
    """Bind the block and every child block (the shared expert) to their reference impls."""
    target = llmkit.Target(backend="cpu", device="cpu", dtype=dtype)
    for m in block.modules():
        if isinstance(m, llmkit.Block):
            m.bind(reference_impl(m.kind), target)
    return block


def make(config: dict, dtype: torch.dtype = torch.float64, seed: int = 0, std: float = 0.1,
         router_std: float | None = None) -> llmkit.Block:
    """A bound moe@1 block whose every parameter and buffer is std * N(0, 1) (router: router_std)."""
    block = llmkit.Block(moe.KIND, config, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*block.named_parameters(), *block.named_buffers()]:
            s = router_std if name == "router" and router_std is not None else std
            p.copy_(s * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return bind_all(block, dtype)


def variant(block: llmkit.Block, **overrides) -> llmkit.Block:
    """The same weights under a config with some options changed (removed params are dropped)."""
    config = moe.MoEConfig.model_validate({**block.config.model_dump(), **overrides})
    dtype = block.router.dtype
    other = llmkit.Block(moe.KIND, config, dtype=dtype)
    missing, _ = other.load_state_dict(block.state_dict(), strict=False)
    assert not missing
    return bind_all(other, dtype)


def randn(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def dense_mlp(block: llmkit.Block, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e written out by hand (gated, silu, no bias)."""
    return (F.silu(x @ block.w_gate[e].T) * (x @ block.w_up[e].T)) @ block.w_down[e].T


# ---- config, params, features -------------------------------------------------------------------


def test_params_features_and_children() -> None:
    full = {**SMALL, "n_experts": 8, "scoring": "sigmoid", "correction_bias": True, "n_group": 4,
            "topk_group": 2, "expert_bias": True, "shared_hidden": 6, "shared_gate": True,
            "routed_scaling": 2.5, "jitter": 0.1, "capacity_factor": 1.25, "renormalize": "none",
            "load_balance_coef": 0.01, "z_loss_coef": 1e-3, "seq_balance_coef": 1e-4}
    block = llmkit.Block(moe.KIND, full, dtype=torch.bfloat16)
    shapes = {n: (tuple(p.shape), p.dtype) for n, p in block.named_parameters()}
    bf = torch.bfloat16
    assert dict(block.named_buffers()).keys() == {"correction_bias"}  # saved, not trained
    assert block.correction_bias.dtype == torch.float32 and "correction_bias" in block.state_dict()
    assert shapes == {
        "router": ((8, 8), bf),
        "w_gate": ((8, 12, 8), bf), "w_up": ((8, 12, 8), bf), "w_down": ((8, 8, 12), bf),
        "b_gate": ((8, 12), bf), "b_up": ((8, 12), bf), "b_down": ((8, 8), bf), "shared_gate": ((1, 8), bf),
        "shared.w_gate": ((6, 8), bf), "shared.w_up": ((6, 8), bf), "shared.w_down": ((8, 6), bf),
        "shared.b_gate": ((6,), bf), "shared.b_up": ((6,), bf), "shared.b_down": ((8,), bf),
    }
    assert block.shared.kind is mlp.KIND
    assert torch.count_nonzero(block.correction_bias) == 0
    assert moe.KIND.required_features(block.config) == {
        "gated", "act_silu", "router_sigmoid", "renormalize_none", "correction_bias", "group_limited",
        "routed_scaling", "jitter", "capacity", "shared_expert", "shared_gate", "expert_bias",
        "load_balance_loss", "z_loss", "seq_balance_loss"}
    plain = moe.KIND.parse_config({**SMALL, "gated": False, "activation": "gelu"})
    assert moe.KIND.required_features(plain) == {"ungated", "act_gelu", "router_softmax", "renormalize_sum"}
    assert set(moe.KIND.param_specs(plain)) == {"router", "w_up", "w_down"}
    assert moe.KIND.child_specs(plain) == {}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"top_k": 5}, "top_k (5) must be <= n_experts (4)"),
    ({"n_group": 2}, "n_group and topk_group go together"),
    ({"n_group": 3, "topk_group": 1}, "n_experts (4) must be a multiple of n_group (3)"),
    ({"n_group": 4, "topk_group": 1, "top_k": 1}, "each group needs >= 2 experts"),
    ({"n_group": 2, "topk_group": 3}, "topk_group (3) must be <= n_group (2)"),
    ({"n_group": 2, "topk_group": 1, "top_k": 3}, "top_k (3) must be <= topk_group * n_experts / n_group (2)"),
    ({"shared_gate": True}, "shared_gate gates the shared expert: set shared_hidden too"),
    ({"jitter": 1.0}, "less than 1"),
    ({"capacity_factor": 0.0}, "greater than 0"),
    ({"scoring": "relu"}, "'softmax' or 'sigmoid'"),
    ({"type": "mlp"}, "Input should be 'moe'"),
    ({"n_expert": 4}, "Extra inputs are not permitted"),
])
def test_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        moe.KIND.parse_config({**SMALL, **overrides})
    assert message in str(err.value)


# ---- routing semantics ---------------------------------------------------------------------------


@pytest.mark.parametrize(("gated", "activation", "bias"), [(True, "silu", False), (True, "gelu_tanh", True),
                                                           (False, "relu", True)])
def test_one_expert_top1_equals_dense_mlp(gated: bool, activation: str, bias: bool) -> None:
    block = make({"d_model": 8, "n_experts": 1, "top_k": 1, "hidden": 12, "gated": gated,
                  "activation": activation, "expert_bias": bias})
    dense = bind_all(llmkit.Block(mlp.KIND, {"d_model": 8, "hidden": 12, "gated": gated,
                                             "activation": activation, "bias": bias}, dtype=torch.float64),
                     torch.float64)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            p.copy_(getattr(block, name)[0])
    x = randn(2, 5, 8)
    torch.testing.assert_close(block(x), dense(x), rtol=0, atol=1e-15)
    assert block.routing.weights.eq(1).all()


@pytest.mark.parametrize("renormalize", ["sum", "none"])
def test_top_k_all_experts_is_the_softmax_weighted_mixture(renormalize: str) -> None:
    block = make({**SMALL, "top_k": 4, "renormalize": renormalize}, router_std=0.5)
    x = randn(3, 8)
    p = torch.softmax(x @ block.router.T, dim=-1)
    expected = sum(p[:, e, None] * dense_mlp(block, e, x) for e in range(4))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("renormalize", ["none", "sum"])
def test_correction_bias_changes_the_choice_not_the_weights(renormalize: str) -> None:
    block = make({**SMALL, "d_model": 4, "scoring": "sigmoid", "correction_bias": True,
                  "renormalize": renormalize})
    with torch.no_grad():
        block.router.copy_(torch.eye(4, dtype=torch.float64))
    x = torch.tensor([[2.0, 1.0, 0.5, -1.0]], dtype=torch.float64)  # logits = x
    s = torch.sigmoid(x[0])

    def expected(chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        w = s[chosen] / (s[chosen].sum() if renormalize == "sum" else 1.0)
        return w, sum(w[j] * dense_mlp(block, e, x) for j, e in enumerate(chosen))

    out = block(x)
    assert sorted(block.routing.selected[0].tolist()) == [0, 1]
    w, y = expected([0, 1])
    torch.testing.assert_close(out, y, rtol=0, atol=1e-15)
    with torch.no_grad():
        block.correction_bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.0]))  # sigmoid(.5)+.5 > sigmoid(1)
    out = block(x)
    order = block.routing.selected[0].argsort()
    assert block.routing.selected[0][order].tolist() == [0, 2]
    w, y = expected([0, 2])
    torch.testing.assert_close(block.routing.weights[0][order], w, rtol=0, atol=1e-15)  # unbiased
    torch.testing.assert_close(out, y, rtol=0, atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n_group=st.sampled_from([2, 3, 4]), per_group=st.integers(2, 4),
       data=st.data())
def test_group_limited_routing_never_picks_from_a_dropped_group(seed: int, n_group: int, per_group: int,
                                                                 data) -> None:
    topk_group = data.draw(st.integers(1, n_group - 1))
    top_k = data.draw(st.integers(1, topk_group * per_group))
    scoring = data.draw(st.sampled_from(["softmax", "sigmoid"]))
    n_experts = n_group * per_group
    block = make({"d_model": 6, "n_experts": n_experts, "top_k": top_k, "hidden": 4, "scoring": scoring,
                  "correction_bias": True, "n_group": n_group, "topk_group": topk_group}, seed=seed,
                 router_std=0.5)
    x = randn(16, 6, seed=seed)
    block(x)
    logits = x @ block.router.T
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores + block.correction_bias
    for t in range(16):
        group_score = [sum(sorted(choice[t, g * per_group:(g + 1) * per_group].tolist())[-2:])
                       for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        chosen = block.routing.selected[t].tolist()
        assert all(e // per_group in kept for e in chosen)
        # and the chosen are the best of the kept groups' experts
        candidates = [e for e in range(n_experts) if e // per_group in kept]
        best = sorted(candidates, key=lambda e: -choice[t, e].item())[:top_k]
        assert sorted(chosen) == sorted(best)
        torch.testing.assert_close(block.routing.weights[t], scores[t, chosen] / scores[t, chosen].sum())


# ---- statistics and aux losses -------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_aux_losses_by_hand(scoring: str) -> None:
    coefs = {"load_balance_coef": 0.5, "z_loss_coef": 0.25, "seq_balance_coef": 2.0}
    block = make({"d_model": 3, "n_experts": 4, "top_k": 2, "hidden": 5, "scoring": scoring, **coefs},
                 router_std=1.0)
    x = randn(2, 2, 3)  # 2 sequences of 2 tokens
    block(x)
    stats = block.routing
    rows = x.reshape(4, 3).tolist()
    router = block.router.tolist()
    logits = [[sum(a * b for a, b in zip(r, w)) for w in router] for r in rows]
    if scoring == "softmax":
        p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    else:
        s = [[1 / (1 + math.exp(-v)) for v in row] for row in logits]
        p = [[v / sum(row) for v in row] for row in s]
    chosen = [sorted(range(4), key=lambda e: -row[e])[:2] for row in p]
    assert [sorted(c) for c in stats.selected.tolist()] == [sorted(c) for c in chosen]
    counts = [sum(e in c for c in chosen) for e in range(4)]
    assert stats.tokens_per_expert.tolist() == counts
    f = [n / (4 * 2) for n in counts]
    mean_p = [sum(row[e] for row in p) / 4 for e in range(4)]
    load_balance = 4 * sum(fe * pe for fe, pe in zip(f, mean_p))
    z_loss = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 4
    seq = []
    for b in range(2):
        toks = [2 * b, 2 * b + 1]
        fb = [4 / (2 * 2) * sum(e in chosen[t] for t in toks) for e in range(4)]
        pb = [sum(p[t][e] for t in toks) / 2 for e in range(4)]
        seq.append(sum(fi * pi for fi, pi in zip(fb, pb)))
    seq_balance = sum(seq) / 2
    assert set(stats.losses) == {"load_balance", "z_loss", "seq_balance"}
    assert stats.losses["load_balance"].item() == pytest.approx(load_balance, rel=1e-12)
    assert stats.losses["z_loss"].item() == pytest.approx(z_loss, rel=1e-12)
    assert stats.losses["seq_balance"].item() == pytest.approx(seq_balance, rel=1e-12)
    total = 0.5 * load_balance + 0.25 * z_loss + 2.0 * seq_balance
    assert stats.aux_loss.item() == pytest.approx(total, rel=1e-12)
    stats.aux_loss.backward()
    assert block.router.grad is not None and block.router.grad.abs().sum() > 0


def test_aux_loss_is_zero_without_coefficients_and_seq_balance_needs_sequences() -> None:
    block = make(SMALL)
    block(randn(5, 8))
    assert block.routing.losses == {} and block.routing.aux_loss.item() == 0.0
    seq = make({**SMALL, "seq_balance_coef": 0.1})
    with pytest.raises(ValueError, match=r"seq_balance_coef needs x of shape \[batch, seq, d_model\]"):
        seq(randn(5, 8))


def test_statistics_add_up_and_capacity_drops_in_token_order() -> None:
    block = make({**SMALL, "capacity_factor": 0.5}, router_std=1.0)
    x = randn(3, 4, 8)
    out = block(x)
    stats = block.routing
    n, k, e = 12, 2, 4
    assert stats.selected.shape == (n, k) and stats.weights.shape == (n, k)
    assert stats.tokens_per_expert.sum().item() == n * k
    assert stats.imbalance == pytest.approx(stats.tokens_per_expert.max().item() / (n * k / e))
    capacity = math.ceil(0.5 * n * k / e)  # 3
    served = [0] * e
    expected = torch.zeros(n, 8, dtype=torch.float64)
    dropped = 0
    rows = x.reshape(n, 8)
    for t in range(n):
        for j in range(k):
            ex = stats.selected[t, j].item()
            if served[ex] == capacity:
                dropped += 1
                continue
            served[ex] += 1
            expected[t] += stats.weights[t, j] * dense_mlp(block, ex, rows[t:t + 1])[0]
    assert dropped > 0 and stats.dropped == dropped
    torch.testing.assert_close(out.reshape(n, 8), expected, rtol=0, atol=1e-15)
    # without a capacity the same routing serves everything
    free = variant(block, capacity_factor=None)
    assert not torch.allclose(free(x), out) and free.routing.dropped == 0
    torch.testing.assert_close(free.routing.selected, stats.selected, rtol=0, atol=0)


def test_jitter_only_in_training_and_only_on_the_router_input() -> None:
    block = make({**SMALL, "jitter": 0.5}, router_std=0.5)
    plain = variant(block, jitter=0.0)
    x = randn(2, 6, 8)
    block.eval()
    y = block(x)
    assert torch.equal(y, block(x)) and torch.equal(y, plain(x))
    block.train()
    torch.manual_seed(0)
    y_train = block(x)
    assert not torch.allclose(y_train, y)
    # the experts saw the un-jittered x: the output is the mixture of the chosen experts at x
    rows, stats = x.reshape(12, 8), block.routing
    expected = torch.stack([sum(stats.weights[t, j] * dense_mlp(block, stats.selected[t, j].item(), rows[t:t + 1])[0]
                                for j in range(2)) for t in range(12)])
    torch.testing.assert_close(y_train.reshape(12, 8), expected, rtol=0, atol=1e-15)
    plain.train()
    assert torch.equal(plain(x), y)  # no jitter configured: training changes nothing


# ---- gradients and dtypes ------------------------------------------------------------------------


GRAD_CONFIGS = [
    {"d_model": 4, "n_experts": 4, "top_k": 2, "hidden": 6, "load_balance_coef": 0.1, "z_loss_coef": 0.1},
    {"d_model": 4, "n_experts": 4, "top_k": 2, "hidden": 6, "scoring": "sigmoid", "expert_bias": True,
     "shared_hidden": 5, "shared_gate": True, "routed_scaling": 2.5, "seq_balance_coef": 0.1},
]


@pytest.mark.parametrize("config", GRAD_CONFIGS, ids=["softmax-sum", "sigmoid-shared"])
def test_gradcheck_float64(config: dict) -> None:
    block = make(config, router_std=0.5)
    x = randn(1, 3, 4).requires_grad_()
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().requires_grad_() for p in block.parameters()]

    def fn(x, *ps):
        out = torch.func.functional_call(block, dict(zip(names, ps)), (x,))
        return out, block.routing.aux_loss

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_runs_in_low_precision_without_nan(dtype: torch.dtype) -> None:
    config = {**SMALL, "d_model": 16, "n_experts": 8, "scoring": "sigmoid", "correction_bias": True,
              "n_group": 4, "topk_group": 2, "shared_hidden": 8, "shared_gate": True, "expert_bias": True,
              "load_balance_coef": 0.1, "z_loss_coef": 0.1, "seq_balance_coef": 0.1}
    for cfg in (config, {**SMALL, "d_model": 16, "capacity_factor": 1.0, "jitter": 0.1}):
        block = make(cfg, dtype=dtype, std=0.3, router_std=0.5)
        assert "correction_bias" not in cfg or block.correction_bias.dtype == torch.float32
        block.train()
        x = randn(2, 7, 16, dtype=dtype)
        out = block(x)
        assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
        (out.float().sum() + block.routing.aux_loss).backward()
        for name, p in block.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_routing_weights_are_cast_to_the_storage_dtype_before_mixing() -> None:
    """Mixtral's original code: expert_out * weight.to(bf16); scaling in float32 rounds differently."""
    block = make({**SMALL, "d_model": 32, "n_experts": 2, "top_k": 1, "hidden": 64, "renormalize": "none"},
                 dtype=torch.bfloat16, std=0.3, router_std=0.5)
    x = randn(64, 32, dtype=torch.bfloat16)
    out = block(x)
    w, sel = block.routing.weights[:, 0], block.routing.selected[:, 0]
    assert w.dtype == torch.float32
    expected = torch.zeros_like(out)
    in_float32 = torch.zeros_like(out)
    for e in range(2):
        token = torch.nonzero(sel == e)[:, 0]
        y = moe.expert(block, e, x.index_select(0, token))  # the same call on the same rows: same bits
        expected[token] = y * w[token, None].to(torch.bfloat16)
        in_float32[token] = (y.float() * w[token, None]).to(torch.bfloat16)
    assert torch.equal(out, expected)
    assert not torch.equal(out, in_float32)


# ---- parity with transformers --------------------------------------------------------------------


def _hf_init(module: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*module.named_parameters(), *module.named_buffers()]:
            std = 0.5 if name in ("gate.weight", "router.layer.weight") else 0.1
            p.copy_(std * torch.randn(p.shape, generator=g))


def _eager(cfg):
    cfg._experts_implementation = "eager"  # the experts' own loop, as written in the modeling file
    return cfg


def _ours(config: dict, state: dict[str, torch.Tensor]) -> llmkit.Block:
    block = llmkit.Block(moe.KIND, config, dtype=torch.float32)
    block.load_state_dict(state)  # strict: every parameter mapped
    return bind_all(block, torch.float32).eval()


def _clear(choice: torch.Tensor, k: int, tol: float = 1e-4) -> torch.Tensor:
    """Tokens whose k-th and (k+1)-th choice scores are more than tol apart."""
    top = choice.topk(k + 1, dim=-1).values
    return (top[:, k - 1] - top[:, k]) > tol


def _check(ours: llmkit.Block, hf_out: torch.Tensor, hf_selected: torch.Tensor, x: torch.Tensor,
           clear: torch.Tensor, quirks: list[dict]) -> float:
    assert clear.float().mean() > 0.9, "too many near-ties: pick another seed"
    out = ours(x).reshape(-1, x.shape[-1])
    hf_out = hf_out.reshape(-1, x.shape[-1])
    ours_sel = ours.routing.selected.sort(-1).values
    assert torch.equal(ours_sel[clear], hf_selected.sort(-1).values[clear])
    torch.testing.assert_close(out[clear], hf_out[clear], rtol=0, atol=1e-5)
    for overrides in quirks:  # a test of the test: each quirk changes the output far beyond atol
        moved = (variant(ours, **overrides)(x).reshape(-1, x.shape[-1]) - hf_out)[clear].abs().max()
        assert moved > 1e-3, overrides
    return (out - hf_out)[clear].abs().max().item()


def test_parity_mixtral_sparse_moe_block() -> None:
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

    hf = MixtralSparseMoeBlock(_eager(MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4,
                                                    num_experts_per_tok=2))).eval()
    _hf_init(hf)
    p = dict(hf.named_parameters())
    gate_up = p["experts.gate_up_proj"]  # [E, 2 * hidden, d]: gate rows first, then up
    ours = _ours({"d_model": 16, "n_experts": 4, "top_k": 2, "hidden": 24, "load_balance_coef": 1.0},
                 {"router": p["gate.weight"], "w_gate": gate_up[:, :24], "w_up": gate_up[:, 24:],
                  "w_down": p["experts.down_proj"]})
    x = randn(2, 9, 16, seed=4, dtype=torch.float32)
    with torch.no_grad():
        logits, _, hf_sel = hf.gate(x.reshape(-1, 16))
        hf_out = hf(x)
        clear = _clear(torch.softmax(logits, -1), 2)
        _check(ours, hf_out, hf_sel, x, clear, [{"renormalize": "none"}])
        # transformers' Switch loss counts each of the k slots: top_k times ours
        hf_lb = load_balancing_loss_func((logits,), num_experts=4, top_k=2)
        torch.testing.assert_close(ours.routing.losses["load_balance"] * 2, hf_lb, rtol=1e-6, atol=0)


def test_parity_qwen2_moe_sparse_moe_block() -> None:
    from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf = Qwen2MoeSparseMoeBlock(_eager(Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=24, num_experts=6,
                                                      shared_expert_intermediate_size=20, num_experts_per_tok=2,
                                                      norm_topk_prob=False))).eval()
    _hf_init(hf)
    p = dict(hf.named_parameters())
    gate_up = p["experts.gate_up_proj"]
    ours = _ours({"d_model": 16, "n_experts": 6, "top_k": 2, "hidden": 24, "renormalize": "none",
                  "shared_hidden": 20, "shared_gate": True},
                 {"router": p["gate.weight"], "w_gate": gate_up[:, :24], "w_up": gate_up[:, 24:],
                  "w_down": p["experts.down_proj"], "shared_gate": p["shared_expert_gate.weight"],
                  "shared.w_gate": p["shared_expert.gate_proj.weight"],
                  "shared.w_up": p["shared_expert.up_proj.weight"],
                  "shared.w_down": p["shared_expert.down_proj.weight"]})
    x = randn(2, 9, 16, seed=4, dtype=torch.float32)
    with torch.no_grad():
        logits, _, hf_sel = hf.gate(x.reshape(-1, 16))
        clear = _clear(torch.softmax(logits, -1), 2)
        _check(ours, hf(x), hf_sel, x, clear, [{"renormalize": "sum"}])


def test_parity_deepseek_v3_moe() -> None:
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=16, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=3,
                           n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=2,
                           norm_topk_prob=True)
    hf = DeepseekV3MoE(_eager(cfg)).eval()
    _hf_init(hf)
    with torch.no_grad():  # sigmoid scores lie in (0, 1): a bias of this size re-ranks experts
        hf.gate.e_score_correction_bias.copy_(0.3 * torch.randn(8, generator=torch.Generator().manual_seed(7)))
    p = dict(hf.named_parameters())
    gate_up = p["experts.gate_up_proj"]
    ours = _ours({"d_model": 16, "n_experts": 8, "top_k": 3, "hidden": 12, "scoring": "sigmoid",
                  "correction_bias": True, "n_group": 4, "topk_group": 2, "routed_scaling": 2.5,
                  "shared_hidden": 24},
                 {"router": p["gate.weight"], "correction_bias": hf.gate.e_score_correction_bias,
                  "w_gate": gate_up[:, :12], "w_up": gate_up[:, 12:], "w_down": p["experts.down_proj"],
                  "shared.w_gate": p["shared_experts.gate_proj.weight"],
                  "shared.w_up": p["shared_experts.up_proj.weight"],
                  "shared.w_down": p["shared_experts.down_proj.weight"]})
    x = randn(2, 9, 16, seed=4, dtype=torch.float32)
    with torch.no_grad():
        logits, _, hf_sel = hf.gate(x)
        choice = (torch.sigmoid(logits) + hf.gate.e_score_correction_bias).view(-1, 4, 2)
        group_scores = choice.topk(2, dim=-1).values.sum(-1)
        kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(2, -1).indices, True)
        masked = choice.masked_fill(~kept[..., None], float("-inf")).view(-1, 8)
        clear = _clear(masked, 3) & _clear(group_scores, 2)
        _check(ours, hf(x), hf_sel, x, clear, [{"correction_bias": False}, {"n_group": None, "topk_group": None},
                                               {"routed_scaling": 1.0}, {"renormalize": "none"}])


def test_parity_dbrx_ffn() -> None:
    from transformers.models.dbrx.configuration_dbrx import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    cfg = DbrxConfig(d_model=16, ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2,
                                             "moe_normalize_expert_weights": 1.0, "moe_jitter_eps": 0.01})
    hf = DbrxFFN(_eager(cfg)).eval()
    _hf_init(hf)
    p = dict(hf.named_parameters())
    # w1, v1: [E * hidden, d] = per-expert gate and up [hidden, d]; w2 [E * hidden, d] is W_down^T
    ours = _ours({"d_model": 16, "n_experts": 4, "top_k": 2, "hidden": 24, "jitter": 0.01},
                 {"router": p["router.layer.weight"], "w_gate": p["experts.mlp.w1"].view(4, 24, 16),
                  "w_up": p["experts.mlp.v1"].view(4, 24, 16),
                  "w_down": p["experts.mlp.w2"].view(4, 24, 16).transpose(1, 2)})
    x = randn(2, 9, 16, seed=4, dtype=torch.float32)
    with torch.no_grad():
        logits = hf.router(x)
        _, hf_sel = hf.route_tokens_to_experts(logits)
        clear = _clear(torch.softmax(logits, -1), 2)
        _check(ours, hf(x), hf_sel, x, clear, [{"renormalize": "none"}])

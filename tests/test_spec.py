"""Spec loading: the error messages people see (exact, with lines), merging rules, and fuzzing."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmkit
from llmkit import LlmkitError, Registry, SpecError, build, load_spec
from llmkit.inspect import inspect

BASE = """\
name: toy
vocab_size: 97
d_model: 32
n_layers: 4
max_seq_len: 64
norm: {type: rms, eps: 1.0e-5}
components:
  moe: {type: moe, n_experts: 4, top_k: 2, hidden: 16}
layer:
  attention: {n_heads: 4, n_kv_heads: 2, rope: {theta: 10000.0}}
  mlp: {hidden: 48}
head: {tied: true}
"""


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry.load(allow=["blocks", "cpu"])


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def errors(tmp_path: Path, text: str, reg: Registry) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path, reg)
    return [str(i).replace(path, "SPEC") for i in err.value.issues]


BROKEN = [
    # (what is changed, replacement text, expected messages)
    ("unknown top-level field", ("n_layers: 4", "n_layers: 4\nn_layer: 4"),
     ["SPEC:5: n_layer: unknown field 'n_layer'; did you mean 'n_layers'?"]),
    ("unknown nested field", ("n_kv_heads: 2,", "n_kv_head: 2,"),
     ["SPEC:10: layer.attention.n_kv_head: unknown field 'n_kv_head'; did you mean 'n_kv_heads'?"]),
    ("wrong type", ("d_model: 32", "d_model: wide"),
     ["SPEC:3: d_model: Input should be a valid integer, unable to parse string as an integer (got 'wide')"]),
    ("missing field", ("max_seq_len: 64\n", ""),
     ["SPEC:1: max_seq_len: required field is missing"]),
    ("heads not divisible", ("n_kv_heads: 2", "n_kv_heads: 3"),
     ["SPEC:10: layer.attention: n_heads (4) must be a multiple of n_kv_heads (3)"]),
    ("top_k > n_experts", ("top_k: 2", "top_k: 5", "head: {tied: true}", "head: {tied: true}\noverrides:\n  - layers: 1\n    mlp: moe"),
     ["SPEC:8: components.moe: top_k (5) must be <= n_experts (4): a token chooses top_k distinct experts"]),
    ("partial rotary out of range", ("theta: 10000.0}", "theta: 10000.0, partial: 1.5}"),
     ["SPEC:10: layer.attention.rope.partial: Input should be less than or equal to 1"]),
    ("window <= 0", ("n_kv_heads: 2,", "n_kv_heads: 2, window: 0,"),
     ["SPEC:10: layer.attention.window: Input should be greater than 0"]),
    ("odd rotary dim", ("n_kv_heads: 2,", "n_kv_heads: 2, head_dim: 7,"),
     ["SPEC:10: layer.attention.rope: rotary dim int(head_dim * partial) = int(7 * 1.0) = 7 must be even and >= 2"]),
    ("missing component", ("head: {tied: true}", "head: {tied: true}\noverrides:\n  - layers: 0-1\n    mlp: moee"),
     ["SPEC:15: overrides.0.mlp: unknown component 'moee'; did you mean 'moe'?"]),
    ("layer out of range", ("head: {tied: true}", "head: {tied: true}\noverrides:\n  - layers: 2-4\n    mlp: moe"),
     ["SPEC:14: overrides.0.layers: layer index 4 out of range; the model has layers 0-3"]),
    ("bad override value points at the override", ("head: {tied: true}", "head: {tied: true}\noverrides:\n  - layers: [1, 3]\n    attention: {softcap: -2}"),
     ["SPEC:15: overrides.0.attention.softcap: Input should be greater than 0"]),
    ("unknown impl pin", ("head: {tied: true}", "head: {tied: true}\nimpl: {nrom: cpu}"),
     ["SPEC:13: impl.nrom: unknown block kind 'nrom'; valid: attention, attention@1, embedding, embedding@1, head, head@1, layer, layer@1, mla, mla@1, mlp, mlp@1, moe, moe@1, norm, norm@1, rope, rope@1; did you mean 'norm'?"]),
    ("unknown slot type", ("mlp: {hidden: 48}", "mlp: {type: dense, hidden: 48}"),
     ["SPEC:11: layer.mlp: unknown type 'dense'; expected one of 'mlp', 'moe'"]),
    ("impossible size", ("d_model: 32", "d_model: 2147483648"),
     ["SPEC:9: layer: parameter attention.wq would have shape (2147483648, 2147483648) = 4.61e+18 elements "
      "(limit 2^48); check the sizes"]),
    ("absurd layer count", ("n_layers: 4", "n_layers: 100000"),
     ["SPEC:4: n_layers: Input should be less than or equal to 65536"]),
    ("duplicate key", ("d_model: 32", "d_model: 32\nd_model: 64"),
     ["SPEC:4: d_model: duplicate key; each field may appear once"]),
    ("several errors at once", ("n_kv_heads: 2,", "n_kv_heads: 3,", "vocab_size: 97", "vocab_size: -1"),
     ["SPEC:2: vocab_size: Input should be greater than 0"]),
]


@pytest.mark.parametrize(("what", "edit", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_specs_get_exact_messages(tmp_path, reg, what, edit, expected) -> None:
    text = BASE
    for old, new in zip(edit[::2], edit[1::2]):
        assert old in text
        text = text.replace(old, new, 1)
    assert errors(tmp_path, text, reg) == expected


def test_several_block_errors_are_reported_together(tmp_path, reg) -> None:
    text = BASE.replace("n_kv_heads: 2,", "n_kv_heads: 3,").replace("top_k: 2", "top_k: 9").replace(
        "head: {tied: true}", "head: {tied: true, softcap: 0}\noverrides:\n  - layers: 0\n    mlp: moe")
    assert errors(tmp_path, text, reg) == [
        "SPEC:12: head.softcap: Input should be greater than 0",
        "SPEC:10: layer.attention: n_heads (4) must be a multiple of n_kv_heads (3)",
        "SPEC:8: components.moe: top_k (9) must be <= n_experts (4): a token chooses top_k distinct experts",
    ]


def test_invalid_yaml_names_the_line(tmp_path, reg) -> None:
    assert errors(tmp_path, BASE.replace("d_model: 32", "d_model: [32"), reg)[0].startswith("SPEC:4: invalid YAML")


def test_yaml_cannot_run_code(tmp_path, reg) -> None:
    msgs = errors(tmp_path, BASE + "x: !!python/object/apply:os.system ['echo pwned']\n", reg)
    assert msgs == ["SPEC:13: invalid YAML: could not determine a constructor for the tag "
                    "'tag:yaml.org,2002:python/object/apply:os.system'"]


def test_inherited_errors_point_into_the_parent_file(tmp_path, reg) -> None:
    write(tmp_path, BASE.replace("top_k: 2", "top_k: 7"), "parent.yaml")
    child = write(tmp_path, "extends: parent.yaml\nname: child\nn_layers: 2\noverrides:\n  - layers: 1\n    mlp: moe\n",
                  "child.yaml")
    with pytest.raises(SpecError) as err:
        load_spec(child, reg)
    (issue,) = err.value.issues
    assert (Path(issue.file).name, issue.line, issue.path) == ("parent.yaml", 8, "components.moe")


def test_extends_merges_fields_and_appends_overrides(tmp_path, reg) -> None:
    parent = BASE + "overrides:\n  - layers: 0\n    mlp: moe\n"
    write(tmp_path, parent, "parent.yaml")
    child = write(tmp_path, "extends: parent.yaml\nname: child\nlayer:\n  attention: {window: 8}\n"
                            "overrides:\n  - layers: {every: 2, offset: 1}\n    attention: {window: null}\n",
                  "child.yaml")
    spec = load_spec(child, reg)
    assert spec.name == "child" and spec.layers[0].mlp.type == "moe" and spec.layers[1].mlp.type == "mlp"
    assert [layer.attention.window for layer in spec.layers] == [8, None, 8, None]
    assert spec.layers[0].attention.n_kv_heads == 2  # kept from the parent through the merge
    assert spec.layers[2] is spec.layers[2] and spec.layers[1] is spec.layers[3]  # equal layers share a config


def test_override_with_another_type_replaces_the_slot(tmp_path, reg) -> None:
    spec = load_spec(write(tmp_path, BASE + "overrides:\n  - layers: [2, 3]\n    mlp: {type: moe, n_experts: 4, top_k: 1, hidden: 8}\n"), reg)
    assert [layer.mlp.type for layer in spec.layers] == ["mlp", "mlp", "moe", "moe"]
    assert spec.layers[3].mlp.hidden == 8


def test_extends_cycle_is_an_error(tmp_path, reg) -> None:
    write(tmp_path, "extends: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\nname: b\n", "b.yaml")
    with pytest.raises(SpecError, match=r"extends: cycle: a.yaml -> b.yaml -> a.yaml"):
        load_spec(str(tmp_path / "a.yaml"), reg)


def test_unknown_preset_lists_close_names(reg) -> None:
    with pytest.raises(LlmkitError, match="unknown preset 'nosuch-model'"):
        load_spec("nosuch-model", reg)


def test_build_runs_forward_and_backward_and_is_seeded(tmp_path, reg) -> None:
    path = write(tmp_path, BASE + "overrides:\n  - layers: 3\n    mlp: moe\n")
    model = build(path, policy="reference", seed=3, registry=reg)
    ids = torch.randint(0, 97, (2, 5))
    logits = model(ids)
    assert logits.shape == (2, 5, 97) and logits.dtype == torch.float32
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    again = build(path, policy="reference", seed=3, registry=reg)
    assert torch.equal(again(ids), logits.detach())
    other = build(path, policy="reference", seed=4, registry=reg)
    assert not torch.equal(other(ids), logits.detach())
    assert model.plan.impl_of("layers.3.mlp") == "reference.eager"


def test_build_decode_with_cache_equals_full_forward(tmp_path, reg) -> None:
    text = BASE.replace("n_kv_heads: 2,", "n_kv_heads: 2, window: 3,")
    model = build(write(tmp_path, text), policy="reference", dtype="float64", registry=reg)
    ids = torch.randint(0, 97, (1, 8))
    full = model(ids)
    cache = model.new_cache()
    steps = torch.cat([model(ids[:, i:i + 1], cache=cache) for i in range(8)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-12)
    assert all(len(c) == 3 for c in cache)


def test_spec_pins_apply_and_call_pins_win(tmp_path, reg) -> None:
    path = write(tmp_path, BASE + "impl: {norm: reference}\n")
    model = build(path, strict=True, impl={"mlp": "reference", "attention": "reference", "rope": "reference",
                                          "layer": "reference", "embedding": "reference", "head": "reference"},
                  registry=reg)
    assert model.plan.impl_of("norm") == "reference.eager"
    assert model.plan.entries[0].resolution.reason == "pinned (embedding=reference)"


def test_inspect_figures_by_hand(tmp_path, reg) -> None:
    """Tiny case: every figure recomputed here from the definitions."""
    text = BASE.replace("head: {tied: true}", "head: {tied: false}") + \
        "overrides:\n  - layers: 3\n    mlp: moe\n  - layers: [0, 2]\n    attention: {window: 8}\n"
    d, v, hd, nh, nkv = 32, 97, 8, 4, 2
    attn = d * hd * nh * 2 + d * hd * nkv * 2
    dense, expert = 3 * d * 48, 3 * d * 16
    moe = 4 * d + 4 * expert
    norms = 2 * d
    total = v * d * 2 + 4 * (attn + norms) + 3 * dense + moe + d
    info = inspect(write(tmp_path, text), context=32, registry=reg)
    assert info["params_total"] == total
    assert info["params_active"] == total - 2 * expert
    flops = 2 * (4 * attn + 3 * dense + (4 * d + 2 * expert) + d * v) + 4 * nh * hd * (8 + 32 + 8 + 32)
    assert info["flops_per_token"] == flops
    kv_values = 2 * nkv * hd * (8 / 32 + 1 + 8 / 32 + 1)
    assert info["kv_cache_bytes_per_token"] == kv_values * 2  # bfloat16 cache by default
    assert info["weight_bytes"]["float32"] == 4 * total


@st.composite
def mutations(draw):
    """A valid spec (as data) with one random edit: a value replaced, a key deleted or added."""
    data = yaml.safe_load(BASE + "overrides:\n  - layers: 3\n    mlp: moe\n")
    paths = []

    def collect(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + (k,))
                collect(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append(path + (i,))
                collect(v, path + (i,))

    collect(data, ())
    path = draw(st.sampled_from(paths))
    parent = data
    for p in path[:-1]:
        parent = parent[p]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    values = st.one_of(st.integers(-3, 70), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(),
                       st.none(), st.lists(st.integers(0, 5), max_size=3), st.just({}), st.just("moe"))
    if action == "replace":
        parent[path[-1]] = draw(values)
    elif action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.sampled_from(["window", "type", "hidden", "bogus", "top_k", "n_heads"]))] = draw(values)
    return copy.deepcopy(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutations())
def test_mutated_specs_give_a_model_or_a_spec_error(reg, data) -> None:
    try:
        spec = load_spec(data, reg)
    except SpecError:
        return
    model = build(spec, device="meta", policy="reference", registry=reg)
    assert model.plan is not None


def test_per_block_dtypes_mixed_precision(tmp_path, reg, with_plugins) -> None:
    """A bf16 model whose MLPs run in float32: their weights, their resolution target (the test
    vendor's swiglu declares float32 only) and their output cast back to bf16 at the boundary."""
    registry = Registry.load(allow=["blocks", "cpu", "testvendor"])
    text = BASE + "dtype: bfloat16\ndtypes: {mlp: float32}\n"
    with pytest.warns(llmkit.FallbackWarning):
        model = build(write(tmp_path, text), backend="testvendor", registry=registry)
    assert model.layers[0].mlp.w_up.dtype == torch.float32
    assert model.layers[0].attention.wq.dtype == torch.bfloat16
    assert model.plan.impl_of("layers.0.mlp") == "testvendor.swiglu"  # resolved for float32
    assert model.plan.impl_of("layers.0.mlp_norm") == "testvendor.rmsnorm_lowp"  # bf16 target
    entry = next(e for e in model.plan.entries if e.path == "layers.0.mlp")
    assert entry.to_dict()["dtype"] == "float32"
    x = torch.randn(1, 5, 32).to(torch.bfloat16)
    mlp = model.layers[0].mlp
    out = mlp(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, mlp.impl.forward(mlp, x.float()).to(torch.bfloat16), rtol=0, atol=0)
    logits = model(torch.randint(0, 97, (2, 6)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    sizes = inspect(write(tmp_path, text), registry=registry)["weight_bytes"]
    mlp_params = 4 * 3 * 32 * 48
    assert sizes["bfloat16"] == 2 * (sizes["float32"] // 4 - mlp_params) + 4 * mlp_params


def test_per_block_dtype_errors(tmp_path, reg) -> None:
    text = BASE + "dtypes: {mpl: float32, norm: fp12}\n"
    assert errors(tmp_path, text, reg) == [
        "SPEC:13: dtypes.mpl: unknown block kind 'mpl'; valid: attention, attention@1, embedding, embedding@1, "
        "head, head@1, layer, layer@1, mla, mla@1, mlp, mlp@1, moe, moe@1, norm, norm@1, rope, rope@1; did you mean 'mlp'?",
        "SPEC:13: dtypes.norm: unknown dtype 'fp12'; valid: bf16, bfloat16, double, float, float16, float32, "
        "float64, fp16, fp32, fp64, half; did you mean 'fp32'?",
    ]

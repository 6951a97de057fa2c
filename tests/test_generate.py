"""Generation: cache equivalence, left padding, sampling rules, stopping."""

from __future__ import annotations

import pytest
import torch
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from llmkit import FallbackWarning, LlmkitError, Registry, build
from llmkit.cache import FixedLayerCache, LayerCache, StaticLayerCache
from llmkit.generate import left_pad, sample
from llmkit.testing import randomize
from llmkit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry.load(allow=["blocks", "cpu"])


def tiny(reg, name: str, seed: int = 0):
    model = build(name, dtype="float64", policy="reference", registry=reg, seed=seed)
    return randomize(model, seed=seed, std=0.1)


def greedy_by_full_forward(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("name", ["tiny-llama-3.1-8b", "tiny-mistral-7b-v0.1", "tiny-deepseek-v3", "tiny-gemma-7b",
                                  "tiny-grok-1", "tiny-qwen1.5-moe-a2.7b"])
def test_greedy_generation_equals_argmax_of_full_forwards(reg, name) -> None:
    model = tiny(reg, name)
    ids = torch.randint(0, model.spec.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.generate(ids, 12), greedy_by_full_forward(model, ids, 12), rtol=0, atol=0)


def test_generation_records_no_autograd_graph(reg) -> None:
    """The parameters require grad (a model can be trained); the prefill and the steps of a
    generation run without autograd, as transformers' generate does: no graph, no saved
    activations, and impls may take their inference-only kernels."""
    model = tiny(reg, "tiny-llama-3.1-8b")
    assert all(p.requires_grad for p in model.parameters())
    seen = []
    for layer in model.layers:
        layer.register_forward_hook(lambda module, args, out: seen.append((torch.is_grad_enabled(), out.grad_fn)))
    model.generate(torch.randint(0, model.spec.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3)), 3)
    assert len(seen) == 3 * len(model.layers) and seen == [(False, None)] * len(seen)


@pytest.mark.parametrize("name", ["tiny-llama-3-8b", "tiny-gemma-7b"])  # untied and tied heads
def test_last_only_logits_are_the_last_row_of_the_full_forward(reg, name) -> None:
    model = tiny(reg, name)
    ids = torch.randint(0, model.spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, last = model(ids), model(ids, last_only=True)
    assert last.shape == (2, 1, model.spec.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-12, atol=1e-12)  # a GEMM of other shape


def test_static_cache_decode_logits_equal_full_forward_and_windows_stay_capped(reg) -> None:
    model = tiny(reg, "tiny-mistral-7b-v0.1")
    window = model.spec.layers[0].attention.window
    ids = torch.randint(0, model.spec.vocab_size, (1, 3 * window), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = model.new_cache(capacity=ids.shape[1])
    assert all(isinstance(c, StaticLayerCache) for c in cache)
    steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)
    assert all(len(c) == window and c.tensors["k"].shape[1] == window for c in cache)


CACHES = {"dynamic": lambda **kw: LayerCache(max_tokens=5, **kw),
          "static": lambda **kw: StaticLayerCache(12, max_tokens=5, **kw),
          "static, no window": lambda **kw: StaticLayerCache(12, **kw),
          "fixed": lambda **kw: FixedLayerCache(12, max_tokens=5, **kw)}


@pytest.mark.parametrize("kind", CACHES)
def test_a_half_precision_cache_equals_a_cache_of_the_rounded_values(kind) -> None:
    """A cache stored in float16 returns, at every step, exactly what a cache of the same kind
    returns when given the values already rounded to float16: new tokens rounded too, handed back
    in the dtype they came in."""
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 9, 3, 4, dtype=torch.float64, generator=gen), torch.randn(2, 9, 2, dtype=torch.float64, generator=gen)
    positions = torch.arange(9).expand(2, 9)
    half, plain = CACHES[kind](dtype=torch.float16), CACHES[kind]()
    for lo, hi in [(0, 4)] + [(i, i + 1) for i in range(4, 9)]:  # a prefill, then one token at a time
        got, got_pos = half.extend(positions[:, lo:hi], k=k[:, lo:hi], v=v[:, lo:hi])
        want, want_pos = plain.extend(positions[:, lo:hi], k=k[:, lo:hi].half().double(), v=v[:, lo:hi].half().double())
        assert got.keys() == want.keys() and all(got[n].dtype == torch.float64 for n in got)
        assert all(torch.equal(got[n], want[n]) for n in got) and torch.equal(got_pos, want_pos)
    assert {t.dtype for t in half.tensors.values()} == {torch.float16}
    with pytest.raises(LlmkitError, match="a cache dtype must be a floating-point torch.dtype, got torch.int8"):
        CACHES[kind](dtype=torch.int8)


def test_decoding_through_a_half_precision_cache_equals_its_one_shot_forward(reg) -> None:
    """Greedy decode logits over a float16 static cache equal one forward of the whole sequence
    through a float16 dynamic cache (both round every key and value once), and differ from the
    unrounded model's by float16's rounding only."""
    model = tiny(reg, "tiny-llama-3.1-8b")
    ids = torch.randint(0, model.spec.vocab_size, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        once = model(ids, cache=model.new_cache(dtype=torch.float16))
        cache = model.new_cache(capacity=11, dtype=torch.float16)
        steps = torch.cat([model(ids[:, :4], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(4, 11)], 1)
        exact = model(ids)
    torch.testing.assert_close(steps, once, rtol=0, atol=1e-10)
    assert 0 < (once - exact).abs().max() < 1e-2
    assert torch.equal(model.generate(ids, 6, cache_dtype="float16")[:, 11:],
                       model.generate(ids, 6, cache_dtype=torch.float16)[:, 11:])
    with pytest.raises(LlmkitError, match="unknown KV cache dtype 'int8'"):
        model.generate(ids, 2, cache_dtype="int8")


def test_mla_generation_caches_only_the_latent(reg) -> None:
    model = tiny(reg, "tiny-deepseek-v3")
    cache = model.new_cache(capacity=10)
    model(torch.randint(0, model.spec.vocab_size, (1, 10)), cache=cache)
    att = model.spec.layers[0].attention
    assert all(c.values_per_token() == att.kv_lora_rank + att.qk_rope_head_dim for c in cache)


def test_left_padded_batch_equals_each_prompt_alone(reg) -> None:
    model = tiny(reg, "tiny-llama-3-8b")
    prompts = [[5, 9, 13, 2, 7, 1, 4], [3, 8], [11, 6, 6, 2]]
    together = model.generate(prompts, 8)
    for row, p in enumerate(prompts):
        alone = model.generate([p], 8)
        assert together[row, -8:].tolist() == alone[0, -8:].tolist()
    ids, positions = left_pad(prompts, pad_id=0)
    assert positions[1].tolist() == [-1, -1, -1, -1, -1, 0, 1]
    mask = positions >= 0
    again = model.generate(ids, 8, attention_mask=mask)
    assert torch.equal(again, together)


def test_sampling_is_seeded_and_degenerate_settings_are_greedy(reg) -> None:
    model = tiny(reg, "tiny-llama-3-8b")
    ids = torch.randint(0, model.spec.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    a = model.generate(ids, 10, temperature=1.5, seed=7)
    assert torch.equal(a, model.generate(ids, 10, temperature=1.5, seed=7))
    assert not torch.equal(a, model.generate(ids, 10, temperature=1.5, seed=8))
    greedy = model.generate(ids, 10)
    assert torch.equal(model.generate(ids, 10, temperature=1.0, top_k=1, seed=1), greedy)
    assert torch.equal(model.generate(ids, 10, temperature=1.0, top_p=1e-9, seed=1), greedy)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5), p=st.floats(0.05, 1.0))
def test_top_k_and_top_p_only_draw_from_their_sets(seed: int, k: int, p: float) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 12, generator=g) * 3
    tokens = torch.stack([sample(logits, temperature=1.0, top_k=k, generator=g) for _ in range(30)])
    allowed = logits.topk(k, dim=-1).indices
    assert all(tokens[i, r].item() in allowed[r].tolist() for i in range(30) for r in range(4))
    tokens = torch.stack([sample(logits, temperature=1.0, top_p=p, generator=g) for _ in range(30)])
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    for r in range(4):
        nucleus = order[r, : int(((probs[r].cumsum(0) - probs[r]) < p).sum())].tolist()
        assert set(tokens[:, r].tolist()) <= set(nucleus)


def test_temperature_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, temperature=2.0, generator=g) for _ in range(20000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, (logits[0] / 2.0).softmax(-1), rtol=0, atol=0.015)


def _word_tokenizer(vocab_size: int, eos: str = "w3") -> Tokenizer:
    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")
    return Tokenizer(backend, eos_tokens=[eos])


def test_eos_and_stop_strings_end_rows_and_pad_them(reg) -> None:
    model = tiny(reg, "tiny-llama-3-8b")
    ids = torch.randint(0, model.spec.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    free = model.generate(ids, 12, eos=False)
    first_row_new = free[0, 5:].tolist()
    eos_token = first_row_new[3]
    model.tokenizer = _word_tokenizer(model.spec.vocab_size, eos=f"w{eos_token}")
    out = model.generate(ids, 12)
    row = out[0, 5:].tolist()
    stop_at = row.index(eos_token)
    assert row[:stop_at + 1] == first_row_new[:stop_at + 1] and set(row[stop_at + 1:]) <= {eos_token}
    tok = model.tokenizer
    stop_text = tok.decode([first_row_new[2]])
    expected = next(i for i in range(12) if stop_text in tok.decode(first_row_new[:i + 1], skip_special_tokens=False))
    stopped = model.generate(ids, 12, eos=False, stop=[stop_text])
    assert stopped[0, 5:5 + expected + 1].tolist() == first_row_new[:expected + 1]
    assert set(stopped[0, 5 + expected + 1:].tolist()) <= {0}  # padded after stopping (no eos: pad id 0)
    stats: dict = {}
    model.generate(ids, 4, eos=False, stats=stats)
    assert stats["prompt_tokens"] == 10 and stats["generated_tokens"] == 8 and stats["decode_s"] > 0


def test_bad_arguments_are_errors(reg) -> None:
    model = tiny(reg, "tiny-llama-3-8b")
    with pytest.raises(LlmkitError, match="stop strings need a tokenizer"):
        model.generate([[1, 2]], 2, stop=["x"])
    with pytest.raises(LlmkitError, match="temperature must be >= 0"):
        model.generate([[1, 2]], 2, temperature=-1.0)
    with pytest.raises(LlmkitError, match="every prompt needs at least one token"):
        model.generate([[1], []], 2)
    with pytest.raises(LlmkitError, match="cache capacity 3 exceeded"):
        model(torch.tensor([[1, 2, 3, 4]]), cache=model.new_cache(capacity=3))


def test_compiled_decode_step_generates_what_eager_does() -> None:
    """generate(compile=True) on the CPU backend's impls: one traced graph per model, the same tokens."""
    with pytest.warns(FallbackWarning):
        model = build("tiny-mistral-7b-v0.1", dtype="float32", seed=4)
    ids = torch.randint(0, model.spec.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    eager = model.generate(ids, 12)  # sliding window 16 (tiny preset): the cache wraps during decode
    compiled = model.generate(ids, 12, compile=True)
    assert torch.equal(compiled, eager)
    # a float16 cache: the graph reads it in half precision, as eager does
    eager = model.generate(ids, 12, cache_dtype="float16")
    assert torch.equal(model.generate(ids, 12, compile=True, cache_dtype="float16"), eager)
    assert "_compiled_decode" in model.__dict__ and "_compiled_decode" not in model.__getstate__()


def test_a_model_changed_after_compiling_gets_a_step_of_its_own() -> None:
    """Compiled steps run without dynamo's guards on module attributes and parameters; the
    model's `structure` digest, taken at each `decode_step` call, notices a changed model: MLPs
    re-bound with int8-packed weights (which none of the remaining guards sees) get a step of
    their own with eager's logits; unchanged, the model keeps its step and nothing is traced
    again."""
    from torch._dynamo.utils import counters

    from llmkit.generate import decode_step, structure
    from llmkit.registry import default_registry

    with pytest.warns(FallbackWarning):
        model = build("tiny-llama-3-8b", dtype="float32", seed=5)
    ids = torch.randint(0, model.spec.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))

    def logits(compile: bool) -> torch.Tensor:
        cache = model.new_cache(capacity=ids.shape[1] + 6)  # as generate's: the cache's guards pass
        model(ids, cache=cache, last_only=True)  # as generate calls both: no guard sees a difference
        return decode_step(model, compile)(ids[:, -1:].contiguous(), cache)

    assert torch.equal(model.generate(ids, 6, compile=True), model.generate(ids, 6))
    digest, step = model.__dict__["_compiled_decode"]
    frames = counters["frames"]["total"]
    assert decode_step(model, compile=True) is step and structure(model) == digest
    model.generate(ids, 6, compile=True)
    assert counters["frames"]["total"] == frames  # nothing traced again
    int8 = default_registry().target("cpu", dtype=torch.float32, quant="int8")
    for block in model.modules():
        if getattr(block, "kind", None) is not None and block.kind.name == "mlp":
            block.bind(block.impl, int8)  # packs the weights: the graph traced before reads the float ones
    assert structure(model) != digest
    torch.testing.assert_close(logits(True), logits(False), rtol=1e-4, atol=1e-4)
    assert model.__dict__["_compiled_decode"][1] is not step


def test_frames_below_a_graph_break_keep_their_guards_across_models() -> None:
    """The reference MoE impl's routing statistics (Python numbers) break the compiled step's graph,
    so dynamo compiles the frames below the break (a layer's forward) on their own, shared by every
    model: they keep their guards, and a float32 model compiled after a bfloat16 one of the same
    spec runs its own graphs (with the guards dropped, the bfloat16 graphs ran for it: other
    tokens, no error). The step's own model still loses its module guards."""
    from torch._dynamo.utils import counters

    from llmkit import generate as gen

    dropped = []
    real = gen._skip_step_model_guards
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(6))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "_skip_step_model_guards", lambda entries: dropped.extend(
            e.name for e, keep in zip(entries, real(entries)) if not keep) or real(entries))
        for dtype in ("bfloat16", "float32"):
            with pytest.warns(FallbackWarning):
                model = build("tiny-mixtral-8x7b", dtype=dtype, seed=6, impl={"moe": "reference"})
            breaks = sum(counters["graph_break"].values())
            assert torch.equal(model.generate(ids, 5, compile=True), model.generate(ids, 5)), dtype
            assert sum(counters["graph_break"].values()) > breaks
    assert dropped and all(name.startswith("decode_step_model") for name in dropped)

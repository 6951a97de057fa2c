"""Graph-capturable decoding: the fixed-shape KV cache (`FixedLayerCache`) and `generate(graphs=True)`.

A device graph (CUDA graphs, HPU graphs) records a decode step once and replays it: no Python runs
on replay, so every shape, slot and position must come from device state. The capture used here is
the CPU analogue: `make_fx` traces the step once on real tensors into an FX graph whose in-place
ops write the cache's own buffers, and every later step replays that graph without running the
model's Python. It must reproduce eager generation exactly over the fixed cache, and it does not
over the growing static cache (the negative control: the graph repeats the first step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import llmkit
from llmkit import LlmkitError
from llmkit.cache import FixedLayerCache, LayerCache, StaticLayerCache
from llmkit.errors import FallbackWarning
from llmkit.registry import default_registry


def _state(cache: list[LayerCache]) -> list[dict[str, torch.Tensor]]:
    out = []
    for c in cache:
        extra = {"filled": c.filled, "next": c.next_positions} if isinstance(c, FixedLayerCache) else {}
        out.append({**{k: v.clone() for k, v in c.tensors.items()}, "positions": c.positions.clone(),
                    **{k: v.clone() for k, v in extra.items()}})
    return out


def _restore(cache: list[LayerCache], saved: list[dict[str, torch.Tensor]]) -> None:
    for c, s in zip(cache, saved):
        for k, v in c.tensors.items():
            v.copy_(s[k])
        c.positions.copy_(s["positions"])
        if isinstance(c, FixedLayerCache):
            c.filled.copy_(s["filled"])
            c.next_positions.copy_(s["next"])


def fx_capture(step: Callable[..., torch.Tensor], tokens: torch.Tensor,
               cache: Any) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
    """Backend.capture_decode on the CPU: run the step, trace it once more (then undo what the
    trace wrote), and replay the traced graph for every later step."""
    first = step(tokens, cache).clone()
    saved = _state(cache)
    graph = make_fx(lambda t: step(t, cache))(tokens.clone())
    _restore(cache, saved)
    return first, lambda new_tokens, _cache: graph(new_tokens)


@pytest.fixture
def fx_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_registry().backend("cpu"), "capture_decode", fx_capture, raising=False)


def _prompts() -> list[list[int]]:
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    return [ids[0, :21].tolist(), ids[1, :17].tolist()]  # left-padded batch; longer than mistral's window 16


@pytest.mark.parametrize("preset", ["tiny-llama-3-8b", "tiny-mistral-7b-v0.1", "tiny-gemma-7b"])
def test_a_captured_decode_step_replays_every_later_step(preset: str, fx_backend: None) -> None:
    model = llmkit.build(preset, seed=3, policy="reference").eval()
    with torch.no_grad():
        want = model.generate(_prompts(), 10, eos=False)
        got = model.generate(_prompts(), 10, eos=False, graphs=True)
    assert torch.equal(got, want)


def test_replaying_over_the_growing_static_cache_repeats_the_first_step(fx_backend: None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # the negative control: the same capture over StaticLayerCache, whose length and positions
    # are host state, replays step 1's slot and position every time
    model = llmkit.build("tiny-llama-3-8b", seed=3, policy="reference").eval()
    inner = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda capacity=None, fixed=False, dtype=None: inner(capacity, dtype=dtype))
    with torch.no_grad():
        want = model.generate(_prompts(), 10, eos=False)
        got = model.generate(_prompts(), 10, eos=False, graphs=True)
    assert type(model.new_cache(8)[0]) is StaticLayerCache
    assert not torch.equal(got, want)


@pytest.mark.parametrize("preset, policy", [("tiny-llama-3-8b", None), ("tiny-mistral-7b-v0.1", None),
                                            ("tiny-mixtral-8x7b", None), ("tiny-deepseek-v3", "reference")])
def test_the_fixed_cache_gives_the_static_caches_logits(preset: str, policy: str | None) -> None:
    # eager steps through every impl, in float32 (in bf16, SDPA's masked and unmasked kernels differ by an ulp): prefill,
    # then single tokens, past the window; MLA caches its latent
    if policy is None:  # the cpu impls; embedding and layer have none there
        with pytest.warns(FallbackWarning):
            model = llmkit.build(preset, seed=3, dtype="float32").eval()
    else:
        model = llmkit.build(preset, seed=3, policy=policy, dtype="float32").eval()
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    logits = {}
    with torch.no_grad():
        for fixed in (False, True):
            cache = model.new_cache(capacity=30, fixed=fixed)
            steps = [model(ids[:, :19], cache=cache)]
            steps += [model(ids[:, i:i + 1], cache=cache) for i in range(19, 30)]
            logits[fixed] = torch.cat(steps, dim=1)
    assert (logits[True] - logits[False]).abs().max().item() <= 1e-5


def test_fixed_cache_slots_and_positions() -> None:
    # a window of 4 slots used as a ring; positions -1 mark empty slots; the returned keys are the
    # slots before this step followed by the new tokens
    cache = FixedLayerCache(capacity=10, max_tokens=4)
    k = torch.arange(6.0).view(1, 6, 1)
    full, pos = cache.extend(torch.arange(6).view(1, 6), k=k)
    assert pos.tolist() == [[-1, -1, -1, -1, 0, 1, 2, 3, 4, 5]] and full["k"].shape == (1, 10, 1)
    assert cache.positions.tolist() == [[4, 5, 2, 3]] and cache.tensors["k"].flatten().tolist() == [4, 5, 2, 3]
    assert int(cache.filled) == 6 and cache.next_positions.tolist() == [[6]] and len(cache) == 4
    _, pos = cache.extend(torch.tensor([[6]]), k=torch.tensor([[[6.0]]]))
    assert pos.tolist() == [[4, 5, 2, 3, 6]] and cache.positions.tolist() == [[4, 5, 6, 3]]
    whole = FixedLayerCache(capacity=3)
    whole.extend(torch.arange(3).view(1, 3), k=torch.zeros(1, 3, 1))
    with pytest.raises(LlmkitError, match="cache capacity 3 exceeded"):
        whole.extend(torch.tensor([[3]]), k=torch.zeros(1, 1, 1))


def test_graphs_are_refused_where_they_cannot_run() -> None:
    model = llmkit.build("tiny-llama-3-8b", seed=3, policy="reference").eval()
    with pytest.raises(LlmkitError, match="backend 'cpu' captures no decode graphs"):
        model.generate([[1, 2, 3]], 4, eos=False, graphs=True)
    with pytest.raises(LlmkitError, match="graphs and compile are two ways"):
        model.generate([[1, 2, 3]], 4, eos=False, graphs=True, compile=True)
    with pytest.raises(LlmkitError, match="a fixed-shape cache needs a capacity"):
        model.new_cache(fixed=True)

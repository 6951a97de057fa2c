"""Autoregressive generation: prefill, then one token per step through a preallocated KV cache.

Sampling per step, on the last position's logits (float32):
  temperature 0 -> argmax (greedy); otherwise logits / temperature, then top-k (keep the k largest),
  then top-p (keep the smallest set of tokens, by descending probability, whose probability sums to
  at least p; the most likely token is always kept), then a draw from the renormalised distribution
  with a generator seeded by `seed`.
Batched prompts of different lengths are left-padded; pad positions are -1, which attention never
attends to, and each row continues from its own last position. A row stops at an end-of-sequence
token or once its generated text contains a stop string (the stopping token is kept); finished rows
are filled with the pad id. Generation ends when every row has stopped or after max_new_tokens.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import os
import re
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import LlmkitError
from .target import parse_dtype


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists of different lengths -> ids [B, T] and positions [B, T] (-1 on padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LlmkitError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    positions = torch.full((len(prompts), width), -1, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        positions[row, width - len(p):] = torch.arange(len(p))
    return ids, positions


def sample(
    logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
    top_p: float | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, V] (see the module docstring for the rule)."""
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise LlmkitError(f"temperature must be >= 0, got {temperature}")
    logits = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise LlmkitError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise LlmkitError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_STEPS = itertools.count()


def structure(model: torch.nn.Module) -> str:
    """A digest of what a traced decode step bakes in from `model`: every module's type and
    attributes, and every parameter's and buffer's dtype, device, shape, strides and aliasing (not
    their values, which a compiled step reads at each call). Numbers, strings and flags count by
    value, containers by their items, functions by name and closure (a dtype cast keeps its
    dtypes there), anything else (configs, impls, targets, packed weights) by identity: rebinding
    an impl or re-packing a weight changes the digest. Tensors held in other attributes count by
    dtype, device, rank and aliasing only: impls keep per-call memos there (the cpu RoPE's tables
    of the last positions), which the traced step does not read; state a compiled step reads
    belongs in parameters, buffers, or attributes fixed when the impl is bound. A MoE block's
    `routing` (the statistics every moe@1 forward leaves for its caller, a new object each call)
    does not count: it would give the model a new digest, and so a new step to trace, at every
    `generate` call."""
    names: dict[int, str] = {}  # tensor id -> where it was first seen: tied weights alias

    def describe(value: Any, where: str, depth: int = 0) -> str:
        if isinstance(value, torch.Tensor):
            first = names.setdefault(id(value), where)
            if depth:  # an attribute's tensor, not a parameter or buffer
                return f"t({value.dtype},{value.device},{value.dim()},{first})"
            return (f"T({value.dtype},{value.device},{tuple(value.shape)},{value.stride()},"
                    f"{value.requires_grad},{first})")
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes, enum.Enum,
                                               torch.dtype, torch.device)):
            return repr(value)
        if isinstance(value, (list, tuple)) and depth < 4:
            return f"{type(value).__name__}(" + ",".join(describe(v, f"{where}[{i}]", depth + 1)
                                                          for i, v in enumerate(value)) + ")"
        if isinstance(value, dict) and depth < 4:
            return "{" + ",".join(f"{k!r}:{describe(v, f'{where}[{k!r}]', depth + 1)}" for k, v in value.items()) + "}"
        if isinstance(value, types.MethodType):
            return f"method@{id(value.__self__)} " + describe(value.__func__, where, depth + 1)
        if isinstance(value, types.FunctionType) and depth < 4:
            cells = [describe(c.cell_contents, f"{where}.<closure>", depth + 1) for c in value.__closure__ or ()]
            return f"{value.__module__}.{value.__qualname__}[{','.join(cells)}]"
        return f"{type(value).__module__}.{type(value).__qualname__}@{id(value)}"

    parts = []
    for name, module in model.named_modules():
        attributes = {k: v for k, v in module.__dict__.items()
                      if k not in ("_parameters", "_buffers", "_modules", "_compiled_decode", "routing")}
        tensors = {**module._parameters, **module._buffers}
        parts.append(f"{name}@{id(module)}:"
                     + ",".join(f"{k}={describe(t, f'{name}.{k}')}" for k, t in tensors.items())
                     + describe(attributes, name))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@torch.no_grad()
def decode_step(model: Any, compile: bool = False) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """`step(tokens [B, 1], cache) -> logits [B, 1, vocab]`: one decode step over the model's cache.

    With `compile`, the step is `torch.compile`d (dynamic shapes: the cache length grows every
    step without recompiling) and kept on the model: the per-token Python and dispatch cost of
    hundreds of small ops becomes one graph. The first call compiles (tens of seconds on a small
    CPU; inductor's cache, in $TORCHINDUCTOR_CACHE_DIR, default $XDG_CACHE_HOME/llmkit/inductor,
    makes later processes faster). Impls keep data-dependent branches out of the traced path
    (`torch.compiler.is_compiling()`), so the graph does not break on them.

    Dynamo would check every module attribute and parameter before every step (3.6 ms of a
    20 ms profiled SmolLM2 w4a8 step, AVX2 VM). The guards on the step's own model are dropped
    (`_skip_step_model_guards`, 1.5 ms left: the cache's) and the model is checked once per call
    of this function instead, by its `structure` digest: a model changed since its step was
    compiled (`.to(dtype)`, re-bound impls, re-packed weights) gets a new one, with a code object
    of its own (dynamo keeps compiled code per code object). So the returned step is for the model
    as it is now: after changing the model, call `decode_step` (or `generate`, which calls it)
    again. Where the graph breaks inside the model (an impl's data-dependent branch), dynamo
    compiles the frames below the break on their own; those keep their guards.
    """
    decode_step_model = model  # the name `_skip_step_model_guards` knows the step's model by

    def step(tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        with torch.no_grad():  # inside the traced function, so the compiled graph is inference-only
            return decode_step_model(tokens, cache=cache, last_only=True)

    if not compile:
        return step
    digest = structure(model)
    held = model.__dict__.get("_compiled_decode")
    if held is None or held[0] != digest:
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_home / "llmkit" / "inductor"))
        fresh = types.FunctionType(step.__code__.replace(co_name=f"decode_step_{next(_STEPS)}"),
                                   step.__globals__, closure=step.__closure__)
        held = model.__dict__["_compiled_decode"] = (digest, torch.compile(
            fresh, dynamic=True, options={"guard_filter_fn": _skip_step_model_guards}))
    return held[1]


_STEP_MODEL = re.compile(r"(?<![\w.'])decode_step_model\b")


def _skip_step_model_guards(entries: Sequence[Any]) -> list[bool]:
    """Dynamo's `guard_filter_fn` for a compiled decode step: keep every guard but those on a
    module reached from the step's model (`decode_step_model`, a closure variable of the step's
    own code object). A frame below a graph break inside the model is compiled on its own, its
    module a local (`block` in a layer's forward); that code object is shared by every model in
    the process, so its guards stay: without them (`skip_guard_on_all_nn_modules_unsafe`) the
    graph traced for one model's MoE layers ran for the next model's (a bfloat16 model's for a
    float32 one's: other tokens, no error)."""
    return [not (entry.orig_guard.source.is_unspecialized_nn_module() and _STEP_MODEL.search(entry.name))
            for entry in entries]


def _graph_backend(model: Any) -> Any:
    """The backend whose `capture_decode` records the decode graph: the model's plan's."""
    from .registry import default_registry

    if getattr(model, "plan", None) is None:
        raise LlmkitError("graphs=True needs a built model (its plan names the backend that captures the graph)")
    if getattr(model, "parallel_plan", None):
        raise LlmkitError("graphs=True runs one process: a sharded model's collectives are not captured")
    return default_registry().backend(model.plan.target.backend)


@torch.no_grad()  # generation is not differentiable; with autograd on, a prefill would record its graph
def generate(
    model: Any,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    eos: bool = True,
    attention_mask: torch.Tensor | None = None,
    stream: Callable[[torch.Tensor], None] | None = None,
    stats: dict[str, Any] | None = None,
    compile: bool = False,
    graphs: bool = False,
    cache_dtype: torch.dtype | str | None = None,
) -> torch.Tensor:
    """Continue prompts; returns ids [B, T + n] with n <= max_new_tokens generated tokens.

    `input_ids` is a LongTensor [B, T] (with `attention_mask` [B, T], 0 on left padding) or a list
    of token-id lists of any lengths. `eos=False` ignores end-of-sequence tokens. `stop` strings
    need the model's tokenizer. `stream(tokens [B])` is called after every step; `stats`, if a dict,
    receives prompt_tokens, generated_tokens, prefill_s and decode_s. `compile=True` runs the decode
    steps through `torch.compile` (see `decode_step`). `graphs=True` keeps the KV cache in one
    fixed shape with its state on the device (`FixedLayerCache`) and has the model's backend
    capture the decode step once and replay it (`Backend.capture_decode`: CUDA graphs, HPU graphs).
    `cache_dtype` (e.g. "float16") stores the KV cache in that dtype (`llmkit.cache.LayerCache`).
    """
    if max_new_tokens < 0:
        raise LlmkitError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    tokenizer = getattr(model, "tokenizer", None)
    if stop and tokenizer is None:
        raise LlmkitError("stop strings need a tokenizer; this model has none")
    eos_ids = sorted(tokenizer.eos_ids) if (eos and tokenizer is not None) else []
    pad_id = eos_ids[0] if eos_ids else 0
    device = model.embedding.weight.device

    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.to(device=device, dtype=torch.long)
        if ids.dim() != 2:
            raise LlmkitError(f"input_ids must be [batch, tokens], got shape {tuple(ids.shape)}")
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
        positions = torch.where(mask, mask.long().cumsum(dim=1) - 1, torch.full_like(ids, -1))
    else:
        ids, positions = left_pad(input_ids, pad_id)
        ids, positions = ids.to(device), positions.to(device)
    batch, prompt_len = ids.shape
    if graphs and compile:
        raise LlmkitError("graphs and compile are two ways of running the decode step: choose one")
    replay = _graph_backend(model) if graphs else None
    if cache_dtype is not None:
        cache_dtype = parse_dtype(cache_dtype, "KV cache dtype")
    cache = model.new_cache(capacity=prompt_len + max_new_tokens, fixed=graphs, dtype=cache_dtype)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    start = time.perf_counter()
    logits = model(ids, positions, cache, last_only=True)[:, -1]
    prefill_s = time.perf_counter() - start
    step_fn = decode_step(model, compile)
    out = [ids]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    eos_tensor = torch.tensor(eos_ids, device=device, dtype=torch.long)
    start = time.perf_counter()
    for step in range(max_new_tokens):
        if step == 1 and replay is not None:
            captured = replay.capture_decode(step_fn, out[-1], cache)
            if captured is None:
                raise LlmkitError(f"backend {replay.name!r} captures no decode graphs (Backend.capture_decode)")
            first, step_fn = captured
            logits = first[:, -1]
        elif step:
            logits = step_fn(out[-1], cache)[:, -1]
        token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out.append(token[:, None])
        if stream is not None:
            stream(token)
        if eos_ids:
            done |= torch.isin(token, eos_tensor)
        if stop:
            generated = torch.cat(out[1:], dim=1)
            for row in range(batch):
                if not done[row]:
                    text = tokenizer.decode(generated[row].tolist(), skip_special_tokens=False)
                    done[row] = any(s in text for s in stop)
        if bool(done.all()):
            break
    decode_s = time.perf_counter() - start
    result = torch.cat(out, dim=1)
    if stats is not None:
        n_new = result.shape[1] - prompt_len
        stats.update(prompt_tokens=int((positions >= 0).sum()), generated_tokens=n_new * batch,
                     prefill_s=prefill_s, decode_s=decode_s)
    return result

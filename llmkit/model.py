"""The assembled model and `build`: spec -> modules -> resolved, bound impls.

    h = embedding(ids); for each layer: h = layer(h, positions, cache); logits = head(norm(h))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .assembly import Block, assemble
from .cache import FixedLayerCache, LayerCache, StaticLayerCache
from .errors import LlmkitError
from .plan import Plan
from .registry import Registry, default_registry
from .resolve import Selection
from .spec import Spec, load_spec
from .target import parse_dtype


class Model(nn.Module):
    """A decoder-only LM assembled from a `Spec`; the same type whatever the weights' origin."""

    def __init__(
        self,
        spec: Spec,
        registry: Registry,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        dtypes = {k: parse_dtype(v) for k, v in spec.dtypes.items()}
        kw: dict[str, Any] = {"device": device, "dtype": dtype, "generator": generator, "dtypes": dtypes}
        self.spec = spec
        self.plan: Plan | None = None
        self.parallel_plan: list[str] = []  # what this rank runs, when sharded (llmkit.parallel)
        self.tokenizer: Any = None  # set by llmkit.load when the checkpoint carries one
        self.source: str | None = None
        self.embedding = Block(registry.kind("embedding"), spec.embedding, **kw)
        layer_kind = registry.kind("layer")
        self.layers = nn.ModuleList(Block(layer_kind, cfg, **kw) for cfg in spec.layers)
        self.norm = Block(registry.kind("norm"), spec.final_norm, **kw)
        self.head = Block(registry.kind("head"), spec.head, **kw)

    def new_cache(self, capacity: int | None = None, *, fixed: bool = False,
                  dtype: torch.dtype | None = None) -> list[LayerCache]:
        """One empty cache per layer; a sliding-window layer's keeps only its window. With
        `capacity` (tokens in all) the storage is allocated once (`StaticLayerCache`); with
        `fixed` too, every step has the same shapes and the fill state stays on the device
        (`FixedLayerCache`: what a captured, replayed decode graph needs). `dtype` stores the
        cached keys and values in that dtype (`LayerCache`: e.g. float16, as llama.cpp does)."""
        windows = [getattr(layer.config.attention, "window", None) for layer in self.layers]
        if capacity is None:
            if fixed:
                raise LlmkitError("a fixed-shape cache needs a capacity")
            return [LayerCache(max_tokens=w, dtype=dtype) for w in windows]
        if fixed:
            return [FixedLayerCache(capacity, max_tokens=w, dtype=dtype) for w in windows]
        return [StaticLayerCache(capacity, max_tokens=w, dtype=dtype) for w in windows]

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, vocab] ([B, 1, vocab] with `last_only`: the head runs on the
        last position only, what generation needs). Positions ([T] or [B, T]; negative = padding)
        default to 0..T-1, or to continuing each row of the cache."""
        if positions is None:
            steps = torch.arange(ids.shape[1], device=ids.device)
            if cache and isinstance(cache[0], FixedLayerCache) and len(cache[0]):
                positions = cache[0].next_positions + steps  # device state: nothing read on the host
            elif cache and len(cache[0]):
                positions = cache[0].positions[:, len(cache[0]) - 1:len(cache[0])] + 1 + steps
            else:
                positions = steps
        h = self.embedding(ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, cache[i] if cache is not None else None)
        h = self.norm(h[:, -1:] if last_only else h)
        return self.head(h, self.embedding.weight) if self.spec.tied else self.head(h)

    def __getstate__(self) -> dict[str, Any]:
        # a compiled decode step (generate(compile=True)) is a cache of this process, not state
        state = super().__getstate__()
        state.pop("_compiled_decode", None)
        return state

    def generate(self, input_ids: Any, max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:
        """Continue `input_ids` (see `llmkit.generate.generate` for the options)."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)


QUANTISABLE = ("attention", "mla", "mlp", "moe", "head")


def check_quant(model: Model, quant: str | None) -> None:
    """Warn, naming them, about blocks with linear weights that the chosen impls left unquantised.

    Weight-only quantisation is an impl's business (its `prepare` packs the weights and sets
    `block.quantized`); a block whose impl does not support it runs in the model's dtype."""
    if quant is None:
        return
    from .assembly import Block
    from .errors import FallbackWarning

    left = {}
    for name, m in model.named_modules():
        if isinstance(m, Block) and m.kind.name in QUANTISABLE and getattr(m, "quantized", None) != quant:
            left.setdefault(f"{m.kind.id} ({m.impl.qualname})", []).append(name)
    if left:
        import warnings

        warnings.warn(FallbackWarning(
            f"quant={quant}: {sum(map(len, left.values()))} blocks stay in the model's dtype, their impls do not "
            "quantise: " + "; ".join(f"{k} x{len(v)}, e.g. {v[0]}" for k, v in sorted(left.items()))), stacklevel=3)


def _merge_selection(spec: Spec, policy: str | None, impl: Any, deny: Any, strict: bool, certs: Any) -> Selection:
    """The spec's selection under the caller's: the caller's policy (else the spec's, else auto;
    `strict` counts as asking for one), pins winning per kind, denials added, certificate paths
    replacing the spec's."""
    from_spec = Selection.make(impl=spec.impl, deny=spec.deny)
    if policy is None and not strict:
        policy = spec.policy
    from_call = Selection.make(policy or "auto", impl, deny, strict=strict, certs=certs)
    pins = dict(from_spec.pins) | dict(from_call.pins)
    return Selection(from_call.policy, tuple(sorted(pins.items())), tuple(sorted(set(from_spec.deny + from_call.deny))),
                     from_call.certs if from_call.certs is not None else spec.certs)


def build(
    spec: Spec | str | Mapping[str, Any],
    *,
    backend: str = "cpu",
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    policy: str | None = None,
    mode: str = "infer",
    impl: Mapping[str, str] | Iterable[str] | None = None,
    deny: Mapping[str, Any] | Iterable[str] | None = None,
    strict: bool = False,
    certs: Iterable[str | Path] | str | Path | None = None,
    seed: int = 0,
    facts: Mapping[str, Any] | None = None,
    quant: str | None = None,
    parallel: Any = None,
    registry: Registry | None = None,
) -> Model:
    """Build a randomly initialised (seeded) model from a spec, a preset name or a YAML path.

    `device="meta"` builds without allocating (for inspection and planning). The dispatch plan is
    `model.plan`. dtype defaults to the spec's, else float32; policy to the spec's, else "auto".
    `policy="certified"` runs only impls with a passing, valid certificate for this environment,
    read from `certs` (files or directories; default: the spec's, else `certificate.cert_dir()`).
    `quant` ("int8", "int4", "w4a8", "fp16" on the cpu backend) asks the impls to pack their linear
    weights in that format; blocks whose impl does not are named in a warning, and an impl that
    does not know the mode refuses it. `parallel` ({"tp": 2, "ep": 2}; inside a torchrun-launched
    process) shards the model across the process group (`llmkit.parallel`); `model.parallel_plan`
    says what this rank runs.
    """
    registry = registry or default_registry()
    if not isinstance(spec, Spec):
        spec = load_spec(spec, registry)
    layout = check_parallel(spec, parallel)
    dt = parse_dtype(dtype or spec.dtype or torch.float32)
    target = registry.target(backend, device=device, dtype=dt, mode=mode, facts=facts, quant=quant)
    selection = _merge_selection(spec, policy, impl, deny, strict, certs)
    generator = None if target.device == "meta" else torch.Generator(device=target.device).manual_seed(seed)
    model = Model(spec, registry, device=target.device, dtype=dt, generator=generator)
    model.plan = assemble(model, target, selection, registry)
    check_quant(model, None if target.device == "meta" else quant)
    apply_parallel(model, layout, registry.backend(backend))
    return model.train(mode == "train")


def check_parallel(spec: Spec, parallel: Any) -> Any:
    """The layout (the caller's `parallel` key by key over the spec's), refused with every reason
    before any process-group work; None when trivial."""
    from .parallel import Parallel, env_world, layout_reasons

    if not isinstance(parallel, Parallel):
        # the caller's keys over the spec's
        parallel = {**(spec.parallel or {}), **(parallel or {})}
    layout = Parallel.make(parallel)
    if layout.trivial:
        return None
    world = env_world()
    reasons = layout_reasons(spec, layout, world)
    if reasons:
        raise LlmkitError(f"parallel layout {layout} refused for {spec.name}: " + "; ".join(reasons))
    if world is None:
        raise LlmkitError(f"parallel layout {layout} needs {layout.world} processes: launch with torchrun "
                          f"(torchrun --nproc-per-node {layout.world} -m llmkit ...) or initialise torch.distributed")
    return layout


def apply_parallel(model: Model, layout: Any, backend: Any) -> None:
    if layout is None:
        return
    from . import parallel

    parallel.init(backend.dist_backend)
    model.parallel_plan = parallel.shard(model, layout)

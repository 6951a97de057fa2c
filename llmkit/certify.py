"""`llmkit certify`: the precision and performance suite a vendor runs once per backend.

For every impl of the backend (or the reference impls, `--backend reference`), cases come from
three suites, all recorded in the certificate:
- closed: the block configs of the shipped `tiny-` presets (each preset's structure at toy size,
  the scale recorded per preset), with prefill, decode and skewed-routing shapes;
- edge: each kind's edge configs (`KindCases.edges`): odd lengths, head dims 64-256, GQA ratios,
  window and flash-chunk boundaries, positions near 2^15/2^16, routing ties;
- open: hypothesis-drawn configs (`KindCases.strategy`) under a recorded seed.

Each case runs for every requested dtype and mode. A case the impl does not claim (its declared
capabilities or `not_supported_reasons` reject it) is "unsupported" with the reasons; a claimed case
must pass the precision rule (DESIGN.md): inputs drawn in float64 and rounded to the storage dtype,
the float64 reference on exactly those values, the reference impl in the storage dtype as the naive
baseline; pass iff e_max <= k * e_naive + floor (k = 2 forward, 3 backward, floor = 2 ulps of the
output's largest magnitude, 16 in float64), no NaN/Inf where the reference is finite, discrete choices (MoE top-k)
equal except at near-ties, and the impl under test actually ran (call count, output device). A
crash on a claimed case fails it. Passing cases are timed (backend timer, median and IQR) against
the reference impl on the same inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from . import certificate as certs
from .assembly import Block
from .cache import LayerCache
from .certificate import Case, Certificate, CertificateError, ModelCase, Perf, Precision
from .errors import LlmkitError
from .impls import MODES, REFERENCE, Impl
from .kinds import BlockKind, Sample, Shape
from .registry import Registry, reference_impl
from .target import Target, dtype_name, parse_dtype

SUITE_VERSION = 1
K_FORWARD, K_BACKWARD = 2.0, 3.0
FLOOR_ULPS = 2
# In float64 the naive baseline is the float64 reference itself (e_naive = 0 by construction), so
# the floor alone absorbs a different but exact summation order, which grows with the reduction
# length: 16 ulps (3.6e-15 relative) covers head dims to 256 and contexts of thousands.
FLOOR_ULPS_FLOAT64 = 16
NOISY = 0.10
SUSPECT_SPEEDUP = 10.0
DTYPES = ("float32", "bfloat16", "float16", "float64")
QUICK_DTYPES = ("float32", "bfloat16")
QUICK_PRESETS = ("tiny-llama-3-8b", "tiny-mixtral-8x7b", "tiny-grok-1", "tiny-deepseek-v3", "tiny-gemma-7b")


@dataclass(frozen=True)
class Planned:
    """One case before it runs: which impl, which config and shape, where the config came from."""

    impl: Impl
    kind: BlockKind
    suite: str
    origin: str
    config: BaseModel
    shape: Shape
    dtype: str
    mode: str

    @property
    def id(self) -> str:
        digest = hashlib.sha256(_config_json(self.config).encode()).hexdigest()[:10]
        return f"{self.kind.id}/{self.impl.qualname}/{self.suite}/{digest}/{self.shape.label}/{self.dtype}/{self.mode}"


def _config_json(config: BaseModel) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


# --- the suite -----------------------------------------------------------------------------------

def _preset_configs(registry: Registry, names: Iterable[str]) -> list[tuple[str, BlockKind, BaseModel]]:
    """(origin, kind, config) of every distinct block config in the given presets, in model order."""
    from .model import build

    # the configs do not depend on the backend: any registered one can hold the meta-device build
    host = next(iter(registry.backends), None)
    if host is None:
        raise LlmkitError("no device backend is registered: the closed suite's presets cannot be built")
    seen: set[tuple[str, str]] = set()
    out = []
    for name in names:
        model = build(name, backend=host, device="meta", policy="reference", registry=registry)
        for path, m in model.named_modules():
            if not isinstance(m, Block):
                continue
            key = (m.kind.id, _config_json(m.config))
            if key in seen:
                continue
            seen.add(key)
            out.append((f"{name} {path}", registry.kind(m.kind.id), m.config))
    return out


def preset_scale(names: Iterable[str]) -> str:
    """How the closed suite's tiny presets relate to the full models (d_model ratio per preset)."""
    from .spec import load_spec

    parts = []
    for name in names:
        tiny, full = load_spec(name), load_spec(name.removeprefix("tiny-"))
        parts.append(f"{name}: d_model {tiny.d_model}/{full.d_model}")
    return "tiny- presets (same structure, toy sizes): " + ", ".join(parts)


def _closed_presets(quick: bool) -> list[str]:
    from .spec import preset_names

    return list(QUICK_PRESETS) if quick else [n for n in preset_names() if n.startswith("tiny-")]


def _hypothesis_configs(kind: BlockKind, seed: int, n: int) -> list[dict[str, Any]]:
    """`n` configs drawn by the kind's hypothesis strategy, reproducible from `seed`."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    drawn: list[dict[str, Any]] = []

    @hseed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def collect(data: Any) -> None:
        config = kind.cases.strategy(data)
        try:
            kind.parse_config(config)
        except ValueError:
            return
        if config not in drawn:
            drawn.append(config)

    collect()
    return drawn[:n]


def plan_cases(
    registry: Registry,
    impls: list[Impl],
    *,
    dtypes: Iterable[str],
    modes: Iterable[str] = ("infer", "train"),
    quick: bool = False,
    seed: int = 0,
) -> list[Planned]:
    """Every case of the suite for `impls`, in a fixed order (so a resumed run lines up)."""
    dtypes, modes = list(dtypes), list(modes)
    kinds = {i.kind for i in impls}
    presets = _closed_presets(quick)
    closed: dict[str, list[tuple[str, BaseModel, list[Shape]]]] = {k: [] for k in kinds}
    for origin, kind, config in _preset_configs(registry, presets):
        if kind.id in kinds and kind.cases is not None:
            shapes = kind.cases.shapes(config, quick) if kind.cases.shapes else [Shape()]
            closed[kind.id].append((origin, config, shapes))
    out: list[Planned] = []
    for impl in impls:
        kind = registry.kind(impl.kind)
        if kind.cases is None:
            continue
        groups: list[tuple[str, str, BaseModel, list[Shape]]] = [("closed", o, c, s) for o, c, s in closed[kind.id]]
        edges = kind.cases.edges()
        for label, data, shapes in edges[:3] if quick else edges:
            groups.append(("edge", f"edge: {label}", kind.parse_config(data), shapes[:2] if quick else shapes))
        if kind.cases.strategy is not None:
            kseed = seed * 1_000_003 + int(hashlib.sha256(kind.id.encode()).hexdigest()[:6], 16)
            for i, data in enumerate(_hypothesis_configs(kind, kseed, 2 if quick else 8)):
                shapes = kind.cases.shapes(kind.parse_config(data), True) if kind.cases.shapes else [Shape()]
                groups.append(("open", f"hypothesis seed {kseed} #{i}", kind.parse_config(data), shapes))
        for suite, origin, config, shapes in groups:
            for shape in shapes:
                for dt in dtypes:
                    for mode in modes:
                        if mode == "train" and quick and mode not in impl.modes:
                            continue  # quick runs skip the unclaimed-train rows (pure claim checks)
                        out.append(Planned(impl, kind, suite, origin, config, shape, dt, mode))
    return out


def suite_hash(cases: list[Planned]) -> str:
    text = "\n".join(f"{c.id} {_config_json(c.config)}" for c in cases)
    return "sha256:" + hashlib.sha256(f"suite {SUITE_VERSION}\n{text}".encode()).hexdigest()


# --- running one case ----------------------------------------------------------------------------

def _block(kind: BlockKind, config: BaseModel, master: Block, dtype: torch.dtype, device: str) -> Block:
    b = Block(kind, config, dtype=dtype, device=device)
    with torch.no_grad():
        for (name, t), (_, src) in zip(_state(b), _state(master)):
            t.copy_(src)
    return b.eval()


def _state(block: Block) -> list[tuple[str, torch.Tensor]]:
    return [*block.named_parameters(), *block.named_buffers()]


def _round(value: Any, dtype: torch.dtype, device: str) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype).to(device)
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return value


def _counting(impl: Impl) -> tuple[Impl, list[int]]:
    count = [0]

    @functools.wraps(impl.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return impl.forward(*args, **kwargs)

    return dataclasses.replace(impl, forward=forward), count


def _run(block: Block, sample: Sample, args: list[tuple[Any, ...]]) -> list[torch.Tensor]:
    cache = LayerCache() if sample.cache else None
    outs = []
    for call in args:
        outs.append(block(*call, cache) if sample.cache else block(*call))
    return outs


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _precision(got: torch.Tensor, naive: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
               k: float, keep: torch.Tensor | None = None) -> Precision:
    got, naive, exact = got.double().cpu(), naive.double().cpu(), exact.double().cpu()
    finite = torch.isfinite(exact)
    nonfinite = int((~torch.isfinite(got) & finite).sum())
    mask = finite if keep is None else finite & keep.cpu()
    err = (got - exact).abs()[mask & torch.isfinite(got)]
    e_naive_t = (naive - exact).abs()[mask & torch.isfinite(naive)]
    e_max = float(err.max()) if err.numel() else 0.0
    e_mean = float(err.mean()) if err.numel() else 0.0
    e_naive = float(e_naive_t.max()) if e_naive_t.numel() else 0.0
    scale = float(exact[finite].abs().max()) if finite.any() else 0.0
    ulps = FLOOR_ULPS_FLOAT64 if dtype == torch.float64 else FLOOR_ULPS
    floor = ulps * torch.finfo(dtype).eps * max(scale, 1e-30)
    return Precision(
        e_max=e_max, e_mean=e_mean, e_naive=e_naive, ratio=e_max / e_naive if e_naive > 0 else None,
        threshold=k * e_naive + floor, k=k, floor=floor, nonfinite=nonfinite,
    )


def _passes(p: Precision) -> bool:
    return p.nonfinite == 0 and p.e_max <= p.threshold and p.discrete_mismatches == 0


def _choices(exact: tuple[torch.Tensor, torch.Tensor], naive: tuple[torch.Tensor, torch.Tensor],
             got: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[int, int, torch.Tensor]:
    """(mismatches outside near-ties, near-tie mismatches, tokens to leave out of the error).

    A token's choice may differ from the float64 reference's only where the reference's k-th and
    (k+1)-th scores are within the naive error band (DESIGN.md, rule 5); such tokens (and those
    where the naive baseline chose differently) are compared on their other outputs only.
    """
    sel_exact, scores = exact[0].cpu(), exact[1].detach().double().cpu()
    sel_naive, naive_scores = naive[0].cpu(), naive[1].detach().double().cpu()
    finite = torch.isfinite(scores) & torch.isfinite(naive_scores)
    band = float((naive_scores - scores).abs()[finite].max()) if finite.any() else 0.0
    band = 2 * band + FLOOR_ULPS * torch.finfo(dtype).eps
    top = scores.topk(min(top_k + 1, scores.shape[-1]), dim=-1).values
    gap = (top[:, top_k - 1] - top[:, top_k]) if top.shape[-1] > top_k else torch.full((scores.shape[0],), math.inf)
    near = gap <= band
    differs = (sel_exact.sort(-1).values != got.cpu().sort(-1).values).any(-1)
    naive_differs = (sel_exact.sort(-1).values != sel_naive.sort(-1).values).any(-1)
    mismatches = int((differs & ~near).sum())
    return mismatches, int((differs & near).sum()), differs | naive_differs


def _forward_and_backward(block: Block, sample: Sample, args: list[tuple[Any, ...]], cot: torch.Tensor | None,
                          train: bool) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Output (flattened over calls), gradients (inputs then state, flattened) and the block's
    choices after its last call."""
    if not train:
        with torch.no_grad():
            outs = _run(block, sample, args)
        choice = sample.choices(block, args[-1]) if sample.choices else None
        return _flat(outs), None, choice
    leaves = [a for call in args for a in call if isinstance(a, torch.Tensor) and a.is_floating_point()]
    for a in leaves:
        a.requires_grad_(True)
    params = [p for _, p in block.named_parameters() if p.is_floating_point()]
    outs = _run(block, sample, args)
    out = _flat(outs)
    (out * cot.to(device=out.device, dtype=out.dtype)).sum().backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (*leaves, *params)]
    with torch.no_grad():
        choice = sample.choices(block, args[-1]) if sample.choices else None
    return out.detach(), _flat(grads).detach(), choice


class CaseRunner:
    """Runs planned cases on one target device, with the backend's timer for the performance part."""

    def __init__(self, registry: Registry, backend: str, device: str, *, seed: int = 0, perf: bool = True,
                 quick: bool = False) -> None:
        self.registry, self.backend, self.device = registry, backend, device
        self.seed, self.perf, self.quick = seed, perf, quick
        self.peaks: dict[str, dict[str, Any]] = {}

    def target(self, dtype: str, mode: str) -> Target:
        return self.registry.target(self.backend, device=self.device, dtype=dtype, mode=mode)

    def peak(self, dtype: str) -> dict[str, Any] | None:
        if dtype not in self.peaks:
            p = self.registry.backend(self.backend).peak(self.device, parse_dtype(dtype))
            self.peaks[dtype] = {} if p is None else {
                "flops_per_s": p.flops_per_s, "bytes_per_s": p.bytes_per_s, "source": p.source}
        return self.peaks[dtype] or None

    def run(self, case: Planned) -> Case:
        base = {
            "id": case.id, "impl": case.impl.qualname, "kind": case.kind.id, "suite": case.suite,
            "origin": case.origin, "config": case.config.model_dump(mode="json"), "shape": case.shape.to_dict(),
            "dtype": case.dtype, "mode": case.mode,
        }
        target = self.target(case.dtype, case.mode)
        reasons = case.impl.reasons(case.config, case.kind.required_features(case.config), target)
        if reasons:
            broken = [r for r in reasons if r.startswith("not_supported_reasons raised")]
            if broken:  # the claim logic itself crashed: a failure, not a clean refusal
                return Case(**base, status="fail", reasons=broken)
            return Case(**base, status="unsupported", reasons=reasons)
        try:
            return self._run_claimed(case, target, base)
        except Exception as exc:  # a claimed case that crashes fails the claim
            return Case(**base, status="fail", reasons=[f"raised {type(exc).__name__}: {exc}"])

    def _seed(self, case: Planned, salt: int = 0) -> int:
        digest = hashlib.sha256(f"{self.seed} {salt} {_config_json(case.config)} {case.shape}".encode()).hexdigest()
        return int(digest[:12], 16)

    def _build(self, case: Planned, target: Target, seed: int) -> tuple[Block, Block, Block, Sample, list[int]]:
        from .testing import randomize

        kind, config, dtype = case.kind, case.config, target.dtype
        g = torch.Generator().manual_seed(seed)
        master = randomize(Block(kind, config, dtype=torch.float64), seed=seed)
        sample = kind.cases.sample(config, case.shape, g)
        if sample.setup is not None:
            sample.setup(master)
        exact = _block(kind, config, master, torch.float64, "cpu")
        naive = _block(kind, config, master, dtype, self.device)
        under = _block(kind, config, master, dtype, self.device)
        ref_target = self.registry.target(self.backend, device=self.device, dtype=torch.float64, mode=case.mode)
        for b, t in ((exact, ref_target), (naive, target), (under, target)):
            for m in b.modules():
                if isinstance(m, Block):
                    m.bind(reference_impl(m.kind), t if m is not exact else ref_target)
        counted, count = _counting(case.impl)
        under.bind(counted, target)
        return exact, naive, under, sample, count

    def _run_claimed(self, case: Planned, target: Target, base: dict[str, Any]) -> Case:
        dtype = target.dtype
        seed = self._seed(case)
        exact, naive, under, sample, count = self._build(case, target, seed)
        rounded = [tuple(_round(a, dtype, self.device) for a in call) for call in sample.calls]
        as64 = [tuple(_round(a, torch.float64, "cpu") for a in call) for call in rounded]
        train = case.mode == "train"
        cot = None
        if train:
            with torch.no_grad():
                n = _flat(_run(exact, sample, as64)).numel()
            g = torch.Generator().manual_seed(seed + 1)
            cot = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).double()
        fresh = lambda calls: [tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in c) for c in calls]  # noqa: E731
        out_x, grad_x, ch_x = _forward_and_backward(exact, sample, fresh(as64), cot, train)
        out_n, grad_n, ch_n = _forward_and_backward(naive, sample, fresh(rounded), cot, train)
        out_u, grad_u, ch_u = _forward_and_backward(under, sample, fresh(rounded), cot, train)
        reasons: list[str] = []
        if count[0] == 0:
            reasons.append(f"{case.impl.qualname} never ran (calls counted: 0): a silent fallback")
        if out_u.device.type != torch.device(self.device).type or out_u.dtype != dtype:
            reasons.append(f"output on {out_u.device} in {dtype_name(out_u.dtype)}, expected "
                           f"{self.device} in {dtype_name(dtype)}")
        if out_u.shape != out_x.shape:
            raise LlmkitError(f"output has {out_u.numel()} values, the reference {out_x.numel()}")
        keep = None
        mism = ties = 0
        if ch_x is not None and ch_u is not None:
            top_k = ch_x[0].shape[-1]
            mism, ties, skip = _choices(ch_x, ch_n, ch_u[0], top_k, dtype)
            per_token = out_x.numel() // skip.numel()
            keep = (~skip).repeat_interleave(per_token)
            if mism:
                reasons.append(f"{mism} routing choice(s) differ from the float64 reference outside a near-tie")
        fwd = _precision(out_u, out_n, out_x, dtype, K_FORWARD, keep)
        fwd = fwd.model_copy(update={"discrete_mismatches": mism, "near_ties": ties})
        bwd = None
        if train:
            bwd = _precision(grad_u, grad_n, grad_x, dtype, K_BACKWARD)
        for name, p in (("forward", fwd), ("backward", bwd)):
            if p is None:
                continue
            if p.nonfinite:
                reasons.append(f"{name}: {p.nonfinite} NaN/Inf value(s) where the reference is finite")
            if p.e_max > p.threshold:
                reasons.append(f"{name}: e_max {p.e_max:.3g} > {p.k:g} * e_naive {p.e_naive:.3g} + floor {p.floor:.3g}")
        status = "fail" if reasons else "pass"
        perf = None
        if status == "pass" and self.perf:
            perf = self._perf(case, target, under, naive, sample, rounded)
        return Case(**base, status=status, reasons=reasons, forward=fwd, backward=bwd, calls=count[0], perf=perf)

    # --- performance ---

    def _time(self, block: Block, sample: Sample, calls: list[tuple[Any, ...]]) -> Any:
        backend = self.registry.backend(self.backend)
        timed, prefix = calls[-1], calls[:-1]
        cache = LayerCache() if sample.cache else None
        with torch.no_grad():
            for call in prefix:
                block(*call, cache)
        saved = (dict(cache.tensors), cache.positions) if cache is not None else None

        def step() -> None:
            if cache is not None:
                cache.tensors, cache.positions = dict(saved[0]), saved[1]
                block(*timed, cache)
            else:
                block(*timed)

        with torch.no_grad():
            probe = backend.time(step, self.device, warmup=1, repeat=1).median
            budget = 0.05 if self.quick else 0.25
            repeat = max(5, min(100, int(budget / max(probe, 1e-6))))
            return backend.time(step, self.device, warmup=2 if self.quick else 3, repeat=repeat)

    def _perf(self, case: Planned, target: Target, under: Block, naive: Block, sample: Sample,
              calls: list[tuple[Any, ...]]) -> Perf:
        t = self._time(under, sample, calls)
        ref = naive if case.impl.backend != REFERENCE else None
        ref_t = self._time(ref, sample, calls) if ref is not None else t
        speedup = ref_t.median / t.median if t.median > 0 else None
        suspect = False
        if speedup is not None and speedup > SUSPECT_SPEEDUP:
            # implausible: re-measure on fresh weights and inputs (another seed) before recording
            exact, naive2, under2, sample2, _ = self._build(case, target, self._seed(case, salt=1))
            calls2 = [tuple(_round(a, target.dtype, self.device) for a in c) for c in sample2.calls]
            again = self._time(naive2, sample2, calls2).median / self._time(under2, sample2, calls2).median
            suspect = again > SUSPECT_SPEEDUP
        flops, nbytes = _work(case, calls[-1], target.dtype, under)
        peak = self.peak(case.dtype)
        fraction = None
        if peak:
            roofline = max(flops / peak["flops_per_s"], nbytes / peak["bytes_per_s"])
            fraction = roofline / t.median if t.median > 0 else None
        return Perf(
            median_s=t.median, iqr_s=t.iqr, n=t.n, warmup=t.warmup, noisy=t.iqr > NOISY * t.median,
            flops=flops, bytes=nbytes, flops_per_s=flops / t.median if t.median else 0.0,
            bytes_per_s=nbytes / t.median if t.median else 0.0, fraction_of_peak=fraction,
            reference_median_s=ref_t.median, speedup=speedup, suspect=suspect,
        )


def _work(case: Planned, call: tuple[Any, ...], dtype: torch.dtype, block: Block) -> tuple[float, float]:
    """FLOPs and bytes of the timed call, from the kind's closed-form `cost` (README formula):
    flops = batch * sum over the call's tokens of cost(config, keys that token sees).flops (the
    cost is affine in the keys without a window, so the sum is exact from its two ends); bytes = the parameters a
    call can touch (all but the routed experts no token of the call uses: at most tokens * active
    parameters) + inputs and output once + the cached values read."""
    shape, kind, config = case.shape, case.kind, case.config
    item = torch.empty((), dtype=dtype).element_size()
    tokens = shape.tokens * shape.batch
    if kind.cost is None:
        flops, active, total, kv = 0.0, 0.0, sum(p.numel() for p in block.parameters()), 0.0
    else:
        # token i of the call attends to context + i + 1 keys (itself included)
        first, last = kind.cost(config, shape.context + 1), kind.cost(config, shape.context + shape.tokens)
        flops = shape.batch * shape.tokens * (first.flops + last.flops) / 2
        total = first.params
        active = first.params - first.inactive_params
        kv = first.kv_values * shape.context * shape.batch
    param_bytes = min(total, tokens * active if active else total) * item
    io = sum(a.numel() * a.element_size() for a in call if isinstance(a, torch.Tensor))
    return float(flops), float(param_bytes + 2 * io + kv * item)


# --- composition: tiny models built from the backend's impls --------------------------------------

def model_case(registry: Registry, backend: str, device: str, preset: str, dtype: str, seed: int = 0) -> ModelCase:
    """Build `preset` three times on the same float64-drawn weights (float64 reference, reference in
    `dtype`, the backend's impls in `dtype`), run a 12-token prompt then 4 decode steps through the
    cache, and compare the logits (precision rule, KL divergence, top-1/top-5 agreement)."""
    import warnings

    from .errors import FallbackWarning
    from .model import build
    from .testing import randomize

    try:  # the float64 reference runs on the host when a plugin there owns the CPU
        host = (registry.device_backend("cpu"), "cpu")
    except LlmkitError:  # no cpu backend installed (a vendor's machine): on the device under test
        host = (backend, device)
    exact = randomize(build(preset, backend=host[0], device=host[1], dtype=torch.float64, policy="reference",
                            registry=registry), seed=seed)
    models = {"exact": exact}
    try:
        models["naive"] = build(preset, backend=backend, dtype=dtype, device=device, policy="reference",
                                registry=registry)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)  # fallbacks are counted from the plan
            models["under"] = build(preset, backend=backend, dtype=dtype, device=device, policy="auto",
                                    registry=registry)
    except LlmkitError as exc:
        return ModelCase(preset=preset, dtype=dtype, status="skipped", reasons=[str(exc)])
    for name in ("naive", "under"):
        m = models[name]
        m.load_state_dict(exact.state_dict())
        for block in m.modules():  # prepare hooks see the loaded weights, as after llmkit.load
            if isinstance(block, Block) and block.impl is not None:
                block.bind(block.impl, m.plan.target)
    vocab = exact.spec.vocab_size
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    logits, routes = {}, {}
    try:
        for name, m in models.items():
            m.eval()
            cache = m.new_cache()
            dev = host[1] if name == "exact" else device
            steps, chosen = [], []
            with torch.no_grad():
                for ids_t in [ids[:, :12], *(ids[:, t:t + 1] for t in range(12, 16))]:
                    steps.append(m(ids_t.to(dev), cache=cache))
                    chosen.append(_routes(m, *ids_t.shape))
            logits[name] = torch.cat(steps, dim=1).double().cpu()
            routes[name] = torch.cat(chosen, dim=1).cpu()
    except Exception as exc:
        return ModelCase(preset=preset, dtype=dtype, status="fail", reasons=[f"raised {type(exc).__name__}: {exc}"])
    # a routing flip at a near-tie (any MoE layer) legitimately changes a position's logits a lot
    # in low precision: such positions are left out of the rule and counted; a wrong router
    # diverges at many more positions than the naive model does, which fails
    diverged = {n: (routes[n] != routes["exact"]).flatten(2).any(-1) for n in ("naive", "under")}
    plan = models["under"].plan
    impls: dict[str, int] = {}
    for e in plan.entries:
        impls[e.resolution.impl.qualname] = impls.get(e.resolution.impl.qualname, 0) + 1
    keep = ~(diverged["naive"] | diverged["under"])[..., None].expand_as(logits["exact"])
    prec = _precision(logits["under"], logits["naive"], logits["exact"], parse_dtype(dtype), K_FORWARD, keep)
    n_under, n_naive = int(diverged["under"].sum()), int(diverged["naive"].sum())
    prec = prec.model_copy(update={"discrete_mismatches": n_under, "near_ties": n_naive})
    ref = logits["exact"].log_softmax(-1)

    def kl(x: torch.Tensor) -> float:
        return float((ref.exp() * (ref - x.log_softmax(-1))).sum(-1).mean())

    top = logits["exact"].argmax(-1)
    top5 = logits["exact"].topk(5, dim=-1).indices
    overlap = (logits["under"].topk(5, dim=-1).indices[..., :, None] == top5[..., None, :]).any(-1)
    reasons = []
    if prec.nonfinite:
        reasons.append(f"logits: {prec.nonfinite} NaN/Inf value(s) where the float64 model's are finite")
    if n_under > 2 * n_naive + 1:
        reasons.append(f"MoE routing differs from the float64 model at {n_under} positions "
                       f"(the reference in {dtype}: {n_naive})")
    if prec.e_max > prec.threshold:
        reasons.append(f"logits: e_max {prec.e_max:.3g} > {prec.k:g} * e_naive {prec.e_naive:.3g} + floor {prec.floor:.3g}")
    return ModelCase(
        preset=preset, dtype=dtype, status="fail" if reasons else "pass", reasons=reasons, impls=impls,
        fallbacks=len(plan.fallbacks), logits=prec, kl=kl(logits["under"]), kl_naive=kl(logits["naive"]),
        top1=float((logits["under"].argmax(-1) == top).double().mean()),
        top1_naive=float((logits["naive"].argmax(-1) == top).double().mean()),
        top5=float(overlap.double().mean()),
    )


def _routes(model: torch.nn.Module, batch: int, tokens: int) -> torch.Tensor:
    """[B, T, n_moe_layers, k]: the sorted experts each MoE block chose for each position."""
    picks = [m.routing.selected.reshape(batch, tokens, -1).sort(-1).values
             for m in model.modules() if isinstance(m, Block) and getattr(m, "routing", None) is not None]
    return torch.stack(picks, dim=2) if picks else torch.zeros(batch, tokens, 0, 0, dtype=torch.long)


# --- the whole run -------------------------------------------------------------------------------

def backend_impls(registry: Registry, backend: str, blocks: Iterable[str] | None) -> list[Impl]:
    """The impls to certify: the backend's own, or every kind's reference for "reference"."""
    names = None if blocks is None else set(blocks)
    out = []
    for kind_id, kind in sorted(registry.kinds.items()):
        if names is not None and kind_id not in names and kind.name not in names:
            continue
        for impl in registry.impls_for(kind_id):
            if (backend == REFERENCE) == (impl.backend == REFERENCE) and (backend == REFERENCE or impl.backend == backend):
                out.append(impl)
    if names is not None:
        known = {k for k in registry.kinds} | {k.name for k in registry.kinds.values()}
        unknown = sorted(names - known)
        if unknown:
            from .errors import UnknownNameError

            raise UnknownNameError("block kind", unknown[0], known)
    return out


def _device_backend(registry: Registry, backend: str, device: str | None) -> tuple[str, str]:
    """(backend that owns the device, device) — "reference" runs on the given device's backend."""
    if backend != REFERENCE:
        b = registry.backend(backend)
        return backend, device or b.default_device()
    name = registry.device_backend(torch.device(device or "cpu").type)
    return name, str(device or registry.backend(name).default_device())


def certify(
    registry: Registry,
    backend: str,
    *,
    device: str | None = None,
    out: Path,
    quick: bool = False,
    blocks: Iterable[str] | None = None,
    dtypes: Iterable[str] | None = None,
    modes: Iterable[str] = ("infer", "train"),
    seed: int = 0,
    resume: bool = False,
    perf: bool = True,
    progress: Callable[[int, int, Planned], None] | None = None,
) -> Certificate:
    """Run the suite for `backend` and write the certificate to `out` (atomically).

    Unless `blocks` narrows the run, composition is checked too: each closed-suite preset built
    from the backend's impls against the float64 reference model (`model_case`). Finished cases
    are journaled to `<out>.journal` as they complete; with `resume=True` a journal
    for the same suite and environment is continued, skipping its finished cases.
    """
    dtypes = list(dtypes or (QUICK_DTYPES if quick else DTYPES))
    for d in dtypes:
        parse_dtype(d)
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise LlmkitError(f"unknown mode(s) {bad}; valid: {list(MODES)}")
    run_backend, run_device = _device_backend(registry, backend, device)
    registry.target(run_backend, device=run_device)  # fails early if the backend is unavailable
    impls = backend_impls(registry, backend, blocks)
    if not impls:
        raise LlmkitError(f"backend {backend!r} has no impls to certify"
                          + (f" among block kinds {sorted(blocks)}" if blocks else ""))
    planned = plan_cases(registry, impls, dtypes=dtypes, modes=modes, quick=quick, seed=seed)
    header = {
        "journal": "llmkit-certify", "backend": backend, "device": run_device,
        "suite": suite_hash(planned), "environment": certs.environment(registry, run_backend, run_device),
    }
    out = Path(out)
    journal = out.with_name(out.name + ".journal")
    done: dict[str, dict[str, Any]] = {}
    done_models: dict[tuple[str, str], dict[str, Any]] = {}
    if resume and journal.exists():
        records = list(certs.iter_journal(journal))
        if not records or {k: records[0].get(k) for k in header} != header:
            raise CertificateError(
                f"{journal}: cannot resume: it was written for another suite, backend or environment "
                "(remove it, or run without --resume)")
        done = {r["id"]: r for r in records[1:] if "id" in r}
        done_models = {(r["model"]["preset"], r["model"]["dtype"]): r["model"] for r in records[1:] if "model" in r}
    else:
        journal.parent.mkdir(parents=True, exist_ok=True)
        journal.unlink(missing_ok=True)
        certs.append_journal(journal, header)
    runner = CaseRunner(registry, run_backend, run_device, seed=seed, perf=perf, quick=quick)
    cases: list[Case] = []
    for i, case in enumerate(planned):
        if progress is not None:
            progress(i, len(planned), case)
        if case.id in done:
            cases.append(Case.model_validate(done[case.id]))
            continue
        result = runner.run(case)
        certs.append_journal(journal, result.model_dump(mode="json"))
        cases.append(result)
    for impl in impls:  # a kind without cases cannot be certified: say so rather than omit it
        kind = registry.kind(impl.kind)
        if kind.cases is None:
            cases += [Case(id=f"{kind.id}/{impl.qualname}/none/{dt}", impl=impl.qualname, kind=kind.id,
                           suite="closed", origin="-", config={}, shape={}, dtype=dt, mode="infer",
                           status="skipped", reasons=[f"block kind {kind.id} defines no certification cases"])
                      for dt in dtypes]
    models: list[ModelCase] = []
    if backend != REFERENCE and blocks is None:
        for preset in _closed_presets(quick):
            for dt in dtypes:
                if (preset, dt) in done_models:
                    models.append(ModelCase.model_validate(done_models[(preset, dt)]))
                    continue
                result = model_case(registry, backend, run_device, preset, dt, seed)
                certs.append_journal(journal, {"model": result.model_dump(mode="json")})
                models.append(result)
    if progress is not None and planned:
        progress(len(planned), len(planned), planned[-1])
    for dt in dtypes:
        if any(c.perf is not None and c.dtype == dt for c in cases):
            runner.peak(dt)
    kinds = {i.kind: registry.kind(i.kind) for i in impls}
    data = {
        "schema": certs.SCHEMA,
        "created_at": certs.now_iso(),
        "backend": backend,
        "device": run_device,
        "plugin": certs.plugin_info(registry, run_backend),
        "environment": header["environment"],
        "peak": {k: v for k, v in runner.peaks.items() if v},
        "suite": {
            "version": SUITE_VERSION, "hash": header["suite"], "seed": seed, "quick": quick,
            "scale": preset_scale(_closed_presets(quick)),
            "blocks": sorted(blocks) if blocks else None, "dtypes": dtypes,
        },
        "impls": {
            f"{i.kind}/{i.qualname}": {
                "kind": i.kind, "plugin": registry.impl_plugin(i), "source_hash": certs.source_hash(i),
                "reference_hash": certs.reference_hash(kinds[i.kind]),
            } for i in impls
        },
        "cases": [c.model_dump(mode="json") for c in cases],
        "models": [m.model_dump(mode="json") for m in models],
        "summary": certs.summarize(cases).model_dump(),
    }
    cert = certs.seal(data)
    certs.write(cert, out)
    journal.unlink(missing_ok=True)
    return cert


def iter_failures(cert: Certificate) -> Iterator[Case]:
    return (c for c in cert.cases if c.status == "fail")



"""Block kinds: the versioned contract every implementation of a block honours.

A kind (`norm@1`, `attention@1`, ...) fixes four things:
- the config model (pydantic), which is what a YAML spec writes;
- the parameters a block of that config owns (names and shapes), so the state dict is the same
  whichever impl runs;
- the forward signature, taken from the kind's one reference implementation;
- the feature flags a config needs, which impls must declare to be eligible.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel

from .errors import PluginContractError

KIND_ID = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)@(?P<version>[1-9][0-9]*)$")
KIND_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a block owns: its shape and how a fresh (random) model initialises it."""

    shape: tuple[int, ...]
    init: Literal["normal", "ones", "zeros"] = "normal"
    std: float = 0.02
    dtype: Literal["float32"] | None = None
    """Keep this parameter in float32 whatever the model dtype (e.g. a router's correction bias)."""
    buffer: bool = False
    """State the block owns and saves (it is in the state dict) but that no gradient trains, as
    DeepSeek's routing correction bias (a buffer in transformers too); not a parameter."""

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise PluginContractError(f"parameter shape must be positive ints, got {shape}")
        object.__setattr__(self, "shape", shape)


@dataclass(frozen=True)
class Cost:
    """Closed-form figures of one block (its own parameters, not its children's), per token.

    `flops` counts matrix multiplies only (2 per multiply-add) for one token that attends to
    `context` earlier tokens; `kv_values` is the number of cached values per token, averaged over a
    context of that length (a sliding window of W caches min(context, W) tokens).
    """

    params: int
    inactive_params: int = 0
    """Parameters one token does not use (the routed experts it was not sent to)."""
    flops: int = 0
    kv_values: float = 0.0


@dataclass(frozen=True)
class Shape:
    """The inputs of one certification case: `batch` rows of `tokens` new tokens after `context`
    cached ones (decode and chunked prefill when context > 0), positions from `start`; `variant`
    names a weight pattern the kind's cases know (e.g. "skewed" or "ties" routing)."""

    batch: int = 2
    tokens: int = 8
    context: int = 0
    start: int = 0
    variant: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch": self.batch, "tokens": self.tokens, "context": self.context}
        if self.start:
            out["start"] = self.start
        return out

    @property
    def label(self) -> str:
        text = f"b{self.batch}t{self.tokens}" + (f"c{self.context}" if self.context else "")
        text += f"@{self.start}" if self.start else ""
        return text + (f"~{self.variant}" if self.variant else "")


@dataclass
class Sample:
    """What one case feeds a block: float tensors are float64 draws (the engine rounds them to the
    storage dtype); with `cache` a fresh cache is passed as the last argument of every call."""

    calls: list[tuple[Any, ...]]
    cache: bool = False
    setup: Callable[[Any], None] | None = None
    """Adjusts the float64 master weights before they are copied to each dtype (e.g. tied router rows)."""
    choices: Callable[[Any, tuple[Any, ...]], tuple[Any, Any]] | None = None
    """`choices(block, args)` after a call: (selected [N, k] ids, the scores they were chosen
    from [N, E]) for kinds with discrete decisions (MoE top-k)."""


@dataclass(frozen=True)
class KindCases:
    """How certification exercises a kind (PyTorch OpInfo's sample inputs, for blocks).

    `sample` draws the inputs of a case; `edges` lists edge configs with their shapes, labelled;
    `strategy` draws a config from hypothesis' `data` for the open, seeded suite; `shapes` gives
    the shapes a config from a preset is run with (prefill and decode).
    """

    sample: Callable[[Any, Shape, Any], Sample]
    edges: Callable[[], list[tuple[str, dict[str, Any], list[Shape]]]]
    strategy: Callable[[Any], dict[str, Any]] | None = None
    shapes: Callable[[Any, bool], list[Shape]] | None = None


@dataclass(frozen=True, eq=False)
class BlockKind:
    """A versioned block contract; `reference(block, *inputs)` defines its semantics."""

    name: str
    version: int
    config: type[BaseModel]
    params: Callable[[Any], Mapping[str, ParamSpec]]
    reference: Callable[..., Any]
    features: Callable[[Any], Iterable[str]] | None = None
    children: Callable[[Any], Mapping[str, tuple[BlockKind, Any]]] | None = None
    """Sub-blocks a block of this config owns (e.g. attention's RoPE and QK-norms), by attribute
    name: each is resolved to its own impl, and its parameters nest under that name."""
    cost: Callable[[Any, int], Cost] | None = None
    """`cost(config, context)`: closed-form parameter, FLOP and cache figures (see `Cost`)."""
    summary: str = ""
    cases: KindCases | None = None
    """Inputs and configs for certification (`llmkit certify`); a kind without them is skipped."""

    def __post_init__(self) -> None:
        if not KIND_NAME.match(self.name):
            raise PluginContractError(
                f"block kind name {self.name!r} must be lower_snake_case (e.g. 'attention')"
            )
        if not isinstance(self.version, int) or self.version < 1:
            raise PluginContractError(f"block kind {self.name!r}: version must be an int >= 1")
        if not (isinstance(self.config, type) and issubclass(self.config, BaseModel)):
            raise PluginContractError(
                f"block kind {self.id}: config must be a pydantic BaseModel subclass"
            )
        params = list(inspect.signature(self.reference).parameters.values())
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise PluginContractError(
                f"block kind {self.id}: reference forward must take the block as first argument"
            )

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    @cached_property
    def signature(self) -> inspect.Signature:
        """The forward signature without the leading `block` argument."""
        sig = inspect.signature(self.reference)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    @property
    def signature_text(self) -> str:
        """E.g. "(block, x, tied_weight=None)"."""
        return "(block" + "".join(
            f", {p.name}" + ("" if p.default is inspect.Parameter.empty else f"={p.default!r}")
            for p in self.signature.parameters.values()
        ) + ")"

    def parse_config(self, data: Mapping[str, Any] | BaseModel) -> BaseModel:
        """Validate a config (a mapping from a spec, or an instance) against the kind's model."""
        if isinstance(data, self.config):
            return data
        if isinstance(data, BaseModel):
            data = data.model_dump()
        return self.config.model_validate(data)

    def param_specs(self, config: BaseModel) -> dict[str, ParamSpec]:
        specs = dict(self.params(config))
        for name, spec in specs.items():
            if not name.isidentifier() or not isinstance(spec, ParamSpec):
                raise PluginContractError(
                    f"block kind {self.id}: params() must map identifiers to ParamSpec, "
                    f"got {name!r}: {spec!r}"
                )
        return specs

    def child_specs(self, config: BaseModel) -> dict[str, tuple[BlockKind, BaseModel]]:
        if self.children is None:
            return {}
        out = {}
        for name, (kind, child_config) in self.children(config).items():
            if not name.isidentifier() or not isinstance(kind, BlockKind):
                raise PluginContractError(
                    f"block kind {self.id}: children() must map identifiers to (BlockKind, config)"
                )
            out[name] = (kind, kind.parse_config(child_config))
        return out

    def required_features(self, config: BaseModel) -> frozenset[str]:
        return frozenset(self.features(config)) if self.features else frozenset()

    def signature_problems(self, forward: Callable[..., Any]) -> list[str]:
        """Ways `forward(block, ...)` differs from the reference's signature (empty when it fits)."""
        try:
            sig = inspect.signature(forward)
        except (TypeError, ValueError) as exc:
            return [f"forward has no inspectable signature ({exc})"]
        params = list(sig.parameters.values())
        if not params:
            return ["forward must take the block as first argument"]
        got = [(p.name, p.kind, p.default is inspect.Parameter.empty) for p in params[1:]]
        want = [
            (p.name, p.kind, p.default is inspect.Parameter.empty)
            for p in self.signature.parameters.values()
        ]
        if got != want:
            return [f"forward signature (block{_fmt(params[1:])}) != {self.id}'s (block{_fmt(self.signature.parameters.values())})"]
        return []


def _fmt(params: Iterable[inspect.Parameter]) -> str:
    return "".join(
        f", {p.name}" + ("" if p.default is inspect.Parameter.empty else "=...") for p in params
    )

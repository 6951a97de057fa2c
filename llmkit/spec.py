"""Model specs: YAML (or a dict) -> a validated `Spec` with one config per block.

Format: see `llmkit/presets/README.md`. Loading is in stages, and every problem found is reported
together in one `SpecError`, each as

    path/to/spec.yaml:LINE: dotted.field.path: what is wrong; what would be right

The line is that of the YAML key the problem belongs to, followed through `extends:` (a field
inherited from a parent spec points into the parent file), components and per-layer overrides
(a bad value that an override introduced points at the override). YAML is read with the safe
loader only; nothing in a spec can run code.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from .errors import LlmkitError, UnknownNameError

Path_ = tuple[Any, ...]  # a dotted path as a tuple of keys and list indices
Origin = tuple[str | None, int | None]  # (file, line)

SLOTS = ("attention", "mlp")
PRESET_PACKAGE = "llmkit.presets"
MAX_TENSOR_ELEMENTS = 2**48
"""No real model has a tensor this large (256 T elements); a spec that asks for one has a typo,
and torch could not even describe it on the meta device."""


@dataclass(frozen=True)
class SpecIssue:
    file: str | None
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file or '<spec>'}:{self.line}" if self.line else (self.file or "<spec>")
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(LlmkitError):
    """One or more problems in a spec, each with file, line and field path."""

    def __init__(self, issues: list[SpecIssue]) -> None:
        self.issues = list(dict.fromkeys(issues))  # same problem reached twice: report once
        super().__init__("\n".join(str(i) for i in self.issues))


# ----------------------------------------------------------------------------- YAML with lines

@dataclass
class _Source:
    """A parsed spec document: data plus the (file, line) of every key path."""

    data: dict[str, Any]
    origins: dict[Path_, Origin] = field(default_factory=dict)
    file: str | None = None

    def origin(self, path: Path_) -> Origin:
        """The origin of the longest prefix of `path` that has one."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.origins:
                return self.origins[path[:n]]
        return (self.file, None)


def _parse_yaml(text: str, file: str | None) -> _Source:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([SpecIssue(file, line, "", f"invalid YAML: {problem}")]) from None
    if node is None:
        raise SpecError([SpecIssue(file, 1, "", "the spec is empty; expected a mapping of fields")])
    origins: dict[Path_, Origin] = {(): (file, node.start_mark.line + 1)}
    issues: list[SpecIssue] = []

    def walk(n: yaml.Node, path: Path_) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: set[Any] = set()
            for k, v in n.value:
                key = k.value
                if key in seen:
                    issues.append(SpecIssue(file, k.start_mark.line + 1, _dotted(path + (key,)),
                                            "duplicate key; each field may appear once"))
                seen.add(key)
                origins[path + (key,)] = (file, k.start_mark.line + 1)
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                origins[path + (i,)] = (file, v.start_mark.line + 1)
                walk(v, path + (i,))

    walk(node, ())
    try:
        data = yaml.SafeLoader(text).get_single_data()
    except yaml.YAMLError as exc:  # e.g. a python/object tag: the safe loader refuses it
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([SpecIssue(file, mark.line + 1 if mark else None, "", f"invalid YAML: {problem}")]) from None
    if issues:
        raise SpecError(issues)
    if not isinstance(data, dict):
        raise SpecError([SpecIssue(file, 1, "", f"a spec is a mapping of fields, got {type(data).__name__}")])
    return _Source(data, origins, file)


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


# ----------------------------------------------------------------------------- the top level

Selector = int | str | list[int] | dict[str, int]


class _Override(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: Selector
    placement: Any = None
    parallel: Any = None
    norm: Any = None
    attention: Any = None
    mlp: Any = None


class _Top(BaseModel):
    """The top-level fields; block configs are checked later, against the block catalogue."""

    model_config = ConfigDict(extra="forbid")
    name: str
    source: str | None = None
    description: str | None = None
    extends: str | None = None
    # bounds far beyond any real model, so a typo cannot make the loader build millions of layers
    vocab_size: PositiveInt = Field(le=2**31)
    d_model: PositiveInt = Field(le=2**31)
    n_layers: PositiveInt = Field(le=2**16)
    max_seq_len: PositiveInt = Field(le=2**31)
    dtype: str | None = None
    dtypes: dict[str, str] = Field(default_factory=dict)
    norm: dict[str, Any] = Field(default_factory=dict)
    embedding: dict[str, Any] = Field(default_factory=dict)
    layer: dict[str, Any]
    final_norm: dict[str, Any] = Field(default_factory=dict)
    head: dict[str, Any] = Field(default_factory=dict)
    components: dict[str, dict[str, Any]] = Field(default_factory=dict)
    overrides: list[_Override] = Field(default_factory=list)
    impl: dict[str, str] = Field(default_factory=dict)
    deny: dict[str, str | list[str]] = Field(default_factory=dict)
    policy: str | None = None
    certs: list[str] | None = None
    parallel: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- the result

@dataclass(frozen=True)
class Spec:
    """A validated model spec: one config per block, ready for `llmkit.build`."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    max_seq_len: int
    dtype: str | None
    dtypes: Mapping[str, str]
    """Block kind name -> a dtype of its own (mixed precision), e.g. {"moe": "float32"}."""
    embedding: BaseModel
    layers: tuple[BaseModel, ...]
    final_norm: BaseModel
    head: BaseModel
    impl: Mapping[str, str]
    deny: Mapping[str, str | list[str]]
    policy: str | None = None
    """The resolution policy `llmkit.build` uses unless the caller names one."""
    certs: tuple[str, ...] | None = None
    """Certificate files or directories to consult instead of the default directory (relative ones
    already resolved against the spec file that names them)."""
    parallel: Mapping[str, Any] | None = None
    """The multi-process layout (`llmkit.parallel`: tp, ep, cp, cp_mode) `llmkit.build` and
    `llmkit.load` use, key by key, unless the caller names one."""
    source: str | None = None
    file: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tied(self) -> bool:
        return bool(self.head.tied)


def preset_names() -> list[str]:
    files = resources.files(PRESET_PACKAGE)
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_source(ref: str, relative_to: str | None) -> _Source:
    """`ref` is a preset name or a path (relative to the spec that names it)."""
    if ref.endswith((".yaml", ".yml")) or "/" in ref or "\\" in ref:
        path = Path(ref)
        if relative_to and not path.is_absolute():
            path = Path(relative_to).parent / path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise LlmkitError(f"cannot read spec {str(path)!r}: {exc.strerror or exc}") from None
        return _parse_yaml(text, str(path))
    names = preset_names()
    if ref not in names:
        raise UnknownNameError("preset", ref, names, note="a spec file must end in .yaml or .yml")
    text = resources.files(PRESET_PACKAGE).joinpath(f"{ref}.yaml").read_text(encoding="utf-8")
    return _parse_yaml(text, f"<preset {ref}>")


def _merge_sources(parent: _Source, child: _Source) -> _Source:
    """Child fields win; `overrides` and `components` accumulate; origins follow the winner."""
    data = _deep_merge(parent.data, {k: v for k, v in child.data.items() if k != "extends"})
    if "overrides" in parent.data and "overrides" in child.data:
        data["overrides"] = list(parent.data["overrides"]) + list(child.data["overrides"])
    origins = dict(parent.origins)
    shift = len(parent.data.get("overrides", []) or []) if "overrides" in child.data else 0
    for path, origin in child.origins.items():
        if path[:1] == ("overrides",) and len(path) > 1 and isinstance(path[1], int):
            path = ("overrides", path[1] + shift, *path[2:])
        if path != ():
            origins[path] = origin
    return _Source(data, origins, child.file)


def _replaces(base: Any, over: Any) -> bool:
    """Whether `over` replaces `base` instead of merging into it: only two dicts of the same
    `type` (or without one) merge."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return True
    return "type" in over and "type" in base and over["type"] != base["type"]


def _deep_merge(base: Any, over: Any) -> Any:
    """Dicts merge key by key; a dict naming a different `type` replaces; anything else replaces."""
    if _replaces(base, over):
        return dict(over) if isinstance(over, dict) else over
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(base[k], v) if k in base else v
    return out


def _resolve_extends(src: _Source, seen: tuple[str, ...] = ()) -> _Source:
    seen = (*seen, src.file or "<spec>")
    parent_ref = src.data.get("extends")
    if parent_ref is None:
        return src
    f, line = src.origin(("extends",))
    if not isinstance(parent_ref, str):
        raise SpecError([SpecIssue(f, line, "extends", "must be a preset name or a spec path")])
    try:
        parent = _read_source(parent_ref, src.file)
    except SpecError:
        raise
    except LlmkitError as exc:
        raise SpecError([SpecIssue(f, line, "extends", str(exc))]) from None
    if parent.file in seen:
        chain = " -> ".join(Path(x).name for x in (*seen, parent.file or ""))
        raise SpecError([SpecIssue(f, line, "extends", f"cycle: {chain}")])
    return _merge_sources(_resolve_extends(parent, seen), src)


# ----------------------------------------------------------------------------- validation

def _pydantic_issues(
    exc: ValidationError, model: type[BaseModel], data: Any, where: Path_,
    provenance: Mapping[Path_, Path_], src: _Source,
) -> list[SpecIssue]:
    """Translate pydantic errors: strip union tags from locations, add 'did you mean', find lines."""
    out = []
    for err in exc.errors():
        loc, fields = _clean_loc(model, err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc:
            close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
            msg = f"unknown field {loc[-1]!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                  f"; valid fields: {', '.join(sorted(fields))}")
        elif err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            msg = f"unknown type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"].endswith("_type") or err["type"].endswith("_parsing"):
            msg = f"{msg} (got {err.get('input')!r})"
        src_path = _trace(where + tuple(loc), provenance)
        f, line = src.origin(src_path)
        out.append(SpecIssue(f, line, _dotted(src_path), msg))
    return out


def _trace(path: Path_, provenance: Mapping[Path_, Path_]) -> Path_:
    """Map a path in a merged config back to the spec path that set it (longest known prefix)."""
    for n in range(len(path), -1, -1):
        if path[:n] in provenance:
            return provenance[path[:n]] + path[n:]
    return path


def _clean_loc(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[Any], list[str]]:
    """Drop discriminated-union tags from a pydantic location; return it and the field names
    valid at its last step (for "did you mean")."""
    candidates: list[type[BaseModel]] = [model]
    out: list[Any] = []
    fields: list[str] = []
    for part in loc:
        fields = sorted({f for m in candidates for f in m.model_fields})
        if isinstance(part, str) and part not in fields and candidates and _is_tag(candidates, part):
            candidates = [m for m in candidates if _tag_of(m) == part] or candidates
            continue
        out.append(part)
        nxt: list[type[BaseModel]] = []
        for m in candidates:
            info = m.model_fields.get(part) if isinstance(part, str) else None
            if info is not None:
                nxt.extend(_models_in(info.annotation))
        candidates = nxt
    return out, fields


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out.extend(_models_in(arg))
    return out


def _tag_of(model: type[BaseModel]) -> str | None:
    info = model.model_fields.get("type")
    if info is None:
        return None
    args = typing.get_args(info.annotation)
    return args[0] if len(args) == 1 else None


def _is_tag(candidates: list[type[BaseModel]], part: str) -> bool:
    return any(_tag_of(m) == part for m in candidates)


def _select(selector: Any, n_layers: int) -> list[int]:
    """Layer indices chosen by an override's `layers:`; raises ValueError with what is wrong."""
    if isinstance(selector, bool):
        raise ValueError("expected a layer index, 'a-b', a list, or {every: k, offset: o}")
    if isinstance(selector, int):
        idx = [selector]
    elif isinstance(selector, str):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", selector)
        if not m:
            raise ValueError(f"range {selector!r} must look like 'a-b' (inclusive), e.g. '0-2'")
        a, b = int(m[1]), int(m[2])
        if a > b:
            raise ValueError(f"range {selector!r} is empty; write the lower index first")
        idx = list(range(a, b + 1))
    elif isinstance(selector, list):
        idx = list(selector)
    else:
        unknown = set(selector) - {"every", "offset"}
        if unknown or "every" not in selector:
            raise ValueError("expected {every: k, offset: o} (offset optional)")
        every, offset = selector["every"], selector.get("offset", 0)
        if every < 1 or not 0 <= offset < every:
            raise ValueError(f"need every >= 1 and 0 <= offset < every, got every={every}, offset={offset}")
        idx = [i for i in range(n_layers) if i % every == offset]
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layer index {bad[0]} out of range; the model has layers 0-{n_layers - 1}")
    return sorted(set(idx))


def _with_provenance(value: Any, src_path: Path_, dst: Path_, prov: dict[Path_, Path_]) -> None:
    """Record that every key under `value` (placed at `dst`) came from `src_path`."""
    prov[dst] = src_path
    if isinstance(value, dict):
        for k, v in value.items():
            _with_provenance(v, src_path + (k,), dst + (k,), prov)


def _slot_value(value: Any, path: Path_, components: Mapping[str, Any], issues: list[SpecIssue],
                src: _Source) -> tuple[Any, Path_] | None:
    """A slot's value: a dict as written, or a component by name (with the component's path)."""
    if isinstance(value, str):
        if value not in components:
            close = difflib.get_close_matches(value, list(components), n=1)
            hint = f"did you mean {close[0]!r}?" if close else (
                f"defined components: {', '.join(sorted(components))}" if components else "no components are defined")
            f, line = src.origin(path)
            issues.append(SpecIssue(f, line, _dotted(path), f"unknown component {value!r}; {hint}"))
            return None
        return components[value], ("components", value)
    if isinstance(value, dict):
        return value, path
    f, line = src.origin(path)
    issues.append(SpecIssue(f, line, _dotted(path),
                            f"expected a mapping of fields or a component name, got {type(value).__name__}"))
    return None


def _drop_under(prov: dict[Path_, Path_], prefix: Path_) -> None:
    for key in [k for k in prov if k[: len(prefix)] == prefix]:
        del prov[key]


def _apply(cfg: dict[str, Any], prov: dict[Path_, Path_], key: str, value: Any, src_path: Path_) -> None:
    """Merge `value` (from `src_path`) into `cfg[key]`, keeping provenance right."""
    old = cfg.get(key)
    if _replaces(old, value):
        _drop_under(prov, (key,))  # nothing of the old value remains
    cfg[key] = _deep_merge(old, value)
    _with_provenance(value, src_path, (key,), prov)


def _check_sizes(kind: Any, config: BaseModel, where: Path_, issues: list[SpecIssue], src: _Source,
                 prefix: str = "") -> bool:
    """Report the first parameter of a block tree too large to exist; True if one was found."""
    for name, spec in kind.param_specs(config).items():
        n = 1
        for d in spec.shape:
            n *= d
        if n > MAX_TENSOR_ELEMENTS:
            f, line = src.origin(where)
            issues.append(SpecIssue(f, line, _dotted(where), f"parameter {prefix}{name} would have shape "
                                    f"{spec.shape} = {n:.3g} elements (limit 2^48); check the sizes"))
            return True
    return any(_check_sizes(child_kind, child_config, where, issues, src, f"{prefix}{child}.")
               for child, (child_kind, child_config) in kind.child_specs(config).items())


def _cert_path(src: _Source, index: int, ref: str, issues: list[SpecIssue]) -> str:
    """Entry `index` of `certs:`, relative to the file that wrote it; a missing path is an issue."""
    f, line = src.origin(("certs", index))
    path = Path(ref).expanduser()
    if not path.is_absolute() and f and Path(f).is_file():
        path = Path(f).parent / path
    if not path.exists():
        issues.append(SpecIssue(f, line, f"certs.{index}", f"no such certificate file or directory: {str(path)!r}"))
    return str(path)


def load_spec(source: str | Path | Mapping[str, Any], registry: Any = None) -> Spec:
    """Load a spec from a preset name, a YAML path, or a dict; raise `SpecError` on any problem.

    Block configs are validated against the block kinds of `registry` (default: the installed
    plugins), so a plugin-provided variant of a kind is checked by its own config model.
    """
    from .registry import default_registry
    from .resolve import POLICIES, Selection
    from .target import parse_dtype

    registry = registry or default_registry()
    if isinstance(source, Mapping):
        src = _Source(dict(source), {}, None)
    else:
        src = _read_source(str(source), None)
    src = _resolve_extends(src)
    try:
        top = _Top.model_validate(src.data)
    except ValidationError as exc:
        raise SpecError(_pydantic_issues(exc, _Top, src.data, (), {}, src)) from None

    issues: list[SpecIssue] = []
    norm_cfg, layer_cfg = registry.kind("norm").config, registry.kind("layer").config
    emb_cfg, head_cfg = registry.kind("embedding").config, registry.kind("head").config

    def check(model: type[BaseModel], data: dict[str, Any], prov: dict[Path_, Path_]) -> BaseModel | None:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            issues.extend(_pydantic_issues(exc, model, data, (), prov, src))
            return None

    sizes = {"vocab_size": ("vocab_size",), "d_model": ("d_model",)}
    emb_prov: dict[Path_, Path_] = {(): ("embedding",), **{(k,): v for k, v in sizes.items()}}
    _with_provenance(top.embedding, ("embedding",), (), emb_prov)
    embedding = check(emb_cfg, {"vocab_size": top.vocab_size, "d_model": top.d_model, **top.embedding}, emb_prov)
    head_prov: dict[Path_, Path_] = {(): ("head",), **{(k,): v for k, v in sizes.items()}}
    _with_provenance(top.head, ("head",), (), head_prov)
    head = check(head_cfg, {"vocab_size": top.vocab_size, "d_model": top.d_model, **top.head}, head_prov)
    fn_prov: dict[Path_, Path_] = {(): ("final_norm",), ("dim",): ("d_model",)}
    _with_provenance(top.norm, ("norm",), (), fn_prov)
    _with_provenance(top.final_norm, ("final_norm",), (), fn_prov)
    final_norm = check(norm_cfg, {"dim": top.d_model, **_deep_merge(top.norm, top.final_norm)}, fn_prov)

    components = top.components
    base: dict[str, Any] = {"d_model": top.d_model}
    base_prov: dict[Path_, Path_] = {(): ("layer",), ("d_model",): ("d_model",)}
    _apply(base, base_prov, "norm", top.norm, ("norm",))
    for key, value in top.layer.items():
        path = ("layer", key)
        if key in SLOTS:
            found = _slot_value(value, path, components, issues, src)
            if found is None:
                continue
            value, path = found
        _apply(base, base_prov, key, value, path)

    groups: dict[tuple[int, ...], list[int]] = {}
    chosen: list[list[int]] = []
    for i, ov in enumerate(top.overrides):
        try:
            chosen.append(_select(ov.layers, top.n_layers))
        except ValueError as exc:
            f, line = src.origin(("overrides", i, "layers"))
            issues.append(SpecIssue(f, line, f"overrides.{i}.layers", str(exc)))
            chosen.append([])
    for layer_idx in range(top.n_layers):
        groups.setdefault(tuple(i for i, sel in enumerate(chosen) if layer_idx in sel), []).append(layer_idx)

    layers: list[BaseModel | None] = [None] * top.n_layers
    for applied, members in groups.items():
        cfg, prov = dict(base), dict(base_prov)
        for oi in applied:
            for key, value in src.data["overrides"][oi].items():
                if key == "layers":
                    continue
                path = ("overrides", oi, key)
                if key in SLOTS:
                    found = _slot_value(value, path, components, issues, src)
                    if found is None:
                        continue
                    value, path = found
                    if isinstance(src.data["overrides"][oi][key], str):
                        cfg.pop(key, None)  # a component replaces the slot
                _apply(cfg, prov, key, value, path)
        built = check(layer_cfg, cfg, prov)
        for layer_idx in members:
            layers[layer_idx] = built

    for where, kind_name, config in [(("embedding",), "embedding", embedding), (("head",), "head", head),
                                      (("final_norm",), "norm", final_norm),
                                      *[(("layer",), "layer", c) for c in dict.fromkeys(layers)]]:
        if config is not None:
            _check_sizes(registry.kind(kind_name), config, where, issues, src)

    if top.dtype is not None:
        try:
            parse_dtype(top.dtype)
        except LlmkitError as exc:
            f, line = src.origin(("dtype",))
            issues.append(SpecIssue(f, line, "dtype", str(exc)))
    for kind_name, value in top.dtypes.items():
        f, line = src.origin(("dtypes", kind_name))
        try:
            registry.kind(kind_name)
            parse_dtype(value)
        except LlmkitError as exc:
            issues.append(SpecIssue(f, line, f"dtypes.{kind_name}", str(exc)))
    for field_name, pairs in (("impl", top.impl), ("deny", top.deny)):
        for kind_name, value in pairs.items():
            try:
                sel = Selection.make(**{field_name: {kind_name: value}})
                registry.check_selection(sel)
            except LlmkitError as exc:
                f, line = src.origin((field_name, kind_name))
                issues.append(SpecIssue(f, line, f"{field_name}.{kind_name}", str(exc)))

    if top.policy is not None and top.policy not in POLICIES:
        f, line = src.origin(("policy",))
        issues.append(SpecIssue(f, line, "policy", str(UnknownNameError("policy", top.policy, POLICIES))))
    certs = None if top.certs is None else tuple(_cert_path(src, i, ref, issues) for i, ref in enumerate(top.certs))
    if top.parallel is not None:
        from .parallel import Parallel

        try:
            Parallel.make(top.parallel)
        except LlmkitError as exc:
            f, line = src.origin(("parallel",))
            issues.append(SpecIssue(f, line, "parallel", str(exc)))

    if issues:
        raise SpecError(issues)
    return Spec(
        name=top.name, vocab_size=top.vocab_size, d_model=top.d_model, n_layers=top.n_layers,
        max_seq_len=top.max_seq_len, dtype=top.dtype, dtypes=dict(top.dtypes), embedding=embedding, layers=tuple(layers),
        final_norm=final_norm, head=head, impl=dict(top.impl), deny=dict(top.deny), policy=top.policy,
        certs=certs, parallel=top.parallel, source=top.source, file=src.file, raw=src.data,
    )

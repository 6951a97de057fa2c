"""A block's reference computation as an ONNX graph, exported once and run in onnxruntime.

A `Graph` is one function of a block kind, `fn(block, *inputs)`, written with the catalogue's own
reference functions (llmkit_blocks), so the semantics are the reference's. `prepare` (build time)
exports it with `torch.onnx.export(dynamo=True)` and opens an `onnxruntime.InferenceSession`;
the forward only feeds host tensors to that session and wraps its outputs.

- Weights are graph inputs, not initializers: the graph depends only on the block's kind, config
  and dtype, so blocks of equal config share one file and one session, and weights loaded after the
  build (a checkpoint, `load_state_dict`) are the ones used, as with every other impl (parameters
  belong to the block). Inside the graph every child block (QK-norm, RoPE, a shared expert) runs
  its kind's reference, whatever impl it is bound to in the model.
- Batch, sequence and key lengths are dynamic dims: one session serves prefill, every decode step
  and any batch size.
- Precision: the exported graph is rewritten where onnxruntime's float32 CPU kernels are less
  accurate than torch's: the transcendental activations (`PRECISE_OPS`) and, in attention, the
  products of two activations (`Graph.wide_products`) run in float64 and are rounded once.
- Exported graphs are cached on disk under `${XDG_CACHE_HOME:-~/.cache}/llmkit/onnxrt/`, named by a
  content hash of what determines them (graph, kind, config, dtype, parameter names, shapes and
  dtypes, torch/onnx/onnxscript/onnxruntime/llmkit versions, and the source of the reference
  catalogue and of this plugin, so an edited reference never runs from a stale graph). Files are
  written to a temporary name and renamed; a second build of the same block loads the file
  instead of exporting again. Sessions are also shared within a process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmkit import Block
from llmkit.atomic import atomic_write
from llmkit.errors import LlmkitError
from llmkit.hookspecs import Target
from llmkit.target import dtype_name

from .backend import providers

CACHE_ENV = "XDG_CACHE_HOME"
_MEMORY_SESSIONS = 256
"""Sessions kept in the process for reuse by later builds; blocks hold their own regardless."""


@dataclass(frozen=True)
class Graph:
    """One exported function of a block kind.

    `fn(block, *inputs)` returns a tensor or a tuple of them; `example(config, dtype)` gives
    inputs to trace with (sizes of dynamic dims >= 2 and distinct, so the tracer specialises none);
    `dynamic[i]` maps dims of input i to a dim name, equal names being the same size.
    """

    name: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    example: Callable[[Any, torch.dtype], tuple[torch.Tensor, ...]]
    dynamic: tuple[Mapping[int, str], ...]
    wide_products: bool = False
    """Run products of two activations (attention's scores and P V) in float64. onnxruntime's
    float32 GEMM accumulates each output along K in one register: about twice torch's (MKL's)
    error at K = 128-512, which fails certification's ratio rule at head dims 128 and 192. The
    operands are activations, so the casts cost no weight traffic."""


class _Proxy:
    """Stands in for a block inside the traced function: its config, its parameters and buffers
    (graph inputs there), and its child blocks as proxies that run their kind's reference."""

    training = False  # sessions serve inference only (the impls declare mode infer)

    def __init__(self, block: Block, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        self.config = block.config
        self._reference = block.kind.reference
        for name, _ in _own_state(block):
            setattr(self, name, state[prefix + name])
        for name, child in block.named_children():
            if isinstance(child, Block):
                setattr(self, name, _Proxy(child, state, f"{prefix}{name}."))

    def __call__(self, *args: Any) -> Any:
        return self._reference(self, *args)


def _own_state(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*block.named_parameters(recurse=False), *block.named_buffers(recurse=False)]


def _state(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*block.named_parameters(), *block.named_buffers()]


class _Traced(nn.Module):
    """What the exporter sees: no state of its own; the block's state arrives as leading inputs."""

    def __init__(self, block: Block, graph: Graph, names: Sequence[str]) -> None:
        super().__init__()
        self._block = (block,)  # in a tuple: not a submodule, so its parameters are not lifted as constants
        self._graph = graph
        self._names = tuple(names)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = len(self._names)
        proxy = _Proxy(self._block[0], dict(zip(self._names, tensors[:k])))
        out = self._graph.fn(proxy, *tensors[k:])
        return out if isinstance(out, tuple) else (out,)


def cache_dir() -> Path:
    """Where exported graphs are kept: `${XDG_CACHE_HOME:-~/.cache}/llmkit/onnxrt`."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "llmkit" / "onnxrt"


@functools.cache
def _fingerprint() -> dict[str, Any]:
    """Versions and sources that change what an export produces (part of every cache key)."""
    import llmkit_blocks

    versions = {name: importlib.import_module(name).__version__
                for name in ("torch", "onnx", "onnxscript", "onnxruntime")}
    for dist in ("llmkit", "llmkit-backend-onnxrt"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # loaded from a source tree (the sources are hashed below)
            versions[dist] = None
    digest = hashlib.sha256()
    for package in (Path(llmkit_blocks.__file__).parent, Path(__file__).parent):
        for path in sorted(package.glob("*.py")):
            digest.update(f"{package.name}/{path.name}\n".encode())
            digest.update(path.read_bytes())
    return {"versions": versions, "sources": digest.hexdigest()}


def cache_key(block: Block, graph: Graph, dtype: torch.dtype) -> str:
    """The JSON text whose SHA-256 names the cached file of `graph` for `block` in `dtype`."""
    return json.dumps({
        "graph": graph.name,
        "kind": block.kind.id,
        "config": block.config.model_dump(mode="json"),
        "dtype": dtype_name(dtype),
        "state": [[name, list(t.shape), dtype_name(t.dtype)] for name, t in _state(block)],
        **_fingerprint(),
    }, sort_keys=True)


def session_options() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # a model holds many sessions (one per graph and config), each with its own thread pool: threads
    # spinning after their session's run would compete with the next session's
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # no arena: with dynamic shapes an arena keeps the largest intermediate a session ever saw (the
    # scores of a long prefill) for the life of the session, and a model holds many sessions
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3  # warnings such as unused graph inputs (weights a graph ignores) are noise
    return options


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's warnings (training-mode hints, optional torchvision ops) say nothing about
    these graphs; keep them off the user's terminal."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export(block: Block, graph: Graph, dtype: torch.dtype, key: str) -> bytes:
    """Export `graph` for `block` in `dtype` (serialized ONNX, the cache key in its metadata)."""
    state = _state(block)
    names = [n for n, _ in state]
    tensors = [t.detach() for _, t in state]
    example = graph.example(block.config, dtype)
    dims: dict[str, Any] = {}
    specs = []
    for spec in graph.dynamic:
        specs.append({axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in spec.items()} or None)
    with _quiet_exporter():
        program = torch.onnx.export(
            _Traced(block, graph, names).eval(), (*tensors, *example), dynamo=True,
            input_names=[*names, *graph.inputs], output_names=list(graph.outputs),
            dynamic_shapes=((*([None] * len(tensors)), *specs),), verbose=False,
        )
    proto = program.model_proto
    _round_once(proto.graph, set(names), graph.wide_products)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "llmkit_onnxrt_key", key
    return proto.SerializeToString()


PRECISE_OPS = frozenset({"Cos", "Gelu", "Sigmoid", "Sin", "Tanh"})
"""Evaluated in float64 and rounded once to the graph's type (Gelu: the tanh approximation only).
onnxruntime's CPU kernels approximate them in float32 (measured here: Tanh 2.3 ulp, Cos and Sin
1.1 ulp, Sigmoid's small outputs off by up to 5x) where torch's are within about half an ulp, and
certification's ratio rule sees it (a gelu_tanh MLP at 3.5x the reference's float32 error)."""


def _widened(node: Any, i: int, inputs: Sequence[str]) -> list[Any]:
    """`node` computed in float64: the named inputs cast up, the output cast back to input 0's type."""
    import onnx
    import onnx.helper as oh

    wide = onnx.NodeProto()
    wide.CopyFrom(node)
    out = [oh.make_node("Cast", [x], [f"{x}__f64_{i}"], name=f"{node.name}_widen_{i}_{j}", to=onnx.TensorProto.DOUBLE)
           for j, x in enumerate(inputs)]
    for j, x in enumerate(wide.input):
        if x in inputs:
            wide.input[j] = f"{x}__f64_{i}"
    y = node.output[0]
    wide.output[0] = f"{y}__f64_{i}"
    return [*out, wide, oh.make_node("CastLike", [wide.output[0], node.input[0]], [y], name=f"{node.name}_round_{i}")]


def _round_once(graph: Any, state: set[str], wide_products: bool) -> None:
    """Rewrite the exported graph: every `PRECISE_OPS` node, and with `wide_products` every MatMul
    of two activations (no operand derived from the block's state), runs in float64."""
    derived = set(state)
    nodes = []
    for i, node in enumerate(graph.node):
        from_state = any(x in derived for x in node.input)
        if from_state:
            derived.update(node.output)
        tanh_gelu = any(a.name == "approximate" and a.s == b"tanh" for a in node.attribute)
        standard = node.domain in ("", "ai.onnx")
        # erf-GELU stays: its float32 kernel is within an ulp, and onnxruntime has no float64 Erf
        if standard and node.op_type in PRECISE_OPS and (node.op_type != "Gelu" or tanh_gelu):
            nodes += _widened(node, i, node.input[:1])
        elif standard and wide_products and node.op_type == "MatMul" and not from_state:
            nodes += _widened(node, i, list(node.input))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


class Runner:
    """One open session of one graph: feeds a block's current state and the call's inputs."""

    def __init__(self, session: Any, graph: Graph, state_names: Sequence[str], path: Path) -> None:
        used = {i.name for i in session.get_inputs()}
        self.session = session
        self.path = path
        self.outputs = list(graph.outputs)
        # inputs the exporter dropped or the optimiser found unused are not fed
        self._state = [(name, tuple(name.split("."))) for name in state_names if name in used]
        self._inputs = [(i, name) for i, name in enumerate(graph.inputs) if name in used]

    def __call__(self, block: Block, *inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {name: _host(functools.reduce(getattr, path, block)) for name, path in self._state}
        for i, name in self._inputs:
            feed[name] = _host(inputs[i])
        return [torch.from_numpy(a) for a in self.session.run(self.outputs, feed)]

    def __deepcopy__(self, memo: dict[int, Any]) -> Runner:
        return self  # holds no block state; the session is immutable and safe to share


def _host(t: torch.Tensor) -> Any:
    return t.detach().contiguous().numpy()


_RUNNERS: OrderedDict[tuple[str, tuple[str, ...]], Runner] = OrderedDict()


def clear_memory() -> None:
    """Forget the sessions kept for reuse in this process (the disk cache stays)."""
    _RUNNERS.clear()


def _open(data: bytes, used: Sequence[str]) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(data, session_options(), providers=list(used))


def runner(block: Block, graph: Graph, dtype: torch.dtype, used: Sequence[str]) -> Runner:
    """The session of `graph` for `block`: from this process, else the disk cache, else exported."""
    key = cache_key(block, graph, dtype)
    digest = hashlib.sha256(key.encode()).hexdigest()
    memo = (digest, tuple(used))
    if memo in _RUNNERS:
        _RUNNERS.move_to_end(memo)
        return _RUNNERS[memo]
    path = cache_dir() / f"{graph.name}-{digest[:24]}.onnx"
    session = None
    if path.is_file():
        try:
            session = _open(path.read_bytes(), used)
        except Exception as exc:  # unreadable (a disk error, a foreign file): export it again
            warnings.warn(f"onnxrt: cached graph {path} could not be loaded ({type(exc).__name__}: {exc}); "
                          "exporting it again", RuntimeWarning, stacklevel=2)
    if session is None:
        data = export(block, graph, dtype, key)
        try:
            session = _open(data, used)
        except Exception as exc:
            raise LlmkitError(f"onnxruntime cannot run the exported graph {graph.name} "
                              f"({dtype_name(dtype)}, providers {', '.join(used)}): {exc}") from exc
        atomic_write(path, data)
    out = Runner(session, graph, [n for n, _ in _state(block)], path)
    _RUNNERS[memo] = out
    while len(_RUNNERS) > _MEMORY_SESSIONS:
        _RUNNERS.popitem(last=False)
    return out


class _Unexported:
    """What a block prepared on the meta device holds: planning needs no session."""

    def __getitem__(self, name: str) -> Runner:
        raise LlmkitError("this onnxrt block was prepared on the meta device (planning only) and has no "
                          "ONNX session; build the model on device 'cpu' to run it")


def prepare(block: Block, target: Target, graphs: Sequence[Graph]) -> None:
    """Build time: open (exporting if needed) a session per graph and keep them on the block."""
    if target.device == "meta":
        block._onnxrt = _Unexported()
        return
    used = tuple(target.fact("providers") or providers())
    block._onnxrt = {g.name: runner(block, g, target.dtype, used) for g in graphs}

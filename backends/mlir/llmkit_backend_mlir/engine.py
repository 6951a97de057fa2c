"""From a PyTorch function to machine code through MLIR, and calling the result on host tensors.

    make_fx (aten graph; torch-mlir's decompositions; chosen dims symbolic)
    -> torch-mlir fx importer (torch dialect) -> torch-backend-to-linalg-on-tensors pipeline
    -> LOWERING below (our own, after torch-mlir's RefBackend) -> MLIR ExecutionEngine (LLVM JIT)

Calling convention: `refback-munge-calling-conventions` turns every argument into an unranked
memref and the results into one call of `refbackend_consume_func_return_<types>`, which we register
as a Python callback. Inputs are passed zero-copy (a memref descriptor over the tensor's storage;
they must be contiguous: the function boundary uses the identity layout). Results are buffers the
compiled code allocated with malloc and handed over (ownership-based deallocation does not free
function results): the callback copies each into a fresh torch tensor and frees it.

Kernels are cached in memory per (what is computed, input shape signature). The first shape of a
computation compiles static; when a second shape comes (another prompt length, the next decode
step's longer cache), the dims the caller marks dynamic are traced symbolically and compiled as
`?`, and the guards the trace recorded decide which later shapes that kernel serves: one kernel
then serves every prompt length and every decode step. A signature seen before never re-traces.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# torch-mlir's RefBackend pipeline (torch_mlir_e2e_test/linalg_on_tensors_backends/refbackend.py),
# updated for current MLIR: `buffer-deallocation` is now the ownership-based
# `buffer-deallocation-pipeline`, `finalizing-bufferize` is gone, and the sparse-tensor passes are
# left out (no sparse tensors here). `refback-munge-memref-copy` rewrites memref.copy (which would
# need the `memrefCopy` runtime symbol from libmlir_c_runner_utils) into linalg.copy, which lowers
# to plain loops. RefBackend's `refback-expand-ops-for-llvm` is left out too: it rewrites tanh as
# (e^2x - 1) / (e^2x + 1), which loses all relative precision near 0 (tanh-GELU came out 50x
# worse than PyTorch's); without it `convert-math-to-libm` calls the C library's tanhf and erff.
LOWERING = (
    "func.func(linalg-generalize-named-ops)",
    "func.func(linalg-fuse-elementwise-ops)",
    "convert-shape-to-std",
    "func.func(refback-generalize-tensor-pad)",
    "func.func(refback-generalize-tensor-concat)",
    "func.func(tm-tensor-bufferize)",
    "one-shot-bufferize{copy-before-write bufferize-function-boundaries "
    "function-boundary-type-conversion=identity-layout-map}",
    "refback-mlprogram-bufferize",
    "func.func(buffer-deallocation-pipeline)",
    "inline",
    "refback-munge-calling-conventions",
    "func.func(tm-tensor-to-loops)",
    "func.func(refback-munge-memref-copy)",
    "func.func(convert-linalg-to-loops)",
    "func.func(lower-affine)",
    "convert-scf-to-cf",
    "func.func(arith-expand)",
    "func.func(convert-math-to-llvm)",
    "convert-math-to-libm",
    "expand-strided-metadata",
    "finalize-memref-to-llvm",
    "lower-affine",
    "convert-bufferization-to-memref",
    "finalize-memref-to-llvm",
    "func.func(convert-arith-to-llvm)",
    "convert-vector-to-llvm",
    "convert-func-to-llvm",
    "convert-cf-to-llvm",
    "convert-complex-to-llvm",
    "reconcile-unrealized-casts",
)
PIPELINE = "builtin.module(" + ",".join(LOWERING) + ")"
LINALG = "torch-backend-to-linalg-on-tensors-backend-pipeline{allow-non-finites=true}"


def _opt_level() -> int:
    value = os.environ.get("LLMKIT_MLIR_OPT_LEVEL", "2")
    if value not in ("0", "1", "2", "3"):
        raise ValueError(f"LLMKIT_MLIR_OPT_LEVEL={value!r}: expected 0, 1, 2 or 3 (LLVM optimisation level of the JIT)")
    return int(value)


OPT_LEVEL = _opt_level()
"""LLVM optimisation level of the JIT (env LLMKIT_MLIR_OPT_LEVEL, default 2). -O2 code runs 2-3x faster
than -O0; -O0 compiles 10-20x faster (attention kernels: 0.1 s instead of 1.5 s)."""
CONSUME = "refbackend_consume_func_return_"

# the element types refback-munge-calling-conventions spells in the consumer's name
_MEMREF_DTYPES = {
    "mrf32": torch.float32, "mrf64": torch.float64, "mrf16": torch.float16, "mrbf16": torch.bfloat16,
    "mri64": torch.int64, "mri32": torch.int32, "mri8": torch.int8, "mri1": torch.bool,
}

_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]
_libc.free.restype = None


class CompileError(RuntimeError):
    """A function could not be exported, imported or lowered; the message says at which stage."""


class _Unranked(ctypes.Structure):
    _fields_ = [("rank", ctypes.c_longlong), ("descriptor", ctypes.c_void_p)]


_RANKED: dict[int, type[ctypes.Structure]] = {}


def _ranked(rank: int) -> type[ctypes.Structure]:
    """The C struct of a ranked memref descriptor (MLIR's StridedMemRefType<T, rank>)."""
    if rank not in _RANKED:
        fields = [("allocated", ctypes.c_void_p), ("aligned", ctypes.c_void_p), ("offset", ctypes.c_longlong)]
        if rank:
            fields += [("shape", ctypes.c_longlong * rank), ("strides", ctypes.c_longlong * rank)]
        _RANKED[rank] = type(f"MemRef{rank}D", (ctypes.Structure,), {"_fields_": fields})
    return _RANKED[rank]


def version() -> str:
    """The installed torch-mlir distribution's version."""
    from importlib.metadata import version as dist_version

    return dist_version("torch-mlir")


# --- tracing, import and lowering ---------------------------------------------------------------

@dataclass
class Shapes:
    """The input shapes a traced graph serves: static sizes, plus guards on the symbolic ones."""

    static: tuple[tuple[int | None, ...], ...]
    """Per input: the size of each dim, None where the dim is symbolic."""
    guards: str | None
    """Python expression over the inputs (`L['t0']`...) that must hold for the graph to serve them;
    None when nothing was decided on a symbolic size."""
    shape_env: Any

    def serves(self, args: Sequence[torch.Tensor]) -> bool:
        if len(args) != len(self.static):
            return False
        for pattern, a in zip(self.static, args):
            if a.dim() != len(pattern) or any(p is not None and p != s for p, s in zip(pattern, a.shape)):
                return False
        return self.guards is None or bool(self.shape_env.evaluate_guards_expression(self.guards, list(args)))


def trace(fn: nn.Module, args: Sequence[torch.Tensor],
          dynamic: Sequence[Sequence[int]]) -> tuple[torch.fx.GraphModule, Shapes]:
    """Trace `fn(*args)` to a functional aten graph (torch-mlir's decompositions applied) with the
    listed dims of each input symbolic.

    Tracing records every decision taken on a symbolic size as a guard; the kernel serves later
    inputs only where the guards hold (as torch.compile's guards do). Sizes are not duck-typed: two
    dims of equal size at trace time stay two symbols (a prefill's queries and keys are not assumed
    equal in number)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    env = ShapeEnv(specialize_zero_one=False, duck_shape=False)
    mode = FakeTensorMode(shape_env=env)
    mode.cache_enabled = False  # a one-off trace: the dispatch cache costs more than it saves (2x)
    fakes = []
    for a, dims in zip(args, dynamic):
        # a dim seen at size 1 stays static: what tracing decides for a size of 1 (broadcasting)
        # is not always recorded as a guard
        sizes = [DimDynamic.DYNAMIC if d in dims and a.shape[d] > 1 else DimDynamic.STATIC for d in range(a.dim())]
        # a fresh contiguous tensor per input: inputs that alias (a prefill passes its positions as
        # both query and key positions) must not be traced as one tensor with one length
        fresh = torch.empty(a.shape, dtype=a.dtype)
        fakes.append(mode.from_tensor(fresh, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes)))
    with mode, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree APIs that torch 2.13 deprecates
        graph = make_fx(fn, decomposition_table=decompositions())(*fakes)
    _drop_aliases(graph)
    static = tuple(tuple(s if isinstance(s, int) else None for s in f.shape) for f in fakes)
    guards = env.produce_guards_expression(fakes) if any(None in p for p in static) else None
    return graph, Shapes(static, guards or None, env)


# Contractions and reductions whose float32 form accumulates in float64 (see `decompositions`).
_WIDENED = ("mm.default", "bmm.default", "addmm.default", "baddbmm.default", "sum.dim_IntList", "mean.dim",
            "_softmax.default", "_log_softmax.default")


def _in_float64(op: Any) -> Callable[..., Any]:
    def widened(*args: Any, **kwargs: Any) -> Any:
        if not any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args):
            return NotImplemented  # already wide (or not floating): the op itself is traced
        wide = [a.double() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a for a in args]
        return op(*wide, **kwargs).float()

    return widened


@functools.cache
def decompositions() -> dict[Any, Callable[..., Any]]:
    """torch-mlir's decomposition table, plus two precision fixes applied while tracing.

    - GELU comes from PyTorch's own decomposition: torch-mlir lowers the tanh approximation with
      sqrt(2/pi) = 0.797724 (it is 0.7978846), 5e-5 off at |x| ~ 3.
    - Matmuls, sums, means and softmax on float32 accumulate in float64 and round once: the
      linalg-to-loops lowering sums in sequential order, which on a 4096-wide row loses 10x the
      precision of PyTorch's blocked, vectorised sums; a float64 accumulator makes the order moot.
    """
    from torch._decomp import get_decompositions
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    aten = torch.ops.aten
    table = dict(get_decomposition_table())
    table.update(get_decompositions([aten.gelu]))
    for name in _WIDENED:
        packet, overload = name.split(".")
        op = getattr(getattr(aten, packet), overload)
        table[op] = _in_float64(op)
    return table


def _drop_aliases(graph: torch.fx.GraphModule) -> None:
    """`aten.alias` (a full slice, e.g. RoPE over the whole head) is the identity on values; torch-mlir
    cannot legalise it when its result type is more static than its operand's, so it goes."""
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.recompile()


def import_linalg(graph: torch.fx.GraphModule) -> Any:
    """An aten graph as an MLIR module in linalg-on-tensors (torch-mlir's fx importer, then its
    torch-backend-to-linalg pipeline)."""
    from torch_mlir import fx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return fx.stateless_fx_import(graph, output_type="linalg-on-tensors", model_name="main")
    except Exception as exc:
        raise CompileError(f"torch-mlir could not lower to linalg: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if "error:" in line] or text.splitlines() or [type(exc).__name__]
    return lines[0].strip()[:400]


def _lower_to_llvm(module: Any) -> None:
    from torch_mlir.passmanager import PassManager

    try:
        with module.context:
            PassManager.parse(PIPELINE).run(module.operation)
    except Exception as exc:
        raise CompileError(f"lowering linalg to LLVM failed: {_first_line(exc)}") from exc


# --- running compiled code -----------------------------------------------------------------------

class Kernel:
    """One compiled function: call it with host tensors, get host tensors back."""

    def __init__(self, module: Any, shapes: Shapes | None = None) -> None:
        """`module`: lowered to the LLVM dialect by LOWERING; `shapes`: what its trace serves, if known."""
        from torch_mlir.execution_engine import ExecutionEngine

        self.shapes = shapes
        self._lock = threading.Lock()  # results come back through one slot per kernel
        consumers = []
        for op in module.body.operations:
            if "sym_name" in op.attributes:
                name = str(op.attributes["sym_name"]).strip('"')
                if name.startswith(CONSUME):
                    consumers.append(name)
        self._engine = ExecutionEngine(module, opt_level=OPT_LEVEL)
        self._results: list[torch.Tensor] | None = None
        self._error: str | None = None
        self._callbacks = []  # the engine calls into these: they must live as long as it does
        for name in consumers:
            dtypes = [_MEMREF_DTYPES[t] for t in name.removeprefix(CONSUME).split("_")]
            proto = ctypes.CFUNCTYPE(None, *[ctypes.POINTER(_Unranked)] * len(dtypes))
            callback = proto(self._consumer(dtypes))
            self._callbacks.append(callback)
            self._engine.register_runtime(name, callback)
        self._main = self._engine.lookup("main")

    def _consumer(self, dtypes: list[torch.dtype]) -> Callable[..., None]:
        def consume(*results: Any) -> None:
            out, owned = [], set()
            for ptr, dtype in zip(results, dtypes):
                unranked = ptr[0]
                d = ctypes.cast(unranked.descriptor, ctypes.POINTER(_ranked(unranked.rank)))[0]
                shape = list(d.shape) if unranked.rank else []
                strides = list(d.strides) if unranked.rank else []
                t = torch.empty(shape, dtype=dtype)
                if t.numel() and strides != list(t.stride()):
                    # the function boundary uses the identity layout: any other is a lowering bug
                    self._error = f"a result came back with strides {strides} for shape {shape}, not row-major"
                elif t.numel():
                    ctypes.memmove(t.data_ptr(), d.aligned + d.offset * t.element_size(), t.numel() * t.element_size())
                out.append(t)
                # two results may be views of one allocation (a split): free each buffer once
                if d.allocated and d.allocated not in owned:
                    owned.add(d.allocated)
                    _libc.free(d.allocated)
            self._results = out

        return consume  # an exception cannot cross the C boundary: errors go through self._error

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        keep = []
        args = (ctypes.c_void_p * len(tensors))()
        for i, t in enumerate(tensors):
            t = t.contiguous()
            d = _ranked(t.dim())()
            d.allocated = d.aligned = t.data_ptr()
            d.offset = 0
            if t.dim():
                d.shape[:] = t.shape
                d.strides[:] = t.stride()
            u = _Unranked(t.dim(), ctypes.addressof(d))
            p = ctypes.pointer(u)
            keep.append((t, d, u, p))
            args[i] = ctypes.addressof(p)
        with self._lock:
            self._error = None
            self._main(args)
            results, self._results, error = self._results, None, self._error
        if error is not None or results is None:
            raise CompileError(error or "the compiled function returned without producing its results")
        return results


def compile_linalg(module: Any, shapes: Shapes | None = None) -> Kernel:
    """Lower a linalg-on-tensors module (its function `main`) to LLVM and JIT it."""
    _lower_to_llvm(module)
    return Kernel(module, shapes)


def compile_kernel(fn: nn.Module, dynamic: Sequence[Sequence[int]], args: Sequence[torch.Tensor]) -> Kernel:
    """Trace `fn` on `args` (see `trace`), import it to linalg, lower it and JIT it."""
    try:
        graph, shapes = trace(fn, args, dynamic)
    except Exception as exc:
        raise CompileError(f"tracing failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    # the graph is not kept: it would keep the traced block (and its model) alive
    return compile_linalg(import_linalg(graph), shapes)


# --- the cache -----------------------------------------------------------------------------------

@dataclass
class CacheStats:
    compiles: int = 0
    hits: int = 0
    compile_seconds: float = 0.0


@dataclass
class KernelCache:
    """Compiled kernels per family (what they compute, the JIT level, input dtypes and ranks), each
    serving the shapes its trace's guards admit. Exact shape signatures seen before are memoised,
    failures included (a config that does not compile fails fast on the next call). Beyond
    `max_kernels` the oldest family is dropped (and the memo cleared)."""

    max_kernels: int = 512
    stats: CacheStats = field(default_factory=CacheStats)
    _families: OrderedDict[Any, list[Kernel]] = field(default_factory=OrderedDict)
    _seen: dict[Any, Kernel | CompileError] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, key: Any, build: Callable[[], tuple[nn.Module, Sequence[Sequence[int]]]],
            args: Sequence[torch.Tensor]) -> Kernel:
        """The kernel for `key` and these (contiguous) inputs; on a miss `build()` gives the module
        to compile and the dims of each input that may stay dynamic."""
        signature = (key, OPT_LEVEL, tuple((a.shape, a.dtype) for a in args))
        kernel = self._seen.get(signature)
        if isinstance(kernel, Kernel):
            self.stats.hits += 1
            return kernel
        if kernel is not None:
            raise CompileError(str(kernel))
        with self._lock:
            family = (key, OPT_LEVEL, tuple((a.dim(), a.dtype) for a in args))
            kernels = self._families.setdefault(family, [])
            self._families.move_to_end(family)
            kernel = next((k for k in kernels if k.shapes is not None and k.shapes.serves(args)), None)
            if kernel is None:
                start = time.perf_counter()
                fn, dynamic = build()
                if not kernels:
                    # the first shape of a family compiles static (tracing is 5-10x faster); a second
                    # shape means the sizes vary: from then on the dynamic dims stay symbolic
                    dynamic = [()] * len(args)
                try:
                    kernel = compile_kernel(fn, dynamic, args)
                except CompileError as exc:
                    self._seen[signature] = exc
                    raise
                self.stats.compiles += 1
                self.stats.compile_seconds += time.perf_counter() - start
                kernels.append(kernel)
                if sum(len(k) for k in self._families.values()) > self.max_kernels:
                    self._families.popitem(last=False)
                    self._seen.clear()
            else:
                self.stats.hits += 1
            self._seen[signature] = kernel
            return kernel


CACHE = KernelCache()
"""The process's kernels. A kernel depends only on the block config and the input shapes (weights
are inputs), so every block of the same config shares it: a 32-layer model compiles its layer once."""

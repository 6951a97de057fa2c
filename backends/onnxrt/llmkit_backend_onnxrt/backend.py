"""The `onnxrt` backend: onnxruntime's execution providers behind host (cpu) tensors.

Tensors enter and leave an impl on the host; which execution provider computes is the
environment's choice: `LLMKIT_ONNXRT_PROVIDERS` (a comma list, full names such as
`CUDAExecutionProvider` or short ones such as `cuda`), else every available one of CUDA, ROCm,
OpenVINO and CPU, in that order. onnxruntime is imported only when the backend is used (its import
writes under ~/.cache), so `llmkit info` on a machine without it lists the backend with reasons.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch

from llmkit import peaks
from llmkit.errors import LlmkitError
from llmkit.hookspecs import Backend, Peak

PROVIDERS_ENV = "LLMKIT_ONNXRT_PROVIDERS"
PREFERRED = ("CUDAExecutionProvider", "ROCMExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider")
"""Default provider order; others onnxruntime may list (Azure: a remote endpoint) are not used unasked."""
REQUIRED = ("onnxruntime", "onnx", "onnxscript")

@functools.cache
def missing_packages() -> tuple[str, ...]:
    """The required distributions that are not importable (checked without importing them)."""
    return tuple(name for name in REQUIRED if importlib.util.find_spec(name) is None)


def _short(name: str) -> str:
    return name.removesuffix("ExecutionProvider").lower()


@functools.cache
def _providers(requested: str | None) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(available providers, providers to use, reasons the request cannot be honoured)."""
    import onnxruntime as ort

    available = tuple(ort.get_available_providers())
    if not requested:
        return available, tuple(p for p in PREFERRED if p in available), ()
    by_short = {_short(p): p for p in available}
    chosen, reasons = [], []
    for item in (s.strip() for s in requested.split(",")):
        if not item:
            continue
        name = item if item in available else by_short.get(_short(item))
        if name is None:
            reasons.append(f"{PROVIDERS_ENV} names {item!r}, which this onnxruntime does not provide "
                           f"(available: {', '.join(available)})")
        elif name not in chosen:
            chosen.append(name)
    if not chosen and not reasons:
        reasons.append(f"{PROVIDERS_ENV} is set but names no provider (available: {', '.join(available)})")
    return available, tuple(chosen), tuple(reasons)


def providers() -> tuple[str, ...]:
    """The execution providers sessions are created with, in priority order."""
    _, chosen, reasons = _providers(os.environ.get(PROVIDERS_ENV))
    if reasons:
        raise LlmkitError("; ".join(reasons))
    return chosen


class OnnxrtBackend(Backend):
    name = "onnxrt"
    device_type = "cpu"
    dist_backend = "gloo"  # host tensors
    summary = "blocks exported to ONNX (torch.onnx, dynamo) and run by onnxruntime; host tensors in and out"

    def __init__(self) -> None:
        self._peaks: dict[torch.dtype, Peak | None] = {}

    def available(self) -> list[str]:
        missing = missing_packages()
        if missing:
            return [f"{name} is not installed (pip install {name})" for name in missing]
        return list(_providers(os.environ.get(PROVIDERS_ENV))[2])

    def device_facts(self, device: str) -> dict[str, Any]:
        import onnx
        import onnxruntime as ort

        available, chosen, _ = _providers(os.environ.get(PROVIDERS_ENV))
        return {
            # module versions: the distribution may be onnxruntime-gpu, -openvino, ...
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "available_providers": list(available),
            "providers": list(chosen),
            "threads": torch.get_num_threads(),
        }

    def peak(self, device: str, dtype: torch.dtype) -> Peak | None:
        """Measured on the providers in use: the best of a few onnxruntime MatMuls (FLOP/s) and
        large host copies (bytes/s: every tensor crosses host memory here). None for a dtype
        onnxruntime's MatMul does not take from numpy (bfloat16)."""
        if dtype not in self._peaks:
            self._peaks[dtype] = _measure_peak(dtype)
        return self._peaks[dtype]


def _measure_peak(dtype: torch.dtype) -> Peak | None:
    if dtype == torch.bfloat16:
        return None
    import onnx
    import onnx.helper as oh
    import onnxruntime as ort

    from .graphs import session_options

    elem = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
            torch.float64: onnx.TensorProto.DOUBLE}[dtype]
    n = peaks.GEMM_N
    graph = oh.make_graph([oh.make_node("MatMul", ["a", "b"], ["c"])], "peak",
                          [oh.make_tensor_value_info(x, elem, [n, n]) for x in "ab"],
                          [oh.make_tensor_value_info("c", elem, [n, n])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    used = providers()
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=list(used))
    a = torch.randn(n, n).to(dtype).numpy()
    feed = {"a": a, "b": a.copy()}
    flops = 2 * n**3 / peaks.best_seconds(lambda: session.run(None, feed))
    return Peak(flops_per_s=flops, bytes_per_s=peaks.host_copy_bandwidth(),
                source=peaks.describe(f"onnxruntime MatMul on {used[0]}", dtype))

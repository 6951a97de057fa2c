"""The `gaudi` backend: Intel Gaudi HPUs through `habana_frameworks.torch` (the SynapseAI PyTorch bridge).

Written against the SynapseAI API (gaudi-pytorch-bridge `habana_frameworks.torch.hpu`: `is_available`,
`device_count`, `get_device_name`, `synchronize`, `Event(enable_timing=True)`; `.core.mark_step`),
not yet certified on hardware. `habana_frameworks` is not on PyPI (it ships with the Intel Gaudi
software stack), so it is imported only inside the methods: without it the plugin loads and reports
"habana_frameworks not installed".

In lazy mode (the bridge's default) ops are queued into a graph that runs at `mark_step`, so
synchronising and timing both mark a step first.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

from llmkit.hookspecs import Backend, Peak, Timing

from . import capability

TERA = 1e12

PEAKS: dict[str, dict[torch.dtype, float]] = {
    "gaudi2": {torch.bfloat16: 432.0, torch.float8_e4m3fn: 865.0},
    "gaudi3": {torch.bfloat16: 1835.0, torch.float8_e4m3fn: 1835.0},
}
"""Dense MME TFLOP/s: Intel Gaudi 3 AI Accelerator White Paper, table "Gaudi 3 vs Gaudi 2"."""
BANDWIDTH_TB_S = {"gaudi2": 2.46, "gaudi3": 3.7}
"""HBM2e bandwidth, same white paper."""
PEAK_SOURCE = "Intel Gaudi 3 AI Accelerator White Paper (Gaudi 2 / Gaudi 3 comparison table)"


class GaudiBackend(Backend):
    name = "gaudi"
    device_type = "hpu"
    dist_backend = "hccl"
    summary = ("Intel Gaudi HPUs: FusedSDPA, FusedRMSNorm, fused RoPE, the MoE op (written against the "
               "SynapseAI API, not yet certified on hardware)")

    def __init__(self) -> None:
        self._peaks: dict[torch.dtype, Peak] = {}

    def default_device(self) -> str:
        return "hpu"

    def available(self) -> list[str]:
        if importlib.util.find_spec("habana_frameworks") is None:
            return ["habana_frameworks not installed (it ships with the Intel Gaudi software stack, not PyPI)"]
        try:
            import habana_frameworks.torch.hpu as hthpu
        except Exception as exc:  # a broken driver stack is a reason, not a crash
            return [f"importing habana_frameworks.torch failed: {type(exc).__name__}: {exc}"]
        if not hthpu.is_available():
            return ["no Gaudi device visible (habana_frameworks.torch.hpu.device_count() == 0; check hl-smi)"]
        return []

    def device_facts(self, device: str) -> dict[str, Any]:
        import habana_frameworks.torch.hpu as hthpu
        from habana_frameworks.torch.utils.internal import is_lazy

        name = hthpu.get_device_name()
        return {
            "name": name,
            "generation": _generation(name),
            "device_count": hthpu.device_count(),
            "lazy_mode": bool(is_lazy()),
            "moe_op": hasattr(torch.ops.hpu, "mixture_of_experts"),
            "driver": _version("habana-torch-plugin"),
        }

    def synchronize(self, device: str) -> None:
        import habana_frameworks.torch.core as htcore
        import habana_frameworks.torch.hpu as hthpu

        htcore.mark_step()
        hthpu.synchronize()

    def capture_decode(self, step: Callable[[torch.Tensor, Any], torch.Tensor], tokens: torch.Tensor,
                       cache: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor, Any], torch.Tensor]]:
        """An HPU graph of the decode step (`habana_frameworks.torch.hpu.wrap_in_hpu_graph`, as
        optimum-habana wraps its models for generation; not yet run on a Gaudi). The bridge keys a
        graph by the call's arguments: the token tensor's shape and the cache object, the same
        every step, so the first call captures (and returns that step's logits) and later calls
        replay. Correct only over the fixed-shape cache, whose state is on the device."""
        from habana_frameworks.torch.hpu import wrap_in_hpu_graph

        graphed = wrap_in_hpu_graph(_DecodeStep(step), disable_tensor_cache=True)
        return graphed(tokens, cache), graphed

    def time(self, fn: Callable[[], Any], device: str, *, warmup: int = 3, repeat: int = 10) -> Timing:
        """Device time between two HPU events around each call; the step is marked before the end
        event, so the queued graph runs inside the timed span."""
        import habana_frameworks.torch.core as htcore
        import habana_frameworks.torch.hpu as hthpu

        for _ in range(warmup):
            fn()
        self.synchronize(device)
        samples = []
        for _ in range(repeat):
            start, end = hthpu.Event(enable_timing=True), hthpu.Event(enable_timing=True)
            start.record()
            fn()
            htcore.mark_step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        return Timing(tuple(samples), warmup)

    def peak(self, device: str, dtype: torch.dtype) -> Peak | None:
        """The white paper's dense MME figure for bf16/fp8; measured otherwise (float32)."""
        if dtype not in self._peaks:
            gen = self.device_facts(device)["generation"]
            self._peaks[dtype] = declared_peak(gen, dtype) or self._measure(device, dtype)
        return self._peaks[dtype]

    def _measure(self, device: str, dtype: torch.dtype) -> Peak:
        n, nbytes = 4096, 1 << 30
        a = torch.randn(n, n, dtype=torch.float32).to(device=device, dtype=dtype)
        b = torch.randn(n, n, dtype=torch.float32).to(device=device, dtype=dtype)
        gemm = min(self.time(lambda: torch.mm(a, b), device, warmup=2, repeat=5).samples)
        src = torch.ones(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        copy = min(self.time(lambda: dst.copy_(src), device, warmup=2, repeat=5).samples)
        return Peak(flops_per_s=2 * n**3 / gemm, bytes_per_s=2 * nbytes / copy,
                    source=f"measured: best of 5 torch.mm {n}^3 in {str(dtype).removeprefix('torch.')} and 5 "
                           f"device copies of {nbytes >> 20} MiB, HPU events")


def declared_peak(generation: str | None, dtype: torch.dtype) -> Peak | None:
    """The white paper figures for a generation and dtype, None where it lists none."""
    table = PEAKS.get(generation or "", {})
    if dtype not in table:
        return None
    bw = BANDWIDTH_TB_S[generation]  # type: ignore[index]
    return Peak(flops_per_s=table[dtype] * TERA, bytes_per_s=bw * TERA,
                source=f"{PEAK_SOURCE}: {generation}, dense {str(dtype).removeprefix('torch.')} MME "
                       f"{table[dtype]:g} TFLOP/s, HBM {bw:g} TB/s")


def _generation(name: str) -> str | None:
    """"GAUDI2" / "GAUDI3" / "GAUDI" (hthpu.get_device_name) -> "gaudi2" / "gaudi3" / "gaudi"."""
    lowered = name.lower().replace(" ", "")
    for gen in reversed(capability.GENERATIONS):
        if gen in lowered:
            return gen
    return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


class _DecodeStep(torch.nn.Module):
    """The decode step as a module: what wrap_in_hpu_graph wraps."""

    def __init__(self, step: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
        super().__init__()
        self.step = step

    def forward(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        return self.step(tokens, cache)

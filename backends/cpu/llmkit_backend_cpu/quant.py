"""Packed (weight-compressed) linears for the CPU impls, on PyTorch's CPU kernels.

Selected per model with `quant="int8"`, `"int4"`, `"w4a8"` or `"fp16"` (`llmkit.load/build(..., quant=...)`,
CLI `--quant`), which reaches impls as the target fact `quant`. An impl that supports it packs its
block's linear weights once, in `prepare`, into `block._cpu_quant` (the float parameters stay: the
state dict is the same on every backend); `linear` then uses the packed weights for decode-sized
inputs (see `PACKED_MAX_ROWS`). Linears that read the same input (q/k/v, gate/up) are packed as one
matrix, so a decode step runs one GEMM for them instead of two or three (`grouped`).

- int8: symmetric per output channel, s = max|w_row| / 127, q = round(w / s) in [-127, 127];
  `torch._weight_int8pack_mm(x, q, s)`. Error per weight <= s / 2. Activations stay in the
  model's dtype (bfloat16 is the fast path; float32 works but runs slowly there).
- int4: asymmetric per group of `GROUP` input channels, s = (max - min) / 15,
  q = round((w - min) / s) in [0, 15], w ~ (q - 8) s + z with z = min + 8 s (the kernel's
  convention); `torch._weight_int4pack_mm_for_cpu`. Error per weight <= s / 2 (plus bf16 rounding
  of s and z).
- w4a8: the int4 weights above (float32 s and min, rows in tiles of 8), and activations rounded to
  int8 per block of 32 at every call: integer dot products in this plugin's AVX2 kernel (w4a8.py,
  w4a8.c, w4a8_op.cpp).
- fp16: weights rounded to IEEE half (relative error <= 2^-11 in half's normal range), packed by
  fbgemm (`quantized::linear_prepack_fp16`); `quantized::linear_dynamic_fp16` converts them back
  and multiplies in float32 with float32 activations (a bfloat16 model's activations are upcast
  around the call). Not a quantisation of activations: the one rounding is the weight's. x86 builds
  of PyTorch only (fbgemm); on AVX2 it reads half of float32's bytes without bf16's slow GEMMs.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.hookspecs import Target
from llmkit_blocks import attention as _attn

from . import w4a8

MODES = ("int8", "int4", "w4a8", "fp16")
GROUP = 32
PACKED_MAX_ROWS = 16
"""Above this many rows (prefill) a linear uses the float weight, which the block keeps anyway: a
large GEMM is compute-bound, and PyTorch's packed CPU kernels are slower there than its float
GEMM (SmolLM2 512-token prefill in bf16: 543 tok/s with int8 kernels vs 1059 with bf16 GEMMs);
at decode the packed weight's smaller reads win. Packing is thus a decode-time choice."""


class Packed(NamedTuple):
    """One packed matrix: `weight` is the kernel's operand (a `_Fp16Handle` for fp16), `scales`
    its int8 scales, int4 scales-and-zeros, w4a8 scales-and-minima (None for fp16)."""
    mode: str
    weight: Any
    scales: torch.Tensor | None
    out_features: int


_FP16: dict[int, Any] = {}
"""fbgemm's packed fp16 matrices by slot. The compiled decode step sees only the slot (an int):
dynamo cannot trace the TorchScript object fbgemm packs into."""
_slots = itertools.count()


class _Fp16Handle:
    """Owns one `_FP16` slot; the slot is freed with the handle (that is, with its block). A copy
    gets a slot of its own for the same (immutable) packed matrix, so freeing one leaves the other."""

    def __init__(self, packed: Any) -> None:
        self.slot = next(_slots)
        _FP16[self.slot] = packed
        weakref.finalize(self, _FP16.pop, self.slot, None)

    def __copy__(self) -> _Fp16Handle:
        return _Fp16Handle(_FP16[self.slot])

    def __deepcopy__(self, memo: dict[int, Any]) -> _Fp16Handle:
        return self.__copy__()


def _linear_fp16(x: torch.Tensor, slot: int, out_features: int) -> torch.Tensor:
    """x [N, in] float32 @ W^T with the fp16 matrix packed in `slot`."""
    return torch.ops.quantized.linear_dynamic_fp16(x, _FP16[slot])


def _linear_fp16_fake(x: torch.Tensor, slot: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


@functools.cache
def _register_fp16_op() -> torch.library.Library:
    """Define `llmkit_cpu::linear_fp16` at the first fp16 pack, not at import: registering a fake
    impl imports torch's tracing machinery (~140 MiB of RSS), which plugin discovery should not pay.
    A plain dispatcher op, not `torch.library.custom_op`: under torch.profiler that wrapper showed
    ~200 us a call, this op 57 us (timed without the profiler: 5-10 us more than fbgemm's call)."""
    lib = torch.library.Library("llmkit_cpu", "DEF")
    lib.define("linear_fp16(Tensor x, int slot, int out_features) -> Tensor")
    lib.impl("linear_fp16", _linear_fp16, "CPU")
    torch.library.register_fake("llmkit_cpu::linear_fp16", _linear_fp16_fake, lib=lib)
    return lib


def fp16_available() -> str | None:
    """None if this PyTorch build has fbgemm's fp16 linear, else why not."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "quant fp16 needs PyTorch's fbgemm kernels (x86 builds); this build has none"
    return None


def modes_here() -> list[str]:
    """Every quant mode, as its name where it can run here, else "name: why not" (`llmkit info`).
    w4a8's kernel is checked for what its build needs (AVX2, a C++ compiler), not built."""
    why = {"fp16": fp16_available(), "w4a8": w4a8.prerequisites()}
    return [mode if why.get(mode) is None else f"{mode}: {why[mode]}" for mode in MODES]


def pack(w: torch.Tensor, mode: str, dtype: torch.dtype) -> Packed:
    """A float weight [out, in] -> the `Packed` matrix `matmul` multiplies by."""
    w = w.detach().float()
    out_features, in_features = w.shape
    if mode == "int8":
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return Packed(mode, q, scale.to(dtype), out_features)
    if mode == "fp16":
        _register_fp16_op()
        return Packed(mode, _Fp16Handle(torch.ops.quantized.linear_prepack_fp16(w.contiguous(), None)), None,
                      out_features)
    if in_features % GROUP:
        raise LlmkitError(f"{mode} needs in_features divisible by {GROUP}, got {in_features}")
    g = w.view(out_features, in_features // GROUP, GROUP)
    low = g.amin(dim=-1)
    scale = ((g.amax(dim=-1) - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15)
    if mode == "w4a8":  # the same int4 values in tiles of 8 rows, the last padded with zero rows
        w4a8.register_op()
        pad = -out_features % 8
        q, scale, low = (F.pad(v, (0, 0) * (v.dim() - 1) + (0, pad)) for v in (q.to(torch.uint8), scale, low))
        weight, scales = w4a8.tiles(q, scale, low)
        return Packed(mode, weight, scales, out_features)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).view(out_features, in_features), 1)
    scales_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return Packed(mode, packed, scales_zeros, out_features)


def group_name(names: Sequence[str]) -> str:
    """The `_cpu_quant` key of linears packed as one matrix: their names joined by '+'."""
    return "+".join(names)


def quantize(block: Any, names: Iterable[str | Sequence[str]], target: Target) -> None:
    """`prepare` step: pack the named weights when the target asks for it. A tuple of names is
    packed as one matrix (their rows stacked in order), for inputs they share."""
    mode = target.fact("quant")
    block._cpu_quant = {}
    block.quantized = None
    if mode is None or target.device == "meta":
        return
    if mode not in MODES:
        raise LlmkitError(f"quant {mode!r} is not supported by the cpu backend ({', '.join(MODES)})")
    if mode == "fp16" and (why := fp16_available()):
        raise LlmkitError(why)
    if mode == "w4a8" and (why := w4a8.unavailable()):
        raise LlmkitError(why)
    for name in names:
        if isinstance(name, str):
            block._cpu_quant[name] = pack(getattr(block, name), mode, target.dtype)
        else:
            w = torch.cat([getattr(block, n).detach() for n in name])
            block._cpu_quant[group_name(name)] = pack(w, mode, target.dtype)
    block.quantized = mode


def matmul(entry: Packed, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequant(W)^T with a packed weight."""
    flat = x.reshape(-1, x.shape[-1])
    if entry.mode == "int8":
        y = torch._weight_int8pack_mm(flat, entry.weight, entry.scales)
    elif entry.mode == "int4":
        y = torch._weight_int4pack_mm_for_cpu(flat, entry.weight, GROUP, entry.scales)
    elif entry.mode == "w4a8":
        y = torch.ops.llmkit_cpu.linear_w4a8.default(flat.float().contiguous(), entry.weight, entry.scales)
        y = (y if y.shape[-1] == entry.out_features else y[:, :entry.out_features]).to(x.dtype)
    else:
        x32 = flat.float().contiguous()
        slot = entry.weight.slot
        # eager calls skip the op's dispatch (5-10 us a call more than calling fbgemm directly)
        op = torch.ops.llmkit_cpu.linear_fp16 if torch.compiler.is_compiling() else _linear_fp16
        y = op(x32, slot, entry.out_features).to(x.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def small(x: torch.Tensor) -> bool:
    """Whether `x` is decode-sized: at most PACKED_MAX_ROWS rows."""
    return x.numel() <= PACKED_MAX_ROWS * x.shape[-1]


def linear(block: Any, weight: str, bias: str | None, x: torch.Tensor) -> torch.Tensor:
    """`llmkit_blocks.attention.linear` with the block's packed weight when it has one."""
    entry = block.__dict__.get("_cpu_quant", {}).get(weight)
    if entry is None or not small(x):
        return _attn.linear(block, weight, bias, x)
    y = matmul(entry, x)
    return y + getattr(block, bias) if bias else y


def grouped(block: Any, names: Sequence[str], x: torch.Tensor) -> _attn.Linear:
    """A `linear` for `x` that serves `names` from their one packed matrix: the first request of
    any of them runs the GEMM, the others take their slice of its output. Other weights, other
    inputs, and blocks without the group go through `linear`."""
    entry = block.__dict__.get("_cpu_quant", {}).get(group_name(names))
    if entry is None or not small(x):
        return linear
    outputs: dict[str, torch.Tensor] = {}

    def lin(blk: Any, weight: str, bias: str | None, inp: torch.Tensor) -> torch.Tensor:
        if blk is not block or inp is not x or weight not in names:
            return linear(blk, weight, bias, inp)
        if not outputs:
            sizes = [getattr(block, n).shape[0] for n in names]
            outputs.update(zip(names, matmul(entry, x).split(sizes, dim=-1)))
        y = outputs[weight]
        return y + getattr(block, bias) if bias else y

    return lin

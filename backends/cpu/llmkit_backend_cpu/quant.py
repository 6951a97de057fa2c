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
  int8 per block of 32 at every call: integer dot products in this plugin's AVX2 kernel
  (kernels.py, w4a8.c, ops.cpp).
- fp16: weights rounded to IEEE half (relative error <= 2^-11 in half's normal range; a weight
  beyond half's range is refused), rows in tiles of 8; this plugin's AVX2 kernel (f16.c) converts
  them back exactly and multiplies in float32 with float32 activations (a bfloat16 model's
  activations are upcast around the call). Not a quantisation of activations: the one rounding is
  the weight's. It reads half of float32's bytes without bf16's slow GEMMs on AVX2.

Unpacked (no `quant`), float32 and bfloat16 blocks multiply decode-sized inputs (at most
`GEMV_MAX_ROWS` rows, outside autograd) by weights of `GEMV_MIN_WEIGHTS` or more through this
plugin's GEMV kernel (`gemv_linear`; gemv.c): the weights as stored, float32 sums, the output
rounded once to the block's dtype, as `F.linear` does.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.hookspecs import Target
from llmkit_blocks import attention as _attn

from . import kernels

MODES = ("int8", "int4", "w4a8", "fp16")
KERNEL_MODES = ("w4a8", "fp16")
"""Modes multiplied by this plugin's own kernels (kernels.py), built at first use."""
GROUP = 32
PACKED_MAX_ROWS = 16
"""Above this many rows (prefill) a linear uses the float weight, which the block keeps anyway: a
large GEMM is compute-bound, and PyTorch's packed CPU kernels are slower there than its float
GEMM (SmolLM2 512-token prefill in bf16: 543 tok/s with int8 kernels vs 1059 with bf16 GEMMs);
at decode the packed weight's smaller reads win. Packing is thus a decode-time choice."""


class Packed(NamedTuple):
    """One packed matrix: `weight` is the kernel's operand, `scales` its int8 scales, int4
    scales-and-zeros, w4a8 scales-and-minima (None for fp16)."""
    mode: str
    weight: torch.Tensor
    scales: torch.Tensor | None
    out_features: int


def modes_here() -> list[str]:
    """Every quant mode, as its name where it can run here, else "name: why not" (`llmkit info`).
    The kernels of w4a8 and fp16 are checked for what their build needs (AVX2, a C++ compiler),
    not built."""
    why = {mode: kernels.prerequisites(mode) for mode in KERNEL_MODES}
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
        kernels.register_ops()
        if (big := w.abs().max().item()) > torch.finfo(torch.float16).max:
            raise LlmkitError(f"quant fp16: a weight of magnitude {big:.6g} is beyond half precision's range "
                              f"(max {torch.finfo(torch.float16).max:.0f}); use another quant mode or none")
        return Packed(mode, kernels.f16_tiles(F.pad(w, (0, 0, 0, -out_features % 8))), None, out_features)
    if in_features % GROUP:
        raise LlmkitError(f"{mode} needs in_features divisible by {GROUP}, got {in_features}")
    g = w.view(out_features, in_features // GROUP, GROUP)
    low = g.amin(dim=-1)
    scale = ((g.amax(dim=-1) - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15)
    if mode == "w4a8":  # the same int4 values in tiles of 8 rows, the last padded with zero rows
        kernels.register_ops()
        pad = -out_features % 8
        q, scale, low = (F.pad(v, (0, 0) * (v.dim() - 1) + (0, pad)) for v in (q.to(torch.uint8), scale, low))
        weight, scales = kernels.w4a8_tiles(q, scale, low)
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
    block._cpu_gemv = False
    if mode is None:
        prepare_gemv(block, target)
    if mode is None or target.device == "meta":
        return
    if mode not in MODES:
        raise LlmkitError(f"quant {mode!r} is not supported by the cpu backend ({', '.join(MODES)})")
    if mode in KERNEL_MODES and (why := kernels.unavailable(mode)):
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
    else:
        x32 = flat.float().contiguous()
        if entry.mode == "w4a8":
            y = torch.ops.llmkit_cpu.linear_w4a8.default(x32, entry.weight, entry.scales)
        else:
            y = torch.ops.llmkit_cpu.linear_f16.default(x32, entry.weight)
        y = (y if y.shape[-1] == entry.out_features else y[:, :entry.out_features]).to(x.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def _native_bf16() -> bool:
    """Whether PyTorch reports bf16 instructions here (AVX-512 BF16); non-x86 CPUs are assumed to
    have their own fast bf16 path (not widened: unmeasured here)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


WIDEN_BF16 = not _native_bf16()
"""On an x86 CPU without bf16 instructions (AVX2, AVX-512 without BF16) PyTorch's bfloat16 GEMM
is a slow emulation: 512 x 576 by 576 x 3072 took 104 ms against 16 ms for the same product
widened to float32 (AVX2 EPYC, 2 threads). So prefill-sized bfloat16 products are computed in
float32 from the exactly widened operands and rounded once to bfloat16, which is what the
bfloat16 GEMM computes too (float32 accumulation, one rounding), a little more exactly."""


def wide_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` of bfloat16 operands in float32, rounded once to x's dtype (`WIDEN_BF16`)."""
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


GEMV_MAX_ROWS = 4
"""Up to this many rows of x a product of unpacked float32 or bfloat16 weights is a GEMV (each
weight read once, the rows reuse it from cache): SmolLM2's 210 layer linears and its head at one
token took 12.4 ms with the kernel against 32.2 ms with `F.linear` in float32 and 7.2 against
12.9 ms in bfloat16 (AVX-512 EPYC, 2 threads, 30 layers of distinct weights, medians of 13)."""
GEMV_MIN_WEIGHTS = {torch.float32: 65536, torch.bfloat16: 16384}
"""Below this many weights `F.linear`'s own small-matrix path is as fast or faster (one row of x,
2 threads, AVX-512 EPYC; a matrix called in a loop, so in cache: float32 128 x 256 took 4.1 us with
it against 5.0 with the kernel, 256 x 256 5.8 against 5.9, 192 x 576 9.3 against 6.9; bfloat16
128 x 256 13.8 against 4.1; a 64 x 128 float32 weight 1.9 against 3.0 even cycling through 200)."""
GEMV_DTYPES = (torch.float32, torch.bfloat16)


def prepare_gemv(block: Any, target: Target) -> None:
    """`prepare` step: whether this block's unpacked products may use the GEMV kernel (a float32
    or bfloat16 block on a real device where the kernels build; built here at the first bind)."""
    block._cpu_gemv = target.device != "meta" and target.dtype in GEMV_DTYPES and kernels.ready()


def gemv_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` through the GEMV kernel (`llmkit_cpu::gemv`): x's rows against w as stored,
    float32 sums, rounded once to x's dtype; bfloat16 x with bfloat16 w go in as they are (the
    kernel's vdpbf16ps path where the CPU has AVX512_BF16)."""
    flat = x.reshape(-1, x.shape[-1])
    same = x.dtype == w.dtype == torch.bfloat16
    y = torch.ops.llmkit_cpu.gemv.default((flat if same else flat.float()).contiguous(), w).to(x.dtype)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if b is None else y + b


def gemv_ready(block: Any, x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether this plugin's kernels may multiply x by the block's `weights` now: `prepare_gemv`
    allowed it, no autograd, and x and the weights in one of the kernels' dtypes (a block bound in
    one may have been converted since, as `.double()` makes an oracle copy)."""
    return (block.__dict__.get("_cpu_gemv", False) and not torch.is_grad_enabled() and x.dtype in GEMV_DTYPES
            and all(w.dtype == x.dtype for w in weights))


def _gemv_fits(block: Any, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `gemv_linear` serves this product (`gemv_ready`, `GEMV_MAX_ROWS`,
    `GEMV_MIN_WEIGHTS`)."""
    return (gemv_ready(block, x, w) and w.numel() >= GEMV_MIN_WEIGHTS[w.dtype]
            and x.numel() <= GEMV_MAX_ROWS * x.shape[-1])


def small(x: torch.Tensor) -> bool:
    """Whether `x` is decode-sized: at most PACKED_MAX_ROWS rows."""
    return x.numel() <= PACKED_MAX_ROWS * x.shape[-1]


def float_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` with float weights, in float32 for prefill-sized bfloat16 inputs where `WIDEN_BF16`."""
    if WIDEN_BF16 and x.dtype == torch.bfloat16 and not small(x):
        return wide_linear(x, w, b)
    return F.linear(x, w, b)


def block_linear(block: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b with the block's unpacked weight: `gemv_linear` where it fits, else `float_linear`."""
    return gemv_linear(x, w, b) if _gemv_fits(block, x, w) else float_linear(x, w, b)


def linear(block: Any, weight: str, bias: str | None, x: torch.Tensor) -> torch.Tensor:
    """`llmkit_blocks.attention.linear` with the block's packed weight when it has one (decode
    sizes), else `block_linear`."""
    entry = block.__dict__.get("_cpu_quant", {}).get(weight)
    if entry is None or not small(x):
        return block_linear(block, x, getattr(block, weight), getattr(block, bias) if bias else None)
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

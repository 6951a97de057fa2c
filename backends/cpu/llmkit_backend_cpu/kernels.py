"""This plugin's own C kernels: packed linears for `quant="w4a8"` and `quant="fp16"`, the GEMVs of
decode-sized unpacked linears (quant.gemv_linear: cpu.linear, the attention impls' projections,
cpu.grouped's experts), and cpu.grouped's whole layer at decode.

- w4a8 (w4a8.c): int4 weights times int8 activations. PyTorch's weight-only int4 kernel
  (`_weight_int4pack_mm_for_cpu`) converts every weight to float before it multiplies; on AVX2 that
  makes it compute-bound: SmolLM2's 121 decode linears took 15.6 ms with it (bf16 activations),
  18.8 ms with fbgemm's fp16 ones and 5-6 ms with this kernel's C calls (one token, 2 threads,
  medians of 7-15 runs). llama.cpp's Q4_1 x Q8_1 dot product is the model: activations are rounded
  to int8 per block of 32 values at every call, so that products of weights and activations are
  integer dot products. That is a second rounding next to the weights', the cost of the speed; its
  accuracy on SmolLM2 is measured in tests/test_cpu_backend.py and README.
- fp16 (f16.c): half-precision weights converted exactly to float32 in registers (F16C) and
  multiplied by float32 activations; bound by the weights' bytes, which it streams at ~25 GB/s
  where fbgemm's fp16 GEMM reached ~15 (the 121 linears: 10.6 against 17.5 ms).
- gemv (gemv.c): float32 or bfloat16 weights as stored (row-major, no packing) times a few float32
  rows, or bfloat16 ones with bfloat16 weights (AVX512_BF16's vdpbf16ps where the CPU has it); an
  expert's matrices at ~29 GB/s where PyTorch's float32 GEMV reached ~15 (AVX2 VM, first version);
  SmolLM2's decode linears in 12.4 ms against 32.2 with `F.linear` (float32, AVX-512 VM).
- moe_decode (moe.c): a whole moe@1 layer (routing, the active experts with gemv's row kernels,
  the weighted sum) for a few tokens in one call, where PyTorch operations on cold caches cost as
  much as the weights' distance to the roofline.
- moe_experts (ops.cpp): at prefill, several experts' slices of tokens spread over the threads, one
  expert per thread at a time, each product PyTorch's GEMM on that thread (through the shim's
  mm/addmm), the activation moe.c's.

They are C (AVX2, FMA and F16C intrinsics, OpenMP over blocks of output rows; gemv.h holds the
row kernels gemv.c and moe.c share); ops.cpp makes them the CPU kernels of the dispatcher ops
`llmkit_cpu::linear_w4a8`, `llmkit_cpu::linear_f16`, `llmkit_cpu::gemv`,
`llmkit_cpu::moe_decode` and `llmkit_cpu::moe_experts` through libtorch's stable C API, so that
eager calls and compiled decode steps reach them without passing through Python (the schemas and
the fake impls, which give inductor the output shape, are defined here). The sources are compiled
together with the C++ compiler (`$CXX`, default `c++`) at the first use, against the running
torch's headers and libtorch_cpu, and cached under
`${XDG_CACHE_HOME:-~/.cache}/llmkit/cpu-kernels/`, named by a hash of the sources and headers,
flags, compiler and torch build.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("w4a8.c", "f16.c", "gemv.c", "moe.c", "ops.cpp"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("gemv.h", "moe.h"))
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmkit" / "cpu-kernels"


def _compiler() -> tuple[str, str | None]:
    """The C++ compiler's name ($CXX, default c++) and its path (None if not found)."""
    cxx = os.environ.get("CXX") or "c++"
    return cxx, shutil.which(cxx)


def prerequisites(mode: str) -> str | None:
    """Why quant `mode`'s kernel cannot be built here (no AVX2, no C++ compiler), without building
    it. F16C is not checked apart: every x86 CPU with AVX2 has it (Haswell, Excavator and later)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"quant {mode} needs an x86 CPU with AVX2 and FMA (PyTorch reports {capability})"
    cxx, exe = _compiler()
    if exe is None:
        return f"quant {mode} builds its kernel with a C++ compiler at first use; {cxx!r} was not found (set CXX)"
    return None


@functools.cache
def _library() -> Any:
    """The built kernel library (ctypes), or a str saying why the build failed (`unavailable`
    checks `prerequisites` first and names the mode: both modes share the library)."""
    exe = _compiler()[1]
    root = Path(torch.__file__).parent
    link = ("-L", str(root / "lib"), "-ltorch_cpu", f"-Wl,-rpath,{root / 'lib'}")
    # "-x c" before each C source: g++ compiled a second .c file after one "-x c" as C++
    c_sources = [arg for source in SOURCES[:-1] for arg in ("-x", "c", str(source))]
    command = [exe, *FLAGS, "-I", str(root / "include"), *c_sources, "-x", "c++", str(SOURCES[-1]), *link]
    key = hashlib.sha256(b"\0".join([*(s.read_bytes() for s in (*SOURCES, *HEADERS)), " ".join(command).encode(),
                                     torch.__version__.encode()])).hexdigest()[:16]
    path = cache_dir() / f"kernels-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # another process may build it too
        run = subprocess.run([*command, "-o", str(tmp)], capture_output=True, text=True)
        if run.returncode:
            tmp.unlink(missing_ok=True)
            return f"building its kernel with {exe} failed: {run.stderr.strip()[-800:]}"
        os.replace(tmp, path)
    return ctypes.CDLL(str(path))


def unavailable(mode: str) -> str | None:
    """None if quant `mode`'s kernel is built (building it if need be), else why it cannot be."""
    if why := prerequisites(mode):
        return why
    library = _library()
    return f"quant {mode}: {library}" if isinstance(library, str) else None


def _linear_fake(x: torch.Tensor, w: torch.Tensor, *scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], 8 * w.shape[0])


def _gemv_fake(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)


def _moe_decode_fake(x: torch.Tensor, router: torch.Tensor, correction_bias: torch.Tensor, w_gate: torch.Tensor,
                     w_up: torch.Tensor, w_down: torch.Tensor, b_gate: torch.Tensor, b_up: torch.Tensor,
                     b_down: torch.Tensor, top_k: int, *options: float) -> tuple[torch.Tensor, ...]:
    n, e = x.shape[0], router.shape[0]
    scores = [x.new_empty(n, e, dtype=torch.float32) for _ in range(2)]
    return (x.new_empty(x.shape), *scores, x.new_empty(n, top_k, dtype=torch.int64),
            x.new_empty(n, top_k, dtype=torch.float32), x.new_empty(e, dtype=torch.int64),
            x.new_empty(3, dtype=torch.int64), x.new_empty((), dtype=torch.float32))


def _moe_experts_fake(x: torch.Tensor, *operands: object) -> torch.Tensor:
    return x.new_empty(x.shape)


MOE_EXPERTS_SCHEMA = (
    "moe_experts(Tensor x, Tensor experts, Tensor counts, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor b_gate, "
    "Tensor b_up, Tensor b_down, int activation) -> Tensor"
)
"""y [m, d]: the rows x [m, d] of several experts, expert experts[j] taking the next counts[j], each
through its expert (before any routing weight); operands and activation as moe_decode's (ops.cpp)."""

MOE_DECODE_SCHEMA = (
    "moe_decode(Tensor x, Tensor router, Tensor correction_bias, Tensor w_gate, Tensor w_up, Tensor w_down, "
    "Tensor b_gate, Tensor b_up, Tensor b_down, int top_k, int scoring, int n_group, int topk_group, "
    "int renormalize, float routed_scaling, int capacity, int activation) "
    "-> (Tensor out, Tensor logits, Tensor scores, Tensor selected, Tensor weights, Tensor counts, "
    "Tensor info, Tensor aux_loss)"
)
"""info (int64 [3]): whether an exact tie decided the routing (out is then not computed, and the
caller routes that call itself), the largest count and the assignments beyond capacity; aux_loss a
float32 zero scalar (ops.cpp)."""


def ready() -> bool:
    """Whether the kernels can run here (built and registered, building them if need be): for
    callers with a PyTorch path of their own to take otherwise (cpu.grouped's GEMVs)."""
    if unavailable("gemv") is not None:
        return False
    register_ops()
    return True


@functools.cache
def register_ops() -> torch.library.Library:
    """Define `llmkit_cpu::linear_w4a8(x [M, K] float32, w [N/8, 4K] uint8, s [N/8, K/32, 2, 8]
    float32) -> y [M, N] float32`, x rounded to int8 per block of 32 (`w4a8_tiles` gives w and s
    from quant.pack's values), and `llmkit_cpu::linear_f16(x [M, K] float32, w [N/8, K, 8]
    float16) -> y [M, N] float32` (`f16_tiles`), and `llmkit_cpu::gemv(x [M, K] float32, w [N, K]
    float32 or bfloat16; or both bfloat16) -> y [M, N] float32` (any w as stored), and
    `llmkit_cpu::moe_decode` (`MOE_DECODE_SCHEMA`; operands in ops.cpp, formula in moe.c), and
    `llmkit_cpu::moe_experts` (`MOE_EXPERTS_SCHEMA`), and register their kernels. Done at the
    first use, not at import: a fake impl imports torch's tracing machinery (~140 MiB of RSS),
    which plugin discovery should not pay."""
    if why := unavailable("w4a8/fp16"):
        raise RuntimeError(why)
    if _library().llmkit_cpu_register():
        raise RuntimeError("registering the kernels of the llmkit_cpu ops with the dispatcher failed")
    lib = torch.library.Library("llmkit_cpu", "DEF")
    lib.define("linear_w4a8(Tensor x, Tensor w, Tensor s) -> Tensor")
    lib.define("linear_f16(Tensor x, Tensor w) -> Tensor")
    lib.define("gemv(Tensor x, Tensor w) -> Tensor")
    lib.define(MOE_DECODE_SCHEMA)
    lib.define(MOE_EXPERTS_SCHEMA)
    for name in ("linear_w4a8", "linear_f16"):
        torch.library.register_fake(f"llmkit_cpu::{name}", _linear_fake, lib=lib)
    torch.library.register_fake("llmkit_cpu::gemv", _gemv_fake, lib=lib)
    torch.library.register_fake("llmkit_cpu::moe_decode", _moe_decode_fake, lib=lib)
    torch.library.register_fake("llmkit_cpu::moe_experts", _moe_experts_fake, lib=lib)
    return lib


def f16_tiles(w: torch.Tensor) -> torch.Tensor:
    """A float weight [N, K] (N a multiple of 8) -> the fp16 kernel's operand [N/8, K, 8] float16,
    element [t, k, r] = W[8t + r, k] rounded to half (layout in f16.c)."""
    n, k = w.shape
    return w.to(torch.float16).view(n // 8, 8, k).transpose(1, 2).contiguous()


def w4a8_tiles(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 values q [N, K/32, 32] uint8 with group scales d and minima m [N, K/32] (w ~ d q + m,
    quant.pack; N a multiple of 8) -> the w4a8 kernel's operands (layout in w4a8.c): w [N/8, 4K], byte
    [t, g, h, r, i] holding q[8t + r, g, 8h + i] (low nibble) and q[8t + r, g, 8h + 4 + i] (high);
    s [N/8, K/32, 2, 8], the tile's 8 rows' d then m per group."""
    n, groups, _ = q.shape
    q6 = q.view(n // 8, 8, groups, 4, 2, 4)  # [t, r, g, h, low/high, i]
    w = (q6[..., 0, :] | (q6[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).reshape(n // 8, -1).contiguous()
    per_tile = [v.float().view(n // 8, 8, groups).transpose(1, 2) for v in (d, m)]
    return w, torch.stack(per_tile, dim=2).contiguous()

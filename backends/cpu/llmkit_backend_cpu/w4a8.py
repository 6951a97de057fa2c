"""`quant="w4a8"`: int4 weights times int8 activations, with a kernel of this plugin's own.

PyTorch's weight-only int4 kernel (`_weight_int4pack_mm_for_cpu`) converts every weight to float
before it multiplies; on AVX2 that makes it compute-bound: SmolLM2's 121 decode linears took
15.6 ms with it (bf16 activations), 18.8 ms with fbgemm's fp16 ones and 5-6 ms with this
kernel's C calls (one token, 2 threads, medians of 7-15 runs). llama.cpp's Q4_1 x Q8_1 dot
product is the model: activations are rounded to int8 per block of 32 values at every call, so
that products of weights and activations are integer dot products (see w4a8.c for the formula).
That is a second rounding next to the weights', the cost of the speed; its accuracy on SmolLM2
is measured in tests/test_cpu_backend.py and README.

The kernel is C (AVX2 + FMA intrinsics, OpenMP over output rows); w4a8_op.cpp makes it the CPU
kernel of the dispatcher op `llmkit_cpu::linear_w4a8` through libtorch's stable C API, so that
eager calls and compiled decode steps reach it without passing through Python (the schema and the
fake impl, which gives inductor the output shape, are defined here). Both are compiled together
with the C++ compiler (`$CXX`, default `c++`) at the first w4a8 pack, against the running torch's
headers and libtorch_cpu, and cached under `${XDG_CACHE_HOME:-~/.cache}/llmkit/cpu-kernels/`,
named by a hash of the sources, flags, compiler and torch build.
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

SOURCES = (Path(__file__).with_name("w4a8.c"), Path(__file__).with_name("w4a8_op.cpp"))
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmkit" / "cpu-kernels"


def prerequisites() -> str | None:
    """Why the kernel cannot be built here (no AVX2, no C++ compiler), without building it."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"quant w4a8 needs an x86 CPU with AVX2 and FMA (PyTorch reports {capability})"
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        return f"quant w4a8 builds its kernel with a C++ compiler at first use; {cxx!r} was not found (set CXX)"
    return None


@functools.cache
def _kernel() -> Any:
    """The built kernel library (ctypes), or a str saying why there is none."""
    if why := prerequisites():
        return why
    exe = shutil.which(os.environ.get("CXX") or "c++")
    root = Path(torch.__file__).parent
    link = ("-L", str(root / "lib"), "-ltorch_cpu", f"-Wl,-rpath,{root / 'lib'}")
    command = [exe, *FLAGS, "-I", str(root / "include"), "-x", "c", str(SOURCES[0]), "-x", "c++", str(SOURCES[1]), *link]
    key = hashlib.sha256(b"\0".join([*(s.read_bytes() for s in SOURCES), " ".join(command).encode(),
                                     torch.__version__.encode()])).hexdigest()[:16]
    path = cache_dir() / f"w4a8-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # another process may build it too
        run = subprocess.run([*command, "-o", str(tmp)], capture_output=True, text=True)
        if run.returncode:
            tmp.unlink(missing_ok=True)
            return f"quant w4a8: building its kernel with {exe} failed: {run.stderr.strip()[-800:]}"
        os.replace(tmp, path)
    return ctypes.CDLL(str(path))


def unavailable() -> str | None:
    """None if the kernel is built (building it if need be), else why it cannot be."""
    kernel = _kernel()
    return kernel if isinstance(kernel, str) else None


def _linear_fake(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], 8 * w.shape[0])


@functools.cache
def register_op() -> torch.library.Library:
    """Define `llmkit_cpu::linear_w4a8(x [M, K] float32, w [N/8, 4K] uint8, s [N/8, K/32, 2, 8]
    float32) -> y [M, N] float32`, x rounded to int8 per block of 32 (`tiles` gives w and s from
    quant.pack's values), and register its kernel (at the first pack, as quant.py does for fp16: a fake impl
    imports torch's tracing machinery, which plugin discovery should not pay)."""
    library = _kernel()
    if isinstance(library, str):
        raise RuntimeError(library)
    if library.llmkit_w4a8_register():
        raise RuntimeError("w4a8: registering the kernel of llmkit_cpu::linear_w4a8 with the dispatcher failed")
    lib = torch.library.Library("llmkit_cpu", "FRAGMENT")
    lib.define("linear_w4a8(Tensor x, Tensor w, Tensor s) -> Tensor")
    torch.library.register_fake("llmkit_cpu::linear_w4a8", _linear_fake, lib=lib)
    return lib


def tiles(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 values q [N, K/32, 32] uint8 with group scales d and minima m [N, K/32] (w ~ d q + m,
    quant.pack; N a multiple of 8) -> the kernel's operands (layout in w4a8.c): w [N/8, 4K], byte
    [t, g, h, r, i] holding q[8t + r, g, 8h + i] (low nibble) and q[8t + r, g, 8h + 4 + i] (high);
    s [N/8, K/32, 2, 8], the tile's 8 rows' d then m per group."""
    n, groups, _ = q.shape
    q6 = q.view(n // 8, 8, groups, 4, 2, 4)  # [t, r, g, h, low/high, i]
    w = (q6[..., 0, :] | (q6[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).reshape(n // 8, -1).contiguous()
    per_tile = [v.float().view(n // 8, 8, groups).transpose(1, 2) for v in (d, m)]
    return w, torch.stack(per_tile, dim=2).contiguous()

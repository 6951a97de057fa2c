"""`quant="w4a8"`: int4 weights times int8 activations, with a kernel of this plugin's own.

PyTorch's weight-only int4 kernel (`_weight_int4pack_mm_for_cpu`) converts every weight to float
before it multiplies; on AVX2 that makes it compute-bound: SmolLM2's 121 decode linears took
15.6 ms with it (bf16 activations), 18.8 ms with fbgemm's fp16 ones and 5-6 ms with this
kernel's C calls (one token, 2 threads, medians of 7-15 runs). llama.cpp's Q4_1 x Q8_1 dot
product is the model: activations are rounded to int8 per block of 32 values at every call, so
that products of weights and activations are integer dot products (see w4a8.c for the formula).
That is a second rounding next to the weights', the cost of the speed; its accuracy on SmolLM2
is measured in tests/test_cpu_backend.py and README.

The kernel is C (AVX2 + FMA intrinsics, OpenMP over output rows), compiled with the C compiler
(`$CC`, default `cc`) at the first w4a8 pack and cached under
`${XDG_CACHE_HOME:-~/.cache}/llmkit/cpu-kernels/`, named by a hash of its source, flags and
compiler. It is reached through ctypes, and inside a compiled decode step through the dispatcher
op `llmkit_cpu::linear_w4a8` (a fake impl gives inductor the output shape).
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

SOURCE = Path(__file__).with_name("w4a8.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmkit" / "cpu-kernels"


@functools.cache
def _kernel() -> Any:
    """The built kernel's C function, or a str saying why there is none."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"quant w4a8 needs an x86 CPU with AVX2 and FMA (PyTorch reports {capability})"
    cc = os.environ.get("CC") or "cc"
    exe = shutil.which(cc)
    if exe is None:
        return f"quant w4a8 builds its kernel with a C compiler at first use; {cc!r} was not found (set CC)"
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), exe.encode()])).hexdigest()[:16]
    path = cache_dir() / f"w4a8-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # another process may build it too
        run = subprocess.run([exe, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if run.returncode:
            tmp.unlink(missing_ok=True)
            return f"quant w4a8: building its kernel with {exe} failed: {run.stderr.strip()[-800:]}"
        os.replace(tmp, path)
    fn = ctypes.CDLL(str(path)).llmkit_w4a8_linear
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def unavailable() -> str | None:
    """None if the kernel is built (building it if need be), else why it cannot be."""
    kernel = _kernel()
    return kernel if isinstance(kernel, str) else None


def linear(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 (contiguous) @ dequant(W)^T with x rounded to int8 per block of 32;
    w [N, K/2] uint8 nibbles, d and m [N, K/32] float32 (see `nibbles` and quant.pack)."""
    y = x.new_empty(x.shape[0], w.shape[0])
    if _kernel()(x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), d.data_ptr(), m.data_ptr(),
                 w.shape[0], y.data_ptr()):
        raise MemoryError("w4a8: no memory for the activations' int8 copy")
    return y


def _linear_fake(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@functools.cache
def register_op() -> torch.library.Library:
    """Define `llmkit_cpu::linear_w4a8` (at the first pack, as quant.py does for fp16: a fake impl
    imports torch's tracing machinery, which plugin discovery should not pay)."""
    lib = torch.library.Library("llmkit_cpu", "FRAGMENT")
    lib.define("linear_w4a8(Tensor x, Tensor w, Tensor d, Tensor m) -> Tensor")
    lib.impl("linear_w4a8", linear, "CPU")
    torch.library.register_fake("llmkit_cpu::linear_w4a8", _linear_fake, lib=lib)
    return lib


def nibbles(q: torch.Tensor) -> torch.Tensor:
    """int4 values q [N, K/32, 32] uint8 (w ~ d q + m per group, quant.pack) -> the kernel's layout
    [N, K/2]: byte j of a group holds q_j (low nibble) and q_{j+16} (high)."""
    half = q.shape[-1] // 2
    return (q[..., :half] | (q[..., half:] << 4)).reshape(q.shape[0], -1).contiguous()

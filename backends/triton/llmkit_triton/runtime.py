"""What every kernel wrapper needs: interpreter detection, block sizes and the dot-precision rule.

`triton.jit` reads `TRITON_INTERPRET` when it decorates a kernel, i.e. when llmkit_triton is
imported; with `TRITON_INTERPRET=1` set before that, every kernel runs in Triton's NumPy
interpreter on CPU tensors, which is how this package is tested on machines without an
accelerator. On a CUDA or ROCm device the same kernels are compiled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Storage dtypes the kernels accept. Statistics and accumulators are always float32."""

_INTERPRETED = bool(triton.knobs.runtime.interpret)
"""Read when this package is imported, the moment its kernels are decorated: `triton.jit` makes
interpreted kernels exactly when `TRITON_INTERPRET` was set then, whatever the variable says later."""

if _INTERPRETED and not isinstance(tl.sum, InterpretedFunction):
    # triton.language's own jit functions (tl.sum, tl.max, tl.cumsum...) were decorated for
    # compilation; an interpreted kernel calling them fails with "Cannot call @triton.jit'd outside
    # of the scope of a kernel"
    raise ImportError(
        "TRITON_INTERPRET=1 was set after triton was first imported: set it before any import of triton "
        "(for pytest: at the top of tests/conftest.py)"
    )


def interpreting() -> bool:
    """True when this package's kernels run in Triton's interpreter (`TRITON_INTERPRET=1` was set
    before llmkit_triton was imported)."""
    return _INTERPRETED


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether a kernel's `tl.dot` operands are converted to float32 (with IEEE input precision).

    float32 operands always are: Triton's default input precision for them is TF32 on NVIDIA
    GPUs (10-bit mantissa), which would fail the float32 precision rule. bfloat16 operands are in
    the interpreter, whose `tl.dot` on bf16 is wrong (NumPy has no bfloat16; the values are its
    raw uint16 bits). Otherwise float16/bfloat16 tiles go to the tensor cores as they are, with
    float32 accumulation: each product is exact in float32, as in FlashAttention-2.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def block_size(n: int, minimum: int = 16) -> int:
    """The power-of-two tile covering n elements, at least `minimum` (tl.dot needs >= 16)."""
    return max(minimum, triton.next_power_of_2(n))


def row_warps(block: int) -> int:
    """Warps for a kernel holding one `block`-wide row per program: about 256 elements per warp,
    1 to 16 (Triton's layer-norm tutorial rule), so wide rows do not spill registers."""
    return min(max(block // 256, 1), 16)


def check_dtype(name: str, t: torch.Tensor) -> None:
    """Refuse what no kernel takes: other dtypes, and CPU tensors outside the interpreter."""
    if t.device.type == "cpu" and not _INTERPRETED:
        raise ValueError(
            f"{name} is a CPU tensor: the Triton kernels run on CPU only in Triton's interpreter "
            "(set TRITON_INTERPRET=1 before importing llmkit_triton)"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; the Triton kernels take "
            f"{', '.join(str(d).removeprefix('torch.') for d in FLOAT_DTYPES)}"
        )


def tile(gpu: int) -> int:
    """A tile size: `gpu` when compiled, 16 (the smallest tl.dot tile) in the interpreter, where
    every padded lane costs NumPy work."""
    return 16 if interpreting() else gpu

"""The shared Triton kernels (`llmkit_triton`, distribution `llmkit-triton-kernels`) as impls of a GPU backend.

The same kernels serve NVIDIA and AMD: `triton_impls(backend, device_reasons)` registers them for
the `cuda` or the `rocm` backend, each adding its own device range (compute capability, gfx
architecture) in front of the kernels' own `*_unsupported(config, target)` reasons. The library is
imported when the plugin registers its impls; if it (or triton) is missing or fails to import, the
impls are still registered, so `llmkit info` lists them and `llmkit explain` says why each one is
refused, and no config selects them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from llmkit.hookspecs import Impl, Target
from llmkit_blocks import attention, mlp, moe, norm, positional

DeviceReasons = Callable[[Target], Iterable[str]]

FALLBACK_DTYPES = frozenset({"float32", "float16", "bfloat16"})
"""Declared while llmkit_triton is missing (the impls then refuse every config anyway)."""


@dataclass(frozen=True)
class Kernel:
    kind: str
    name: str
    stem: str
    reference: Callable[..., Any]
    priority: int
    summary: str


KERNELS = (
    Kernel("norm@1", "triton_norm", "norm", norm.norm, 30,
           "Triton RMSNorm/LayerNorm: one program per row, float32 statistics"),
    Kernel("rope@1", "triton_rope", "rope", positional.rope, 30,
           "Triton RoPE: half or interleaved pairs, partial rotary"),
    Kernel("mlp@1", "triton_glu", "mlp", mlp.mlp, 30,
           "Triton fused gate/up activation (SwiGLU/GeGLU) between the projections"),
    Kernel("attention@1", "triton_flash", "attention", attention.attention, 20,
           "Triton flash attention: online softmax, soft-cap, sliding window, GQA without K/V copies"),
    Kernel("moe@1", "triton_moe", "moe", moe.moe, 20,
           "Triton MoE: fused router top-k, token alignment/permutation by expert, grouped expert GEMM"),
)


def _load() -> tuple[Any, str | None]:
    try:
        from llmkit_triton import blocks
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        hint = "pip install llmkit-triton-kernels" if "llmkit_triton" in str(missing) else "pip install triton"
        return None, f"the Triton kernels cannot be imported: {missing} is not installed ({hint})"
    except Exception as exc:  # a broken kernel library refuses its impls; the rest of the plugin works
        return None, f"importing llmkit_triton.blocks raised {type(exc).__name__}: {exc}"
    return blocks, None


def _declared(table: Any, kernel: Kernel, default: frozenset[str]) -> frozenset[str]:
    """The library's DTYPES / FEATURES / MODES for a kind: one set for all kinds, or a mapping keyed
    by "norm@1" (or "norm")."""
    if isinstance(table, dict):
        table = table.get(kernel.kind, table.get(kernel.stem))
    if not isinstance(table, (set, frozenset, list, tuple)):
        return default
    return frozenset(str(v).removeprefix("torch.") for v in table)


def _unavailable(kernel: Kernel, error: str) -> Callable[..., Any]:
    """A forward with the kind's exact signature that says why the kernel is missing (never selected:
    the impl's reasons refuse every config)."""
    def forward(block: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(error)
    forward.__signature__ = inspect.signature(kernel.reference)  # type: ignore[attr-defined]
    return forward


def _same_signature(forward: Callable[..., Any], reference: Callable[..., Any]) -> bool:
    def shape(fn: Callable[..., Any]) -> list[tuple[str, Any, bool]]:
        params = list(inspect.signature(fn).parameters.values())[1:]
        return [(p.name, p.kind, p.default is inspect.Parameter.empty) for p in params]
    return shape(forward) == shape(reference)


def triton_impls(backend: str, device_reasons: DeviceReasons) -> list[Impl]:
    """One impl per Triton kernel family, for `backend` (a torch "cuda"-type device)."""
    blocks, error = _load()
    out = []
    for kernel in KERNELS:
        kernel_reasons = getattr(blocks, f"{kernel.stem}_unsupported", None) if blocks is not None else None
        forward = getattr(blocks, f"{kernel.stem}_forward", None) if blocks is not None else None
        problem = error
        if blocks is not None and forward is None:
            problem = f"llmkit_triton.blocks has no {kernel.stem}_forward (kernel library version mismatch)"
        elif forward is not None and not _same_signature(forward, kernel.reference):
            problem = f"llmkit_triton.blocks.{kernel.stem}_forward does not have {kernel.kind}'s forward signature"
            forward = None

        def reasons(config: Any, target: Target, _problem: str | None = problem,
                    _kernel: Callable[..., Iterable[str]] | None = kernel_reasons) -> Iterator[str]:
            if _problem is not None:
                yield _problem
                return
            yield from device_reasons(target)
            if _kernel is not None:
                yield from _kernel(config, target)

        dtypes = _declared(getattr(blocks, "DTYPES", None), kernel, FALLBACK_DTYPES)
        features = _declared(getattr(blocks, "FEATURES", None), kernel, frozenset())
        modes = _declared(getattr(blocks, "MODES", None), kernel, frozenset({"infer"}))
        prepare = getattr(blocks, f"{kernel.stem}_prepare", None) if problem is None else None
        out.append(Impl(
            kind=kernel.kind, backend=backend, name=kernel.name,
            forward=forward if forward is not None else _unavailable(kernel, problem or ""),
            device_types={"cuda"}, dtypes=dtypes, modes=modes, features=features, priority=kernel.priority,
            not_supported_reasons=reasons, prepare=prepare, summary=kernel.summary,
        ))
    return out

"""llmkit's ONNX Runtime backend plugin: block references exported to ONNX, run by onnxruntime.

It uses only the public plugin contract (`llmkit.hookspecs`) and the public block catalogue
(`llmkit_blocks`), like any outside vendor's plugin. Each impl's graph is exported from the kind's
reference at build time (`prepare`) and cached on disk (graphs.py); the forward feeds host tensors
to an `onnxruntime.InferenceSession`. Kinds without an impl here (MLA, layer) run the reference,
and the dispatch plan says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from llmkit.hookspecs import ANY, Backend, Impl, Target, hookimpl

from . import blocks
from .backend import OnnxrtBackend

LLMKIT_PLUGIN_API = 1

_FLOATS = {"float32", "float16"}
"""The dtypes certification passes; bfloat16 and float64 are refused with reasons (`blocks.unsupported`)."""


def _reasons(*checks: Callable[[Any, Target], Iterator[str]]) -> Callable[[Any, Target], Iterator[str]]:
    def reasons(config: Any, target: Target) -> Iterator[str]:
        yield from blocks.unsupported(config, target)
        for check in checks:
            yield from check(config, target)

    return reasons


def _impl(kind: str, name: str, forward: Any, prepare: Any, summary: str,
          *checks: Callable[[Any, Target], Iterator[str]]) -> Impl:
    # features={ANY}: each graph is the kind's reference itself, so it supports every feature the
    # reference does; what the exporter cannot express is refused by a reason instead
    return Impl(kind=kind, backend="onnxrt", name=name, forward=forward, prepare=prepare,
                device_types={"cpu"}, dtypes=_FLOATS, modes={"infer"}, features={ANY}, priority=10,
                not_supported_reasons=_reasons(*checks), summary=summary)


@hookimpl
def llmkit_backends() -> list[Backend]:
    return [OnnxrtBackend()]


@hookimpl
def llmkit_impls() -> list[Impl]:
    return [
        _impl("attention@1", "session", blocks.attention_forward, blocks.attention_prepare,
              "two sessions around the Python KV cache: project (QKV, clip, QK-norm, RoPE), attend + output"),
        _impl("moe@1", "dense", blocks.moe_forward, blocks.moe_prepare,
              "routing in torch; every expert on every token in one session, weighted by the routing matrix",
              blocks.moe_unsupported),
        _impl("rope@1", "session", blocks.rope_forward, blocks.rope_prepare,
              "the reference rotation as a session (dynamic batch, heads, tokens)", blocks.rope_unsupported),
        _impl("norm@1", "session", blocks.norm_forward, blocks.norm_prepare,
              "RMSNorm / LayerNorm as a session over flattened rows"),
        _impl("mlp@1", "session", blocks.mlp_forward, blocks.mlp_prepare,
              "gated / ungated MLP as a session over flattened rows"),
        _impl("head@1", "session", blocks.head_forward, blocks.head_prepare,
              "LM head as a session (tied: the embedding matrix is an input)"),
        _impl("embedding@1", "session", blocks.embedding_forward, blocks.embedding_prepare,
              "token embedding as a session (int64 ids)"),
    ]

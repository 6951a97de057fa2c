"""Entry point `llmkit: blocks`: registers the built-in block kinds, exactly as a vendor plugin would."""

from __future__ import annotations

from dataclasses import replace

from llmkit.hookspecs import BlockKind, hookimpl

from . import attention, cases, embedding, layer, mlp, moe, norm, positional

LLMKIT_PLUGIN_API = 1


@hookimpl
def llmkit_block_kinds() -> list[BlockKind]:
    # certification cases ride on the registered kinds (cases.py imports the block modules)
    return [
        replace(attention.ATTENTION, cases=cases.ATTENTION),
        replace(attention.MLA, cases=cases.MLA),
        replace(embedding.EMBEDDING, cases=cases.EMBEDDING),
        replace(embedding.HEAD, cases=cases.HEAD),
        replace(layer.KIND, cases=cases.LAYER),
        replace(mlp.KIND, cases=cases.MLP),
        replace(moe.KIND, cases=cases.MOE),
        replace(norm.KIND, cases=cases.NORM),
        replace(positional.KIND, cases=cases.ROPE),
    ]

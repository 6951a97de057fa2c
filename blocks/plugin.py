"""Entry point `llmkit: blocks`: registers the built-in block kinds, exactly as a vendor plugin would."""

from __future__ import annotations

from llmkit.hookspecs import BlockKind, hookimpl

from . import attention, embedding, layer, mlp, moe, norm, positional

LLMKIT_PLUGIN_API = 1


@hookimpl
def llmkit_block_kinds() -> list[BlockKind]:
    return [
        attention.ATTENTION,
        attention.MLA,
        embedding.EMBEDDING,
        embedding.HEAD,
        layer.KIND,
        mlp.KIND,
        moe.KIND,
        norm.KIND,
        positional.KIND,
    ]

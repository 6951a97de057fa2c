"""Entry point `llmkit: blocks`: registers the built-in block kinds, exactly as a vendor plugin would."""

from __future__ import annotations

from llmkit.hookspecs import BlockKind, hookimpl

from . import embedding, mlp, norm

LLMKIT_PLUGIN_API = 1


@hookimpl
def llmkit_block_kinds() -> list[BlockKind]:
    return [embedding.EMBEDDING, embedding.HEAD, mlp.KIND, norm.KIND]

"""HPU graphs for decode steps. Written against the SynapseAI API, not yet certified on hardware.

A decode step launches the same few hundred small ops for every token; on Gaudi their host-side
graph compilation and launch dominate. `habana_frameworks.torch.hpu.wrap_in_hpu_graph` captures a
module's forward once per input signature and replays it (gaudi-pytorch-bridge
python_packages/habana_frameworks/torch/hpu/graphs.py; optimum-habana wraps its models the same
way for generation). The wrapper replays a graph when shapes, dtypes and non-tensor arguments
repeat, which is what a decode step over a static (preallocated) KV cache does.
"""

from __future__ import annotations

import torch


def wrap_decode(model: torch.nn.Module, *, disable_tensor_cache: bool = True) -> torch.nn.Module:
    """Wrap `model.forward` in HPU-graph capture and replay (on an HPU; raises ImportError elsewhere).

    Use it on a model whose decode step has fixed shapes (a static cache, one token per row).
    `disable_tensor_cache` frees the captured intermediate tensors after each replay, as
    optimum-habana does for generation.
    """
    from habana_frameworks.torch.hpu import wrap_in_hpu_graph

    return wrap_in_hpu_graph(model, disable_tensor_cache=disable_tensor_cache)

"""llmkit-triton-kernels: the Triton kernels shared by llmkit's `cuda` and `rocm` backends.

A library, not a plugin (no `llmkit` entry point): a backend plugin imports it and registers the
block-level forwards of `llmkit_triton.blocks` as its impls. The same kernels compile for NVIDIA
and AMD GPUs; with `TRITON_INTERPRET=1` set before triton is first imported they run on CPU
tensors in Triton's interpreter, which is how they are tested without a GPU.

Wiring an impl (everything a plugin needs, no kernel reading required)::

    from llmkit.hookspecs import Impl
    from llmkit_triton import blocks as tk

    Impl(kind="norm@1", backend="cuda", name="triton", forward=tk.norm_forward,
         device_types={"cuda"}, dtypes=tk.DTYPES, modes=tk.MODES["norm@1"],
         features=tk.FEATURES["norm@1"], not_supported_reasons=tk.norm_unsupported, priority=...)

`llmkit_triton.blocks` (signatures are the kinds' reference signatures):

| kind | forward | reasons | prepare | modes |
| --- | --- | --- | --- | --- |
| norm@1 | `norm_forward(block, x)` | `norm_unsupported` | - | infer, train |
| rope@1 | `rope_forward(block, x, positions)` | `rope_unsupported` | `rope_prepare` (optional) | infer, train |
| mlp@1 | `mlp_forward(block, x)` | `mlp_unsupported` | - | infer, train |
| attention@1 | `attention_forward(block, x, positions, cache=None)` | `attention_unsupported` | - | infer |
| moe@1 | `moe_forward(block, x)` | `moe_unsupported` | - | infer |

- `DTYPES`: float32, float16, bfloat16 (float64 not claimed: float32 accumulation).
- `FEATURES[kind]`: the feature flags covered (all of each kind's flags except moe@1's
  `group_limited`); `MODES[kind]` as in the table.
- The `*_unsupported(config, target)` functions yield: norm `dim` > 32768; attention `head_dim` > 256;
  moe group-limited routing; mlp/attention/moe a target fact `quant` (weight-only quantisation is not
  implemented); rope nothing. Device facts (compute capability, gfx arch) are the plugin's to check.

Kernel-level API (tensors on the GPU, or on CPU under the interpreter):
- `norm.rms_norm(x, weight, eps, *, residual=None, bias=None, layer=False, cast="before_weight",
  unit_offset=False)` -> y or (y, new_residual); autograd.
- `rope.rope_tables(config, positions, inv_freq=None)` -> float32 (cos, sin) [B, T, d/2];
  `rope.apply_rope(x, cos, sin, *, interleaved=False)`; autograd.
- `activation.gated_activation(gate, up_or_None, activation)`; autograd.
- `attention.flash_attention(q, k, v, q_pos, k_pos, *, scale, softcap=None, causal=True, window=None,
  block_m=16, block_n=16)` -> o [B, H, T, Dv]; forward only.
- `moe.router_topk(logits, top_k, *, scoring, correction_bias, renormalize, routed_scaling)`
  -> (scores, selected, weights); `moe.moe_align(selected, n_experts, block_m, capacity=None)`
  -> `Alignment`; `moe.grouped_gemm(a, w, align, *, a_div, bias, gate, gate_bias, activation,
  row_scale, out)`; forward only.

Precision: statistics, softmax, accumulators and activations are float32 and each result is rounded
once to the storage dtype. Dots follow `runtime.upcast_dots`: float32 operands use IEEE precision
(never TF32); float16/bfloat16 tiles go to tensor cores with float32 accumulation, except bf16 in the
interpreter (its bf16 `tl.dot` is wrong), which is upcast.
"""

from __future__ import annotations

from . import activation, attention, blocks, moe, norm, rope, runtime

__all__ = ["activation", "attention", "blocks", "moe", "norm", "rope", "runtime"]
__version__ = "0.1.0"

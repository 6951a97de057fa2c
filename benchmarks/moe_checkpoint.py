"""A Mixtral-architecture checkpoint with random weights, for MoE models end to end.

No MoE model's real weights can be downloaded here, so this writes one with transformers'
`MixtralForCausalLM` (normal(0, 0.02) weights, seed 0, safetensors): the MoE layer of
`moe_layer.py` (d_model 1024, expert hidden 3584, 8 experts, top-2) in 4 layers, 16 query and 4
KV heads, a 32000-token vocabulary with an untied head; 428M parameters, 1.7 GB in float32.
Then `llmkit bench DIR --baseline transformers` compares the two engines on its weights (random
prompt ids: the checkpoint has no tokenizer).

    .venv/bin/python benchmarks/moe_checkpoint.py DIR
    .venv/bin/llmkit bench DIR --baseline transformers --dtype float32 --prompt-len 128 --gen-len 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()

    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=1024, intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2,
                           num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False)
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(args.out, safe_serialization=True)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters written to {args.out}")


if __name__ == "__main__":
    main()

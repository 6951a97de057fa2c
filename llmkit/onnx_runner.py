"""Run a model exported by `llmkit export onnx` with onnxruntime alone (no torch, no llmkit).

    python run.py --prompt "What is the capital of France?" --max-new-tokens 32
    python run.py --ids 1,2,3 --max-new-tokens 8       # without the tokenizers package

Needs numpy and onnxruntime (and `tokenizers` for --prompt). Greedy decoding through the one graph:
the prompt runs over an empty cache, then each step takes the cache and returns it one token longer.
This file is copied next to the graph as run.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

FORMAT = "llmkit-onnx/2"


class Exported:
    def __init__(self, directory: Path, providers: list[str] | None = None) -> None:
        self.dir = directory
        self.manifest = json.loads((directory / "manifest.json").read_text())
        if self.manifest.get("format") != FORMAT:
            raise SystemExit(f"{directory / 'manifest.json'}: format {self.manifest.get('format')!r}, this run.py "
                             f"reads {FORMAT!r} (re-export with this llmkit or use the run.py written with it)")
        providers = providers or ort.get_available_providers()
        self.session = ort.InferenceSession(str(directory / self.manifest["graph"]["file"]), providers=providers)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """Each layer's cached tensors holding no token yet: [batch, 0, *per-token shape]."""
        return [np.zeros((batch, 0, *t["shape"]), dtype=np.dtype(t["dtype"]))
                for layer in self.manifest["cache"] for t in layer["tensors"].values()]

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt; stops early at an end-of-sequence token."""
        names = self.manifest["graph"]["inputs"][3:]
        ids = np.asarray([prompt], dtype=np.int64)
        positions = np.arange(len(prompt), dtype=np.int64)[None]
        past_positions, cache = np.zeros((1, 0), dtype=np.int64), self.empty_cache(1)
        out: list[int] = []
        for step in range(max_new_tokens):
            feed = {"input_ids": ids, "positions": positions, "past_positions": past_positions}
            feed.update(zip(names, cache))
            logits, *cache = self.session.run(None, feed)
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token in self.manifest["eos_ids"] or step == max_new_tokens - 1:
                break
            past_positions = np.concatenate([past_positions, positions], axis=1)
            ids, positions = np.asarray([[token]], dtype=np.int64), positions[:, -1:] + 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="text (needs the tokenizers package and tokenizer.json)")
    group.add_argument("--ids", help="comma-separated prompt token ids")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    model = Exported(here)
    tokenizer = None
    if args.prompt is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(here / model.manifest["tokenizer"]))
        prompt = tokenizer.encode(args.prompt, add_special_tokens=False).ids
        if model.manifest["add_bos"] and (not prompt or prompt[0] != model.manifest["bos_id"]):
            prompt = [model.manifest["bos_id"], *prompt]
    else:
        prompt = [int(i) for i in args.ids.split(",")]
    out = model.greedy(prompt, args.max_new_tokens)
    print(tokenizer.decode(out) if tokenizer is not None else ",".join(map(str, out)))


if __name__ == "__main__":
    main()

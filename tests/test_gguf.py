"""GGUF reader: dequantisation per type, the Q/K un-permutation and RoPE scaling end to end against
transformers, SmolLM2's real weights and tokenizer against transformers' own GGUF loader, and
corrupt, truncated or hostile files."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is reachable; never try

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402

from llmkit import gguf as G  # noqa: E402
from llmkit.loading import CheckpointError, load  # noqa: E402

# ----------------------------------------------------------------------------- helpers

QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
"""Types gguf.quants can write: quantised from random data."""
RANDOM_BLOCKS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S",
                 "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]
"""Types gguf.quants cannot write: random blocks with sane fp16 scales."""

# byte offsets of each block's fp16 scale(s) (ggml-common.h block layouts)
_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,),
               "IQ4_XS": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,),
               "IQ1_S": (0,)}


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.01) -> np.ndarray:
    """Random quantised bytes [rows, bytes per row] whose fp16 scales are `scale` (finite, modest)."""
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    bits = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    if qtype == "IQ1_M":  # the fp16 scale is split over the top nibbles of the four uint16 scales
        h = int(np.float16(scale).view(np.uint16))
        scales = data[:, 48:56].copy().view(np.uint16)
        for i in range(4):
            scales[:, i] = (scales[:, i] & 0x0FFF) | (((h >> (4 * i)) & 0xF) << 12)
        data[:, 48:56] = scales.view(np.uint8)
    else:
        for at in _F16_FIELDS[qtype]:
            data[:, at:at + 2] = bits
    return data.reshape(rows, -1)


def encode(values: np.ndarray, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(stored array for GGUFWriter, its exact float32 dequantisation) of float32 `values` [rows, cols]."""
    if qtype == "F32":
        return values.astype(np.float32), values.astype(np.float32)
    if qtype == "F16":
        stored = values.astype(np.float16)
        return stored, stored.astype(np.float32)
    if qtype in QUANTIZABLE:
        stored = gguf_quantize(values.astype(np.float32), Q[qtype])
    else:  # random blocks scaled to the magnitude of `values`
        probe = gguf_dequantize(random_blocks(qtype, *values.shape, rng, 1.0), Q[qtype])
        rng2 = np.random.default_rng(int(rng.integers(1 << 30)))
        stored = random_blocks(qtype, *values.shape, rng2, float(values.std() / probe.std()))
    return stored, gguf_dequantize(stored, Q[qtype]).astype(np.float32)


def add_tensor(w: Any, name: str, stored: np.ndarray, qtype: str) -> None:
    if qtype in ("F32", "F16"):
        w.add_tensor(name, stored)
    else:
        w.add_tensor(name, stored, raw_dtype=Q[qtype])


def write_gguf(path: Path, arch: str, metadata: Callable[[Any], None], tensors: dict[str, tuple[np.ndarray, str]]) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    metadata(w)
    for name, (stored, qtype) in tensors.items():
        add_tensor(w, name, stored, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rows of each head: rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# a tiny byte-level BPE vocabulary: the 256 byte symbols, two merges, a user-defined and three control tokens
_BYTE_SYMBOLS = list(G._bytes_to_unicode().values())
TINY_TOKENS = _BYTE_SYMBOLS + ["he", "Ġt", "<think>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_TYPES = [1] * (len(TINY_TOKENS) - 4) + [4, 3, 3, 3]  # 4: user-defined, 3: control
TINY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer_metadata(w: Any, model: str = "gpt2") -> None:
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TINY_TOKENS)
    w.add_token_types(TINY_TYPES)
    w.add_token_merges(["h e", "Ġ t"])
    w.add_bos_token_id(len(TINY_TOKENS) - 2)
    w.add_eos_token_id(len(TINY_TOKENS) - 1)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_TEMPLATE)


def tiny_llama(tmp: Path, *, qtypes: Callable[[str], str] = lambda name: "F32", seed: int = 0, n_experts: int = 0,
               tied: bool = False, rope: dict[str, Any] | None = None, d: int = 256, hidden: int = 512,
               head_dim: int | None = None, name: str = "tiny.gguf",
               extra: Callable[[Any], None] = lambda w: None) -> tuple[Path, torch.nn.Module]:
    """A random llama (or Mixtral-style MoE) written as llama.cpp would, and the transformers model
    holding exactly the weights the file stores (dequantised)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    n_layers, n_heads, n_kv, vocab, theta = 2, 4, 2, len(TINY_TOKENS), 10000.0
    rope = rope or {"rope_type": "default", "rope_theta": theta}
    common = dict(vocab_size=vocab, hidden_size=d, intermediate_size=hidden, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv, rms_norm_eps=1e-5, max_position_embeddings=256,
                  tie_word_embeddings=tied, rope_parameters=rope, attn_implementation="eager",
                  head_dim=head_dim or d // n_heads)
    if n_experts:
        hf = MixtralForCausalLM(MixtralConfig(num_local_experts=n_experts, num_experts_per_tok=2, **common))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common))
    rng = np.random.default_rng(seed)
    state: dict[str, torch.Tensor] = {}
    tensors: dict[str, tuple[np.ndarray, str]] = {}

    def put(hf_name: str, gguf_name: str, shape: tuple[int, ...], norm: bool = False, heads: int | None = None) -> None:
        values = (1 + 0.2 * rng.standard_normal(shape) if norm else 0.1 * rng.standard_normal(shape)).astype(np.float32)
        qtype = "F32" if norm else qtypes(gguf_name)
        stored, exact = encode(values.reshape(-1, shape[-1]), qtype, rng)
        stored, exact = stored.reshape(*shape[:-1], -1), exact.reshape(shape)
        state[hf_name] = torch.from_numpy(exact.copy())
        if heads:  # rows are quantised independently, so permuting the stored rows is exact
            stored = llama_cpp_permute(stored, heads)
        tensors[gguf_name] = (stored, qtype)

    put("model.embed_tokens.weight", "token_embd.weight", (vocab, d))
    hd = head_dim or d // n_heads
    for i in range(n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(p + "input_layernorm.weight", b + "attn_norm.weight", (d,), norm=True)
        put(p + "self_attn.q_proj.weight", b + "attn_q.weight", (n_heads * hd, d), heads=n_heads)
        put(p + "self_attn.k_proj.weight", b + "attn_k.weight", (n_kv * hd, d), heads=n_kv)
        put(p + "self_attn.v_proj.weight", b + "attn_v.weight", (n_kv * hd, d))
        put(p + "self_attn.o_proj.weight", b + "attn_output.weight", (d, n_heads * hd))
        put(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", (d,), norm=True)
        if n_experts:
            put(p + "mlp.gate.weight", b + "ffn_gate_inp.weight", (n_experts, d))
            put(p + "gate", b + "ffn_gate_exps.weight", (n_experts, hidden, d))
            put(p + "up", b + "ffn_up_exps.weight", (n_experts, hidden, d))
            put(p + "mlp.experts.down_proj", b + "ffn_down_exps.weight", (n_experts, d, hidden))
            state[p + "mlp.experts.gate_up_proj"] = torch.cat([state.pop(p + "gate"), state.pop(p + "up")], dim=1)
        else:
            put(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", (hidden, d))
            put(p + "mlp.up_proj.weight", b + "ffn_up.weight", (hidden, d))
            put(p + "mlp.down_proj.weight", b + "ffn_down.weight", (d, hidden))
    put("model.norm.weight", "output_norm.weight", (d,), norm=True)
    if not tied:
        put("lm_head.weight", "output.weight", (vocab, d))
    if rope.get("rope_type") == "llama3":  # convert_hf_to_gguf.py writes Llama-3 scaling as a tensor
        freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
        old, lo, hi, f = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                          rope["high_freq_factor"], rope["factor"])
        factors = []
        for fr in freqs:
            wavelen = 2 * np.pi / fr
            if wavelen < old / hi:
                factors.append(1.0)
            elif wavelen > old / lo:
                factors.append(f)
            else:
                s = (old / wavelen - lo) / (hi - lo)
                factors.append(1 / ((1 - s) / f + s))
        tensors["rope_freqs.weight"] = (np.array(factors, dtype=np.float32), "F32")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if tied:
        hf.tie_weights()

    def metadata(w: Any) -> None:
        w.add_name("tiny llama")
        w.add_context_length(256)
        w.add_embedding_length(d)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(hidden)
        w.add_head_count(n_heads)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_rope_dimension_count(hd)
        if hd != d // n_heads:
            w.add_key_length(hd)
            w.add_value_length(hd)
        if n_experts:
            w.add_expert_count(n_experts)
            w.add_expert_used_count(2)
        tiny_tokenizer_metadata(w)
        extra(w)

    return write_gguf(tmp / name, "llama", metadata, tensors), hf.eval()


def hf_from_gguf(path: Path) -> torch.nn.Module:
    """transformers' own GGUF loader. It asks for accelerate but uses none of it on CPU; it parses the
    file twice and rebuilds gguf's tensor-name table once per module (12 s for SmolLM2 on 2 cores), so
    both pure functions are memoised here for the duration of the load."""
    import functools
    from unittest import mock

    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM

    with mock.patch.object(modeling_utils, "is_accelerate_available", return_value=True), \
         mock.patch.object(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader)), \
         mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map)):
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def ids_for(vocab: int, seed: int = 1, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def logits_diff(path: Path, hf: torch.nn.Module, ids: torch.Tensor) -> float:
    model = load(path, dtype="float32", policy="reference")
    with torch.no_grad():
        return (model(ids) - hf(ids).logits).abs().max().item()


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a hostile header can make a naive reader loop forever)."""
    def fire(*_: Any) -> None:
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- dequantisation


@pytest.mark.parametrize("qtype", QUANTIZABLE + RANDOM_BLOCKS)
def test_dequantise_each_type(tmp_path: Path, qtype: str) -> None:
    rng = np.random.default_rng(zlib.crc32(qtype.encode()))
    shapes = {"a": (4, 512), "b": (3, 2, 256)}  # a 3-D tensor (MoE experts) too
    original = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    stored = {}
    for k, v in original.items():
        s, _ = encode(v.reshape(-1, v.shape[-1]), qtype, rng)
        stored[k] = s.reshape(*v.shape[:-1], -1)
    path = write_gguf(tmp_path / "t.gguf", "llama", lambda w: None, {k: (s, qtype) for k, s in stored.items()})
    _, reader = G.open_gguf(path)
    for t in reader.tensors:
        ours = G.dequantize(t)
        assert ours.dtype == np.float32 and ours.shape == shapes[t.name]  # numpy order: GGUF's ne reversed
        assert not np.may_share_memory(ours, reader.data)  # owns its memory: never a view of the mapping
        raw = stored[t.name]
        expect = raw.astype(np.float32) if qtype in ("F32", "F16") else gguf_dequantize(raw, Q[qtype])
        np.testing.assert_array_equal(ours, expect.reshape(shapes[t.name]))
        if qtype in QUANTIZABLE:  # sanity: close to the original, within the type's quantisation error
            bound = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.02, "Q5_0": 0.2, "Q5_1": 0.2}.get(qtype, 0.4)
            assert np.abs(ours - original[t.name]).max() <= bound * np.abs(original[t.name]).max()
        else:  # an independent oracle: transformers' torch dequantiser
            from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

            ref = hf_dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(Q[qtype])).numpy()
            np.testing.assert_allclose(ours.reshape(-1), ref, rtol=1e-6, atol=1e-9)
            assert np.isfinite(ours).all() and ours.std() > 0


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stored = gguf_quantize(rng.standard_normal((2, 256)).astype(np.float32), Q.TQ2_0)
    path = write_gguf(tmp_path / "t.gguf", "llama", lambda w: None, {"x": (stored, "TQ2_0")})
    _, reader = G.open_gguf(path)
    with pytest.raises(CheckpointError, match=r"tensor 'x' has type TQ2_0.*supported: F32, F16"):
        G.dequantize(reader.tensors[0])
    # in a model the problem is found before anything is dequantised, with the others at once
    path, _ = tiny_llama(tmp_path, qtypes=lambda n: "F32", name="m.gguf")
    bad = tmp_path / "bad.gguf"
    data = bytearray(path.read_bytes())
    header = G.read_header(path)
    t = next(t for t in header.tensors if t.name == "blk.1.attn_v.weight")
    at = data.index(b"blk.1.attn_v.weight") + len(b"blk.1.attn_v.weight") + 4 + 8 * 2
    assert struct.unpack_from("<I", data, at)[0] == 0  # F32
    struct.pack_into("<I", data, at, int(Q.I32))  # same size, not a float type
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"'blk.1.attn_v.weight' has type I32, which llmkit cannot dequantise"):
        G.read_gguf(bad)
    assert t.nbytes == 128 * 256 * 4


# ----------------------------------------------------------------------------- tiny models end to end


def test_tiny_llama_matches_transformers(tmp_path: Path) -> None:
    path, hf = tiny_llama(tmp_path)
    ckpt = G.read_gguf(path)
    assert ckpt.source == str(path) and ckpt.count == 2 + 2 * 9 + 1
    assert ckpt.spec["name"] == "tiny llama" and ckpt.spec["head"] == {"tied": False}
    assert ckpt.spec["layer"]["attention"] == {"n_heads": 4, "n_kv_heads": 2, "rope": {"theta": 10000.0}}
    stream = ckpt.tensors()
    assert isinstance(stream, Iterator)  # lazy: one tensor at a time
    key, first = next(stream)
    assert key == "embedding.weight" and first.dtype == torch.float32
    ids = ids_for(len(TINY_TOKENS))
    diff = logits_diff(path, hf, ids)
    assert diff <= 1e-4, diff
    # a test of the test: without undoing llama.cpp's Q/K permutation the logits are far off
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(G, "_unpermute", lambda w, n: w)
        assert logits_diff(path, hf, ids) > 1e-2
    # and the file is what transformers' own GGUF loader reads as this model
    theirs = hf_from_gguf(path)
    with torch.no_grad():
        assert (theirs(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5


def test_tiny_llama_quantised_and_tied(tmp_path: Path) -> None:
    """Every tensor of another type; the reference holds the exact dequantised values."""
    kinds = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K", "Q2_K", "Q3_K", "Q5_K", "IQ4_XS"]
    order: dict[str, str] = {}

    def qtypes(name: str) -> str:
        return order.setdefault(name, kinds[len(order) % len(kinds)])

    path, hf = tiny_llama(tmp_path, qtypes=qtypes, tied=True, seed=3)
    assert set(order.values()) == set(kinds)
    ckpt = G.read_gguf(path)
    assert ckpt.spec["head"] == {"tied": True} and "head.weight" not in dict(ckpt.tensors())
    diff = logits_diff(path, hf, ids_for(len(TINY_TOKENS), seed=2))
    assert diff <= 1e-4, diff


def test_tiny_llama_head_dim_from_key_length(tmp_path: Path) -> None:
    path, hf = tiny_llama(tmp_path, d=128, hidden=256, head_dim=48)
    assert G.read_gguf(path).spec["layer"]["attention"]["head_dim"] == 48
    assert logits_diff(path, hf, ids_for(len(TINY_TOKENS), seed=4)) <= 1e-4


@pytest.mark.parametrize(("keys", "expect"), [
    ({"type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
    ({"type": "yarn", "factor": 4.0, "original_context_length": 64, "yarn_beta_fast": 16.0},
     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0}),
    ({"type": "none", "factor": 4.0}, None),
    ({"type": "longrope", "factor": 4.0}, "'longrope' is not supported"),
])
def test_rope_scaling_metadata(tmp_path: Path, keys: dict[str, Any], expect: Any) -> None:
    from llmkit.registry import default_registry
    from llmkit.spec import load_spec

    def extra(w: Any) -> None:
        for k, v in keys.items():
            key = f"llama.rope.scaling.{k}"
            w.add_string(key, v) if isinstance(v, str) else w.add_float32(key, v) if isinstance(v, float) \
                else w.add_uint32(key, v)

    path, _ = tiny_llama(tmp_path, d=32, hidden=32, extra=extra)
    if isinstance(expect, str):
        with pytest.raises(CheckpointError, match=expect):
            G.read_gguf(path)
        return
    spec = G.read_gguf(path).spec
    assert spec["layer"]["attention"]["rope"].get("scaling") == expect
    load_spec(spec, default_registry())  # a valid spec


def test_tiny_llama3_rope_from_rope_freqs(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    path, hf = tiny_llama(tmp_path, rope=rope, hidden=256)
    ckpt = G.read_gguf(path)
    scaling = ckpt.spec["layer"]["attention"]["rope"]["scaling"]
    assert scaling["type"] == "llama3" and scaling["original_max_position_embeddings"] == 256
    assert scaling["factor"] == pytest.approx(8.0) and scaling["high_freq_factor"] == pytest.approx(4.0, rel=1e-4)
    assert any("rope_freqs.weight" in note for note in ckpt.ignored)
    ids = ids_for(len(TINY_TOKENS), seed=5, length=64)
    assert logits_diff(path, hf, ids) <= 1e-4
    # a test of the test: the scaling moves these logits far beyond the tolerance
    plain = {k: v for k, v in hf.state_dict().items()}
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**hf.config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    unscaled = LlamaForCausalLM(cfg).eval()
    unscaled.load_state_dict(plain)
    with torch.no_grad():
        assert (unscaled(ids).logits - hf(ids).logits).abs().max() > 1e-2


def test_tiny_mixtral_style_moe(tmp_path: Path) -> None:
    path, hf = tiny_llama(tmp_path, n_experts=4, d=128, hidden=256, qtypes=lambda n: "Q8_0" if "exps" in n else "F32")
    mlp = G.read_gguf(path).spec["layer"]["mlp"]
    assert mlp == {"type": "moe", "n_experts": 4, "top_k": 2, "hidden": 256, "activation": "silu", "renormalize": "sum"}
    assert logits_diff(path, hf, ids_for(len(TINY_TOKENS), seed=7)) <= 1e-4


def test_tiny_tokenizer_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path, _ = tiny_llama(tmp_path, d=64, hidden=64)
    ours = G.read_gguf(path).tokenizer
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["hello the tether", "<|im_start|>user\nhe said <think>hi</think><|im_end|>\n", "naïve ☃ 42"]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.encode("<think>") == [len(TINY_TOKENS) - 4]
    assert ours.encode("<|im_start|>") == [len(TINY_TOKENS) - 2]
    assert ours.eos_tokens == ["<|im_end|>"] and ours.bos_token == "<|im_start|>" and not ours.add_bos


# ----------------------------------------------------------------------------- SmolLM2, real weights

SMOL_PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a robot."}]
SMOL_STRINGS = [
    "Hello world", " leading space and  two spaces", "numbers: 12345, 3.14159 and 2024-11-28", "don't I'll we've",
    "unicode: naïve café, 日本語のテキスト, emoji 🤖🚀, Ελληνικά", "tabs\tand\nnewlines\n\n  indented",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n", "<repo_name>x<file_sep>y",
]


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any, Any, Path]:
    from transformers import AutoTokenizer

    from llmkit.loading import preset_weights

    try:
        path = preset_weights("smollm2-135m")
    except CheckpointError as exc:
        pytest.skip(str(exc))
    ours = load("smollm2-135m", dtype="float32", policy="reference")
    hf = hf_from_gguf(path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, hf, tok, path


def test_smollm2_spec_and_tokenizer(smollm2: Any) -> None:
    ours, _, tok, path = smollm2
    assert ours.source == str(path) and ours.spec.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert (ours.spec.d_model, ours.spec.n_layers, ours.spec.vocab_size, ours.spec.tied) == (576, 30, 49152, True)
    t = ours.tokenizer
    for text in SMOL_STRINGS:
        assert t.encode(text) == tok(text, add_special_tokens=False)["input_ids"], text
        assert t.decode(t.encode(text), skip_special_tokens=False) == text
    assert t.encode("<|im_start|>") == [1] and t.eos_ids == {2} and not t.add_bos
    for generation_prompt in (True, False):
        ours_text = t.apply_chat_template(SMOL_PROMPT, add_generation_prompt=generation_prompt)
        theirs = tok.apply_chat_template(SMOL_PROMPT, add_generation_prompt=generation_prompt, tokenize=False)
        assert ours_text == theirs


def test_smollm2_logits_and_greedy_match_transformers(smollm2: Any) -> None:
    ours, hf, tok, _ = smollm2
    text = ours.tokenizer.apply_chat_template(SMOL_PROMPT)
    ids = torch.tensor([ours.tokenizer.encode(text)])
    assert ids[0].tolist() == tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-3, diff
    steps = 64
    got = ours.generate(ids, max_new_tokens=steps, eos=False)[0, ids.shape[1]:]
    with torch.no_grad():  # transformers' greedy continuation, with its KV cache, never stopping early
        out = hf(ids, use_cache=True)
        want, gaps = [], []
        for _ in range(steps):
            top = out.logits[0, -1].topk(2)
            want.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            out = hf(top.indices[:1].view(1, 1), cache=out.cache, use_cache=True)
    mismatch = next((i for i, (a, b) in enumerate(zip(got.tolist(), want)) if a != b), None)
    # identical, unless transformers' own choice there was a near-tie (then nothing after compares)
    assert mismatch is None or gaps[mismatch] < 1e-3, (mismatch, got.tolist(), want)
    assert mismatch is None, f"diverged at step {mismatch} on a near-tie (gap {gaps[mismatch]:.2g})"
    print(f"\nSmolLM2 logits max |diff| {diff:.3g}; greedy: {steps}/{steps} identical: "
          f"{ours.tokenizer.decode(got.tolist())!r}")


def test_smollm2_peak_memory_while_loading() -> None:
    """Loading keeps one float32 model plus one tensor in flight, not a second copy."""
    from llmkit.loading import preset_weights

    try:
        preset_weights("smollm2-135m")
    except CheckpointError as exc:
        pytest.skip(str(exc))
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc for the peak RSS")
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's) high-water mark
    code = (
        "import re, torch, gguf, tokenizers, llmkit, llmkit.gguf, llmkit.loading\n"
        "def kib(field): return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the high-water mark to the current RSS\n"
        "before = kib('VmRSS')\n"
        "m = llmkit.loading.load('smollm2-135m', dtype='float32', policy='reference')\n"
        "peak = kib('VmHWM')\n"
        "size = sum(p.numel() * p.element_size() for p in m.parameters())\n"
        "print(before * 1024, peak * 1024, size)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    before, peak, size = map(int, out.stdout.split()[-3:])
    file_size = preset_weights("smollm2-135m").stat().st_size
    growth = peak - before
    print(f"\nSmolLM2 load: RSS grew {growth / 2**20:.0f} MiB; float32 model {size / 2**20:.0f} MiB, "
          f"file {file_size / 2**20:.0f} MiB")
    # the model, the mapped file, the largest tensor's temporaries and the tokenizer; never two models
    assert growth < 1.5 * size + file_size, (growth, size)


# ----------------------------------------------------------------------------- corrupt and hostile files


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = tiny_llama(tmp_path_factory.mktemp("small"), d=32, hidden=64, qtypes=lambda n: "Q8_0")
    return path


def _patched(tmp: Path, src: Path, edit: Callable[[bytearray], None], name: str = "bad.gguf") -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    out = tmp / name
    out.write_bytes(bytes(data))
    return out


def _after(data: bytearray, key: bytes) -> int:
    """Offset just past a metadata key's string (its type field follows)."""
    return data.index(key) + len(key)


def test_truncated_files(tmp_path: Path, small_gguf: Path) -> None:
    data = small_gguf.read_bytes()
    header = G.read_header(small_gguf)
    cuts = [0, 3, 10, 23, 200, data.index(b"tokenizer.ggml.merges"), header.data_start - 1,
            header.tensors[3].offset + 5, max(t.offset + t.nbytes for t in header.tensors) - 1]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with deadline(20), pytest.raises(CheckpointError) as err:
            G.read_gguf(bad)
        message = str(err.value)
        assert str(bad) in message and ("truncated" in message or "empty" in message or "not a GGUF" in message), message


def test_hostile_headers(tmp_path: Path, small_gguf: Path) -> None:
    def check(edit: Callable[[bytearray], None], pattern: str) -> None:
        bad = _patched(tmp_path, small_gguf, edit)
        with deadline(20), pytest.raises(CheckpointError, match=pattern):
            G.read_gguf(bad)

    def put(fmt: str, at: Callable[[bytearray], int], value: int) -> Callable[[bytearray], None]:
        return lambda data: struct.pack_into(fmt, data, at(data), value)

    check(lambda d: d.__setitem__(slice(0, 4), b"GGML"), "not a GGUF file")
    check(put("<I", lambda d: 4, 7), "GGUF version 7 is not supported")
    check(put("<Q", lambda d: 8, 2**40), "tensor entries|truncated")  # tensor count
    check(put("<Q", lambda d: 16, 2**60), "metadata entries")  # metadata count
    # an array count far beyond the file: gguf's reader would loop without end on a numeric array
    check(put("<Q", lambda d: _after(d, b"tokenizer.ggml.token_type") + 8, 2**62),
          "token_type.*4611686018427387904 elements")
    check(put("<Q", lambda d: _after(d, b"tokenizer.ggml.tokens") + 8, 2**40), "tokenizer.ggml.tokens")
    check(put("<Q", lambda d: _after(d, b"general.name") + 4, 2**50), "general.name")  # string length
    check(put("<I", lambda d: _after(d, b"llama.block_count"), 77), "unknown value type 77")
    tensor = b"blk.0.attn_q.weight"
    check(put("<I", lambda d: d.index(tensor) + len(tensor), 9), "rank 9")
    check(put("<Q", lambda d: d.index(tensor) + len(tensor) + 4, 2**50), "claims|multiple of the block size|bytes")
    check(put("<I", lambda d: d.index(tensor) + len(tensor) + 20, 200), "type id 200")
    check(put("<Q", lambda d: d.index(tensor) + len(tensor) + 24, 2**40), "occupies bytes")  # data offset
    check(put("<Q", lambda d: d.index(tensor) + len(tensor) + 24, 33), "alignment")
    check(lambda d: d.__setitem__(slice(d.index(b"blk.1.attn_q.weight"), d.index(b"blk.1.attn_q.weight") + 19),
                                  b"blk.0.attn_q.weight"), "appears twice")
    check(put("<I", lambda d: _after(d, b"llama.block_count") + 4, 40), "block_count says 40 layers")
    check(put("<I", lambda d: _after(d, b"llama.feed_forward_length") + 4, 128),
          r"shape \[64, 32\], the metadata implies \[128, 32\]")


def test_random_header_damage_never_escapes(tmp_path: Path, small_gguf: Path) -> None:
    """Any damage to the header gives a model or a CheckpointError, never another exception or a hang."""
    data = small_gguf.read_bytes()
    end = G.read_header(small_gguf).data_start
    rng = np.random.default_rng(0)
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(150):
        damaged = bytearray(data)
        for at in rng.integers(0, end, size=int(rng.integers(1, 4))):
            damaged[at] = int(rng.integers(0, 256))
        bad = tmp_path / "fuzz.gguf"
        bad.write_bytes(bytes(damaged))
        with deadline(20), warnings_ignored():
            try:
                ckpt = G.read_gguf(bad)
                for _ in ckpt.tensors():
                    pass
                outcomes["loaded"] += 1
            except CheckpointError:
                outcomes["refused"] += 1
    print(f"\nrandom header damage: {outcomes}")
    assert outcomes["refused"] > 10 and outcomes["loaded"] > 10, outcomes


@contextlib.contextmanager
def warnings_ignored() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_unsupported_architecture(tmp_path: Path) -> None:
    def metadata(w: Any) -> None:
        w.add_block_count(2)

    path = write_gguf(tmp_path / "m.gguf", "mamba", metadata, {"x": (np.zeros((2, 32), np.float32), "F32")})
    with pytest.raises(CheckpointError, match=r"architecture 'mamba' is not supported; llmkit reads llama"):
        load(path)


def test_unsupported_tokenizer_loads_without_one(tmp_path: Path, small_gguf: Path) -> None:
    bad = _patched(tmp_path, small_gguf, lambda d: d.__setitem__(
        slice(_after(d, b"tokenizer.ggml.model") + 12, _after(d, b"tokenizer.ggml.model") + 16), b"bert"))
    with pytest.warns(Warning, match="tokenizer.ggml.model 'bert' is not supported"):
        ckpt = G.read_gguf(bad)
    assert ckpt.tokenizer is None and any("'bert'" in note for note in ckpt.ignored)
    with pytest.warns(Warning, match="'bert'"):
        assert load(bad, policy="reference").tokenizer is None


def test_not_a_gguf_and_missing(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("hello, I am not a model\n")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load(text)
    with pytest.raises(CheckpointError, match="cannot read|No such file"):
        G.read_gguf(tmp_path / "absent.gguf")

"""GGUF reader: a llama.cpp `.gguf` file -> `Checkpoint` (spec, lazy float32 tensors, tokenizer).

    ckpt = read_gguf("model.gguf")      # or llmkit.load("model.gguf") / llmkit.load("smollm2-135m")

What it reads:
- architectures: `llama` (Llama 1/2/3, Mistral, SmolLM, TinyLlama, ... and Mixtral-style MoE with
  merged `*_exps` expert tensors). Anything else is a `CheckpointError` naming it.
- metadata -> a spec dict (the YAML spec format, validated later by `load_spec`): sizes, head
  counts, head dim (`attention.key_length`), RMSNorm eps, RoPE base, linear/YaRN scaling keys and
  Llama-3 scaling given as the `rope_freqs.weight` tensor, context length, vocab size (the token
  list), tied embeddings when the file has no `output.weight`.
- tensors, dequantised to float32 one at a time with `gguf.quants.dequantize` (`SUPPORTED_TYPES`);
  llama.cpp's Q/K row permutation (convert_hf_to_gguf.py reorders each head's rows from
  rotate-half to interleaved pairs) is undone, K with the KV head count.
- tokenizer: `tokenizer.ggml.model == "gpt2"` (byte-level BPE, with llama.cpp's pre-tokenizer
  chosen by `tokenizer.ggml.pre`), control tokens as special added tokens, BOS/EOS/EOT/EOM, the
  `add_bos_token` flag and `tokenizer.chat_template`. Other tokenizer models (SentencePiece
  `llama`, ...) load the weights without a tokenizer; the reason is in `Checkpoint.ignored` and
  a warning.

Safety: nothing is unpickled. Before `gguf.GGUFReader` touches the file, the whole header is walked
here with bounds checks (counts, string and array lengths against the bytes left, tensor ranks,
types, element counts, alignment and every tensor's byte range against the file size), because
the reader trusts counts it reads (a hostile array length makes it loop without end) and reports
a truncated file as a numpy reshape error. Every problem is a `CheckpointError` naming the file.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import LlmkitError, LlmkitWarning
from .loading import Checkpoint, CheckpointError

SUPPORTED_ARCHITECTURES = ("llama",)

# value types of GGUF metadata (gguf.GGUFValueType)
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_FIXED_SIZE = {_U8: 1, _I8: 1, _U16: 2, _I16: 2, _U32: 4, _I32: 4, _F32: 4, _BOOL: 1, _U64: 8, _I64: 8, _F64: 8}
_SCALAR_FORMAT = {_U8: "<B", _I8: "<b", _U16: "<H", _I16: "<h", _U32: "<I", _I32: "<i", _F32: "<f", _BOOL: "<?",
                  _U64: "<Q", _I64: "<q", _F64: "<d"}
_INT_TYPES = {_U8, _I8, _U16, _I16, _U32, _I32, _U64, _I64}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = 2**48  # as llmkit.spec.MAX_TENSOR_ELEMENTS: no real tensor is larger
_MAX_NESTING = 4  # arrays of arrays: llama.cpp writes none; a few levels are plenty


def _supported_types() -> dict[int, str]:
    from gguf import GGMLQuantizationType as T

    names = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
             "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS")
    return {int(T[n]): n for n in names}


SUPPORTED_TYPES = _supported_types()
"""ggml type id -> name, for the tensor types this reader dequantises (each checked in the tests
against gguf.quants and, for the K- and I-quants, transformers' independent torch dequantiser)."""


# ----------------------------------------------------------------------------- header walk


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    """As GGUF stores them (ne: fastest-varying first); the numpy/torch shape is reversed."""
    ggml_type: int
    offset: int
    """Absolute byte offset of the data in the file."""
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type {self.ggml_type}"


@dataclass(frozen=True)
class Header:
    version: int
    alignment: int
    data_start: int
    file_size: int
    tensors: tuple[TensorInfo, ...]


class _Walker:
    """Reads the header from a read-only mapping, every read bounds-checked."""

    def __init__(self, buf: Any, source: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.source = source

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: corrupt or truncated GGUF file: {message}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} at byte {self.pos} needs {n} bytes but only {self.size - self.pos} remain "
                f"(file size {self.size}); the file is truncated or its header is damaged"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", f"length of {what}")
        self.need(n, what)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """Skip one value; returns it when it is a scalar (for general.alignment)."""
        if vtype in _FIXED_SIZE:
            size = _FIXED_SIZE[vtype]
            self.need(size, what)
            value = struct.unpack_from(_SCALAR_FORMAT[vtype], self.buf, self.pos)[0]
            self.pos += size
            return value
        if vtype == _STR:
            n = self.unpack("<Q", f"length of {what}")
            self.need(n, what)
            self.pos += n
            return None
        if vtype == _ARR:
            if depth >= _MAX_NESTING:
                raise self.fail(f"{what}: arrays nested more than {_MAX_NESTING} deep")
            itype, count = self.unpack("<IQ", f"array header of {what}")
            if itype in _FIXED_SIZE:
                total = count * _FIXED_SIZE[itype]
                self.need(total, f"{what} ({count} elements)")
                self.pos += total
            elif itype == _STR:
                # each string takes at least its 8-byte length: bound the count before looping
                self.need(count * 8, f"{what} ({count} strings)")
                buf, pos, size = self.buf, self.pos, self.size
                for i in range(count):
                    if pos + 8 > size:
                        self.pos = pos
                        self.need(8, f"{what}[{i}]")
                    (n,) = struct.unpack_from("<Q", buf, pos)
                    pos += 8
                    if n > size - pos:
                        self.pos = pos
                        self.need(n, f"{what}[{i}]")
                    pos += n
                self.pos = pos
            elif itype == _ARR:
                self.need(count * 12, f"{what} ({count} arrays)")
                for i in range(count):
                    self.skip_value(_ARR, f"{what}[{i}]", depth + 1)
            else:
                raise self.fail(f"{what}: unknown array element type {itype}")
            return None
        raise self.fail(f"{what}: unknown value type {vtype}")


def read_header(path: str | Path) -> Header:
    """Walk and bounds-check a GGUF header (no tensor data is read). Raises `CheckpointError`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    source = str(path)
    try:
        file_size = Path(path).stat().st_size
        if file_size == 0:
            raise CheckpointError(f"{source}: empty file, not a GGUF file")
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            w = _Walker(buf, source)
            w.need(4, "magic")
            if bytes(buf[:4]) != b"GGUF":
                raise CheckpointError(f"{source}: not a GGUF file (the first bytes are {bytes(buf[:4])!r}, "
                                      "expected b'GGUF')")
            w.pos = 4
            version = w.unpack("<I", "version")
            if version & 0xFFFF == 0 and version:
                raise CheckpointError(f"{source}: a big-endian GGUF file; llmkit reads little-endian GGUF only")
            if version not in (2, 3):
                raise CheckpointError(f"{source}: GGUF version {version} is not supported (versions 2 and 3 are)")
            n_tensors, n_kv = w.unpack("<QQ", "tensor and metadata counts")
            # every metadata entry takes >= 13 bytes (key length, type, a 1-byte value), every
            # tensor entry >= 28 (name length, rank, one dim, type, offset)
            w.need(n_kv * 13, f"{n_kv} metadata entries")
            alignment = 32
            for i in range(n_kv):
                key = w.string(f"key of metadata entry {i}")
                name = key.decode("utf-8", "replace")
                vtype = w.unpack("<I", f"type of {name!r}")
                value = w.skip_value(vtype, f"metadata {name!r}")
                if key == b"general.alignment":
                    if vtype != _U32 or not value or value & (value - 1):
                        raise w.fail(f"general.alignment must be a power of two (uint32), got {value!r}")
                    alignment = value
            w.need(n_tensors * 28, f"{n_tensors} tensor entries")
            entries = []
            for i in range(n_tensors):
                raw = w.string(f"name of tensor {i}")
                try:
                    name = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise w.fail(f"tensor {i}: name {raw!r} is not UTF-8") from None
                n_dims = w.unpack("<I", f"rank of tensor {name!r}")
                if not 1 <= n_dims <= _MAX_DIMS:
                    raise w.fail(f"tensor {name!r}: rank {n_dims}, expected 1 to {_MAX_DIMS}")
                dims = tuple(w.unpack("<" + "Q" * n_dims, f"shape of tensor {name!r}") if n_dims > 1
                             else (w.unpack("<Q", f"shape of tensor {name!r}"),))
                ggml_type = w.unpack("<I", f"type of tensor {name!r}")
                offset = w.unpack("<Q", f"data offset of tensor {name!r}")
                entries.append((name, dims, ggml_type, offset))
            data_start = -(-w.pos // alignment) * alignment
    except OSError as exc:
        raise CheckpointError(f"{source}: cannot read: {exc.strerror or exc}") from None

    tensors = []
    seen: set[str] = set()
    for name, dims, ggml_type, offset in entries:
        what = f"tensor {name!r}"
        if name in seen:
            raise CheckpointError(f"{source}: corrupt GGUF file: {what} appears twice")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            raise CheckpointError(f"{source}: corrupt GGUF file or a newer ggml type: {what} has type id "
                                  f"{ggml_type}, unknown to the gguf package") from None
        if any(d == 0 for d in dims):
            raise CheckpointError(f"{source}: corrupt GGUF file: {what} has an empty dimension {list(dims)}")
        elements = math.prod(dims)
        if elements > _MAX_ELEMENTS:
            raise CheckpointError(f"{source}: corrupt GGUF file: {what} claims {elements} elements {list(dims)}")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise CheckpointError(f"{source}: corrupt GGUF file: {what} ({qtype.name}) has rows of {dims[0]} "
                                  f"elements, not a multiple of the block size {block}")
        nbytes = elements // block * type_size
        if offset % alignment:
            raise CheckpointError(f"{source}: corrupt GGUF file: {what} data offset {offset} is not a multiple "
                                  f"of the alignment {alignment}")
        start = data_start + offset
        if start + nbytes > file_size:
            raise CheckpointError(
                f"{source}: truncated or corrupt GGUF file: {what} ({qtype.name}, shape {list(reversed(dims))}) "
                f"occupies bytes {start}..{start + nbytes} but the file has {file_size} bytes"
            )
        tensors.append(TensorInfo(name, dims, int(qtype), start, nbytes))
    return Header(version, alignment, data_start, file_size, tuple(tensors))


def open_gguf(path: str | Path) -> tuple[Header, Any]:
    """The bounds-checked header and a `gguf.GGUFReader` (memory-mapped, read-only) of `path`."""
    from gguf import GGUFReader

    header = read_header(path)
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the header walk above found nothing; anything left is still corrupt
        raise CheckpointError(f"{path}: corrupt GGUF file: {type(exc).__name__}: {exc}") from None
    names = [t.name for t in reader.tensors]
    if names != [t.name for t in header.tensors] or any(
        rt.data_offset != t.offset for rt, t in zip(reader.tensors, header.tensors)
    ):
        raise CheckpointError(f"{path}: corrupt GGUF file: the tensor table does not read consistently")
    return header, reader


def dequantize(tensor: Any, source: str = "<gguf>") -> np.ndarray:
    """A `gguf.ReaderTensor` -> a float32 numpy array in numpy/torch layout (reversed GGUF dims),
    owning its memory (never a view of the file mapping)."""
    from gguf.quants import dequantize as gguf_dequantize

    ggml_type = int(tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if ggml_type not in SUPPORTED_TYPES:
        name = getattr(tensor.tensor_type, "name", str(ggml_type))
        raise CheckpointError(
            f"{source}: tensor {tensor.name!r} has type {name}, which llmkit cannot dequantise; supported: "
            f"{', '.join(SUPPORTED_TYPES.values())}. Re-quantise the model to one of these (llama-quantize)"
        )
    if SUPPORTED_TYPES[ggml_type] == "F32":
        out = np.array(tensor.data, dtype=np.float32, copy=True)
    else:
        out = gguf_dequantize(tensor.data, tensor.tensor_type)
        if out.dtype != np.float32 or np.may_share_memory(out, tensor.data):
            out = np.array(out, dtype=np.float32, copy=True)
    if out.shape != shape:
        out = out.reshape(shape)
    return out


# ----------------------------------------------------------------------------- metadata

_MISSING = object()


class _Meta:
    """Typed access to GGUF metadata; a value of the wrong type is a `CheckpointError` naming its key."""

    def __init__(self, reader: Any, source: str) -> None:
        self.fields = reader.fields
        self.source = source

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def _field(self, key: str, default: Any) -> Any:
        f = self.fields.get(key)
        if f is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.source}: GGUF metadata {key!r} is missing")
            return None
        return f

    def _bad(self, key: str, f: Any, expected: str) -> CheckpointError:
        got = "/".join(t.name.lower() for t in f.types)
        return CheckpointError(f"{self.source}: GGUF metadata {key!r} is {got}, expected {expected}")

    def int(self, key: str, default: Any = _MISSING) -> Any:
        f = self._field(key, default)
        if f is None:
            return default
        if len(f.types) != 1 or int(f.types[0]) not in _INT_TYPES:
            raise self._bad(key, f, "an integer")
        return int(f.contents())

    def float(self, key: str, default: Any = _MISSING) -> Any:
        f = self._field(key, default)
        if f is None:
            return default
        if len(f.types) != 1 or int(f.types[0]) not in _INT_TYPES | {_F32, _F64}:
            raise self._bad(key, f, "a number")
        value = float(f.contents())
        if not math.isfinite(value):
            raise CheckpointError(f"{self.source}: GGUF metadata {key!r} is {value}, expected a finite number")
        return value

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        f = self._field(key, default)
        if f is None:
            return default
        if len(f.types) != 1 or int(f.types[0]) != _BOOL:
            raise self._bad(key, f, "a bool")
        return bool(f.contents())

    def str(self, key: str, default: Any = _MISSING) -> Any:
        f = self._field(key, default)
        if f is None:
            return default
        if len(f.types) != 1 or int(f.types[0]) != _STR:
            raise self._bad(key, f, "a string")
        return self._decode(key, f.parts[-1])

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        return self._array(key, default, {_STR}, "an array of strings", lambda part: self._decode(key, part))

    def ints(self, key: str, default: Any = _MISSING) -> Any:
        return self._array(key, default, _INT_TYPES, "an array of integers", lambda part: int(part[0]))

    def _array(self, key: str, default: Any, item_types: set[int], expected: str, convert: Any) -> Any:
        f = self._field(key, default)
        if f is None:
            return default
        if int(f.types[0]) != _ARR:
            raise self._bad(key, f, expected)
        if not f.data:
            return []
        if len(f.types) != 2 or int(f.types[1]) not in item_types:
            raise self._bad(key, f, expected)
        return [convert(f.parts[i]) for i in f.data]

    def _decode(self, key: str, part: np.ndarray) -> str:
        try:
            return bytes(part).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.source}: GGUF metadata {key!r} holds a string that is not UTF-8") from None


# ----------------------------------------------------------------------------- architectures


def _positive(meta: _Meta, key: str, value: Any, limit: int = 2**31) -> int:
    if not isinstance(value, int) or not 1 <= value <= limit:
        raise CheckpointError(f"{meta.source}: GGUF metadata {key!r} = {value!r}; expected an integer in 1..{limit}")
    return value


def _llama3_scaling(factors: np.ndarray, theta: float, dim: int, meta: _Meta, arch: str) -> dict[str, Any] | None:
    """Recover Llama-3 RoPE scaling from llama.cpp's `rope_freqs.weight` (a divisor per frequency).

    convert_hf_to_gguf.py writes f_i = 1 (wavelength < L/high), factor (> L/low), and
    1 / ((1 - s) / factor + s) in between, s = (L / wavelength - low) / (high - low). The frequencies
    depend on L/low and L/high only, found here by a least-squares fit of s on the transition
    frequencies; the result is checked against every f_i.
    """
    where = f"{meta.source}: rope_freqs.weight"
    factors = factors.astype(np.float64)
    if factors.shape != (dim // 2,) or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise CheckpointError(f"{where}: expected {dim // 2} positive finite divisors, got shape {factors.shape}")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    w = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor = float(factors.max())
    mid = (np.abs(factors - 1) > 1e-6) & (np.abs(factors - factor) > 1e-6 * factor)
    ok = factor > 1 and mid.sum() >= 2
    if ok:
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(w[mid], s, 1)  # s = a w + b, a = L / (2 pi (L/H - 1)), b = -1 / (L/H - 1)
        ok = b < 0 and a > 0
    if not ok:
        raise CheckpointError(
            f"{where}: these per-frequency RoPE divisors are not Llama-3 scaling (or have too few transition "
            "frequencies to recover it); llmkit cannot represent them"
        )
    ratio = 1 - 1 / b  # L / H = high / low
    low_wavelen = -a * 2 * math.pi / b
    orig = meta.int(f"{arch}.rope.scaling.original_context_length", None) or round(low_wavelen)
    low = orig / low_wavelen
    scaling = {"type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": low * ratio,
               "original_max_position_embeddings": orig}
    # check: llama.cpp's own formula with these parameters gives the file's divisors
    wavelen = 2 * math.pi / w
    smooth = (orig / wavelen - low) / (low * ratio - low)
    expect = np.where(wavelen < orig / (low * ratio), 1.0,
                      np.where(wavelen > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(expect, factors, rtol=1e-4, atol=0):
        raise CheckpointError(f"{where}: not Llama-3 RoPE scaling (the best fit {scaling} differs from the "
                              f"divisors by up to {np.abs(expect / factors - 1).max():.2g} relative)")
    return scaling


def _rope_scaling(meta: _Meta, arch: str, context: int) -> dict[str, Any] | None:
    kind = meta.str(f"{arch}.rope.scaling.type", None)
    factor = meta.float(f"{arch}.rope.scaling.factor", None)
    if kind is None and factor is None:
        return None
    kind = kind or "linear"
    if kind == "none" or (factor is not None and factor == 1.0 and kind == "linear"):
        return None
    if factor is None or factor <= 0:
        raise CheckpointError(f"{meta.source}: {arch}.rope.scaling.type is {kind!r} but "
                              f"{arch}.rope.scaling.factor is {factor!r}")
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        orig = meta.int(f"{arch}.rope.scaling.original_context_length", None) or max(1, round(context / factor))
        out: dict[str, Any] = {"type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
        for gguf_key, field in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = meta.float(f"{arch}.rope.scaling.{gguf_key}", None)
            if value is not None:
                out[field] = value
        return out
    raise CheckpointError(f"{meta.source}: {arch}.rope.scaling.type {kind!r} is not supported "
                          "(supported: none, linear, yarn; Llama-3 scaling as rope_freqs.weight)")


@dataclass(frozen=True)
class _Planned:
    key: str
    """llmkit state-dict key."""
    tensor: Any
    """gguf.ReaderTensor."""
    unpermute_heads: int | None = None


def _llama(meta: _Meta, reader: Any, path: Path) -> tuple[dict[str, Any], list[_Planned], list[str]]:
    """Spec and tensor plan of a `llama`-architecture file."""
    arch, source = "llama", meta.source

    def pos(key: str, default: Any = _MISSING, limit: int = 2**31) -> int:
        return _positive(meta, f"{arch}.{key}", meta.int(f"{arch}.{key}", default), limit)

    d = pos("embedding_length")
    n_layers = pos("block_count", limit=2**16)
    n_heads = pos("attention.head_count")
    n_kv = pos("attention.head_count_kv", n_heads)
    context = pos("context_length")
    head_dim = pos("attention.key_length", d // n_heads if d % n_heads == 0 else None)
    value_dim = pos("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise CheckpointError(f"{source}: {arch}.attention.value_length ({value_dim}) differs from key_length "
                              f"({head_dim}); llmkit's attention has one head_dim")
    if n_heads % n_kv:
        raise CheckpointError(f"{source}: {arch}.attention.head_count ({n_heads}) is not a multiple of "
                              f"head_count_kv ({n_kv})")
    rope_dim = pos("rope.dimension_count", head_dim)
    if rope_dim != head_dim or head_dim % 2:
        raise CheckpointError(f"{source}: {arch}.rope.dimension_count ({rope_dim}) must equal an even head dim "
                              f"({head_dim}): llama.cpp permutes whole heads for RoPE")
    eps = meta.float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    theta = meta.float(f"{arch}.rope.freq_base", 10000.0)
    if eps <= 0 or theta <= 0:
        raise CheckpointError(f"{source}: layer_norm_rms_epsilon ({eps}) and rope.freq_base ({theta}) must be > 0")
    n_experts = meta.int(f"{arch}.expert_count", 0)
    if not 0 <= n_experts <= 2**16:
        raise CheckpointError(f"{source}: {arch}.expert_count = {n_experts}; expected 0 (dense) to {2**16}")
    per_layer = 9 if not n_experts else 10
    if n_layers * per_layer + 2 > len(reader.tensors):
        raise CheckpointError(f"{source}: {arch}.block_count says {n_layers} layers ({per_layer} tensors each) "
                              f"but the file has only {len(reader.tensors)} tensors")
    tokens = meta.strings("tokenizer.ggml.tokens", None)
    by_name = {t.name: t for t in reader.tensors}
    vocab = len(tokens) if tokens else meta.int(f"{arch}.vocab_size", None)
    if not vocab and "token_embd.weight" in by_name:
        vocab = int(by_name["token_embd.weight"].shape[-1])
    _positive(meta, "vocabulary size (tokenizer.ggml.tokens, llama.vocab_size)", vocab)

    ignored: list[str] = []
    rope: dict[str, Any] = {"theta": theta}
    scaling = _rope_scaling(meta, arch, context)
    if "rope_freqs.weight" in by_name:
        t = by_name["rope_freqs.weight"]
        llama3 = _llama3_scaling(dequantize(t, source).reshape(-1), theta, rope_dim, meta, arch)
        if llama3 and scaling:
            raise CheckpointError(f"{source}: both {arch}.rope.scaling.* and rope_freqs.weight scale RoPE")
        scaling = scaling or llama3
        ignored.append(f"rope_freqs.weight (read as rope scaling {llama3})")
    if scaling:
        rope["scaling"] = scaling
    attention: dict[str, Any] = {"n_heads": n_heads, "n_kv_heads": n_kv, "rope": rope}
    if head_dim * n_heads != d:
        attention["head_dim"] = head_dim
    if n_experts:
        top_k = _positive(meta, f"{arch}.expert_used_count", meta.int(f"{arch}.expert_used_count"), n_experts)
        hidden = pos("expert_feed_forward_length", meta.int(f"{arch}.feed_forward_length"))
        mlp: dict[str, Any] = {"type": "moe", "n_experts": n_experts, "top_k": top_k, "hidden": hidden,
                               "activation": "silu", "renormalize": "sum"}
    else:
        hidden = pos("feed_forward_length")
        mlp = {"hidden": hidden, "activation": "silu"}
    tied = "output.weight" not in by_name
    name = meta.str("general.name", None) or path.stem
    types: dict[str, int] = {}
    for t in reader.tensors:
        tn = getattr(t.tensor_type, "name", str(t.tensor_type))
        types[tn] = types.get(tn, 0) + 1
    spec = {
        "name": name,
        "source": str(path),
        "description": f"GGUF {arch}: " + ", ".join(f"{n} x{c}" for n, c in types.items()),
        "vocab_size": vocab,
        "d_model": d,
        "n_layers": n_layers,
        "max_seq_len": context,
        "norm": {"type": "rms", "eps": eps},
        "layer": {"placement": "pre", "attention": attention, "mlp": mlp},
        "head": {"tied": tied},
    }

    # expected (numpy-order) shape of every tensor, and its llmkit key
    q_rows, kv_rows = n_heads * head_dim, n_kv * head_dim
    expect: dict[str, tuple[str, tuple[int, ...], int | None]] = {
        "token_embd.weight": ("embedding.weight", (vocab, d), None),
        "output_norm.weight": ("norm.weight", (d,), None),
    }
    if not tied:
        expect["output.weight"] = ("head.weight", (vocab, d), None)
    for i in range(n_layers):
        b, k = f"blk.{i}.", f"layers.{i}."
        expect |= {
            b + "attn_norm.weight": (k + "attn_norm.weight", (d,), None),
            b + "attn_q.weight": (k + "attention.wq", (q_rows, d), n_heads),
            b + "attn_k.weight": (k + "attention.wk", (kv_rows, d), n_kv),
            b + "attn_v.weight": (k + "attention.wv", (kv_rows, d), None),
            b + "attn_output.weight": (k + "attention.wo", (d, q_rows), None),
            b + "ffn_norm.weight": (k + "mlp_norm.weight", (d,), None),
        }
        if n_experts:
            expect |= {
                b + "ffn_gate_inp.weight": (k + "mlp.router", (n_experts, d), None),
                b + "ffn_gate_exps.weight": (k + "mlp.w_gate", (n_experts, hidden, d), None),
                b + "ffn_up_exps.weight": (k + "mlp.w_up", (n_experts, hidden, d), None),
                b + "ffn_down_exps.weight": (k + "mlp.w_down", (n_experts, d, hidden), None),
            }
        else:
            expect |= {
                b + "ffn_gate.weight": (k + "mlp.w_gate", (hidden, d), None),
                b + "ffn_up.weight": (k + "mlp.w_up", (hidden, d), None),
                b + "ffn_down.weight": (k + "mlp.w_down", (d, hidden), None),
            }

    problems: list[str] = []
    plan: list[_Planned] = []
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.name == "rope_freqs.weight":
            continue
        if t.name not in expect:
            hint = ""
            if re.search(r"\.ffn_(gate|up|down)\.\d+\.weight$", t.name):
                hint = " (per-expert tensors of an old conversion: re-convert with a current convert_hf_to_gguf.py)"
            problems.append(f"unexpected tensor {t.name!r} {list(shape)}{hint}")
            continue
        key, want, heads = expect.pop(t.name)
        if shape != want:
            problems.append(f"tensor {t.name!r} has shape {list(shape)}, the metadata implies {list(want)}")
            continue
        if int(t.tensor_type) not in SUPPORTED_TYPES:
            problems.append(f"tensor {t.name!r} has type {getattr(t.tensor_type, 'name', t.tensor_type)}, which "
                            f"llmkit cannot dequantise (supported: {', '.join(SUPPORTED_TYPES.values())})")
            continue
        plan.append(_Planned(key, t, heads))
    if expect:
        missing = sorted(expect)
        problems.append("missing tensors: " + ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)"
                                                                        if len(missing) > 8 else ""))
    if problems:
        raise CheckpointError(f"{source}: cannot load this GGUF {arch} model:\n  - " + "\n  - ".join(problems))
    return spec, plan, ignored


_ARCHITECTURES = {"llama": _llama}


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's `permute` of Q/K rows (per head: rotate-half -> interleaved)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp's pre-tokenizer splits (llama-vocab.cpp), by `tokenizer.ggml.pre`
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_GPT2 = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}
_PRE_DIGITS_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"}
_PRE_QWEN2 = {"qwen2", "deepseek-r1-qwen", "megrez"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every token in it)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pre_tokenizer(pre: str | None) -> tuple[Any, bool, str | None]:
    """(pre-tokenizer, ignore_merges, note) for llama.cpp's `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers as pt

    def split(regex: str) -> Any:
        return pt.Sequence([pt.Split(Regex(regex), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])

    if pre in _PRE_DIGITS_GPT2:  # "\p{N}" first, then GPT-2's split, as StarCoder's/SmolLM's tokenizer.json
        digits = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
        return digits, False, None
    if pre in _PRE_LLAMA3:
        return split(_LLAMA3_SPLIT), True, None
    if pre in _PRE_QWEN2:
        return split(_QWEN2_SPLIT), False, None
    note = None if pre is None or pre in _PRE_GPT2 else (
        f"tokenizer.ggml.pre {pre!r} is not known to llmkit; using GPT-2's split (as transformers does), "
        "which may tokenise some text differently from llama.cpp")
    return pt.ByteLevel(add_prefix_space=False, use_regex=True), False, note


def build_tokenizer(meta: _Meta) -> tuple[Any, list[str]]:
    """(llmkit Tokenizer or None, notes); notes say why there is none or what is approximate."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders
    from tokenizers.models import BPE

    from .tokenizer import Tokenizer

    model = meta.str("tokenizer.ggml.model", None)
    if model is None:
        return None, ["no tokenizer: the GGUF metadata has no tokenizer.ggml.model"]
    if model != "gpt2":
        return None, [f"no tokenizer: tokenizer.ggml.model {model!r} is not supported (supported: 'gpt2', "
                      "byte-level BPE); the weights load without one"]
    tokens = meta.strings("tokenizer.ggml.tokens")
    merges = meta.strings("tokenizer.ggml.merges", [])
    types = meta.ints("tokenizer.ggml.token_type", None)
    if types is not None and len(types) != len(tokens):
        return None, [f"no tokenizer: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        bad = next(m for m, p in zip(merges, pairs) if len(p) != 2)
        return None, [f"no tokenizer: tokenizer.ggml.merges has an entry {bad!r} that is not two tokens"]
    pre, ignore_merges, note = _pre_tokenizer(meta.str("tokenizer.ggml.pre", None))
    try:
        backend = Backend(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False, ignore_merges=ignore_merges))
    except Exception as exc:  # tokenizers rejects merges of tokens not in the vocabulary
        return None, [f"no tokenizer: the vocabulary and merges do not form a BPE model ({exc})"]
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    if types is not None:
        # control tokens (3) matched whole and special; user-defined (4) whole but not special. As in
        # transformers, only tokens spelled in the byte alphabet: added under another spelling they
        # would get new ids beyond the model's vocabulary (a control token outside it is mislabelled)
        control = [AddedToken(t, special=True, normalized=False)
                   for t, kind in zip(tokens, types) if kind == 3 and set(t) <= alphabet]
        user = [AddedToken(t, special=False, normalized=False)
                for t, kind in zip(tokens, types) if kind == 4 and set(t) <= alphabet]
        if control:
            backend.add_special_tokens(control)
        if user:
            backend.add_tokens(user)

    def token(key: str) -> str | None:
        i = meta.int(f"tokenizer.ggml.{key}", None)
        if i is None:
            return None
        if not 0 <= i < len(spelled):
            raise CheckpointError(f"{meta.source}: tokenizer.ggml.{key} = {i} is outside the vocabulary "
                                  f"(0..{len(spelled) - 1})")
        return spelled[i]

    eos = [token(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    notes = [note] if note else []
    try:
        tokenizer = Tokenizer(backend, bos_token=token("bos_token_id"), eos_tokens=dict.fromkeys(e for e in eos if e),
                              chat_template=meta.str("tokenizer.chat_template", None),
                              add_bos=meta.bool("tokenizer.ggml.add_bos_token", False))
    except LlmkitError as exc:
        return None, [f"no tokenizer: {exc}"]
    return tokenizer, notes


# ----------------------------------------------------------------------------- the reader


def read_gguf(path: str | Path) -> Checkpoint:
    """A GGUF file -> `Checkpoint`: spec dict, lazy float32 tensors under llmkit's keys, tokenizer."""
    path = Path(path)
    source = str(path)
    header, reader = open_gguf(path)
    meta = _Meta(reader, source)
    arch = meta.str("general.architecture")
    if arch not in _ARCHITECTURES:
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported; llmkit reads "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    spec, plan, ignored = _ARCHITECTURES[arch](meta, reader, path)
    try:
        tokenizer, notes = build_tokenizer(meta)
    except CheckpointError as exc:
        tokenizer, notes = None, [f"no tokenizer: {str(exc).removeprefix(source + ': ')}"]
    for note in notes:
        warnings.warn(f"{source}: {note}", LlmkitWarning, stacklevel=2)
    ignored.extend(notes)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for item in plan:
            w = dequantize(item.tensor, source)
            if item.unpermute_heads:
                w = _unpermute(w, item.unpermute_heads)
            yield item.key, torch.from_numpy(np.ascontiguousarray(w))

    return Checkpoint(spec=spec, tensors=tensors, source=source, tokenizer=tokenizer, ignored=ignored,
                      count=len(plan))


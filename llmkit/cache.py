"""The per-layer cache protocol that attention-like blocks use during generation.

A `LayerCache` holds named per-token tensors laid out [B, S, ...] (sequence on dim 1) and the
positions [B, S] of those tokens. A block calls `extend(positions, **new)` with the T tokens of
the current step; it gets back everything it may attend to (cached + new) and the cache keeps
the new tokens for later steps. Prefill (empty cache, T tokens), single-token decode and chunked
prefill (T tokens after a cached prefix) are the same call. With `max_tokens` (a sliding window
of W keys) the cache keeps only the last W tokens, so a windowed layer never holds more.

What is cached is the block's business: k and v for standard attention; the compressed latent
and the shared RoPE key for MLA.

With `dtype` (e.g. float16 under a float32 model: llama.cpp's default F16 KV cache) the cache
stores what it is given rounded to that dtype and hands it back converted to the dtype it came
in: the new tokens too, so a token attends over the same values whether it is new or cached.
Stored in half precision, keys and values take half the memory and half the reads of a decode
step's attention; the rounding (relative error <= 2^-11 in float16's normal range) is the cost.
"""

from __future__ import annotations

import math

import torch

from .errors import LlmkitError


class LayerCache:
    def __init__(self, max_tokens: int | None = None, dtype: torch.dtype | None = None) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise LlmkitError(f"LayerCache max_tokens must be >= 1, got {max_tokens}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise LlmkitError(f"a cache dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.max_tokens = max_tokens
        self.dtype = dtype  # storage dtype; None: as the block gives them
        self.tensors: dict[str, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def extend(
        self, positions: torch.Tensor, **new: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Append T tokens ([B, T, ...] each, positions [B, T]); return cached+new and their positions."""
        full, full_pos = self.extend_stored(positions, **new)
        return {k: v.to(new[k].dtype) for k, v in full.items()}, full_pos

    def extend_stored(
        self, positions: torch.Tensor, **new: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`extend`, with cached+new in the storage dtype, for a block that converts them itself:
        a float16 cache under a bfloat16 model read straight into float32 sums skips a float16 ->
        bfloat16 conversion, which inductor's generated CPU loops ran ~9x slower than the read."""
        if self.dtype is None:
            return self._extend(positions, new)
        return self._extend(positions, {k: v.to(self.dtype) for k, v in new.items()})

    def _extend(
        self, positions: torch.Tensor, new: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`extend` on tensors already in the storage dtype."""
        b, t = positions.shape
        for name, value in new.items():
            if value.shape[:2] != (b, t):
                raise LlmkitError(
                    f"cache tensor {name!r} has shape {tuple(value.shape)}, expected [{b}, {t}, ...]"
                )
        if self.positions is None:
            full, full_pos = dict(new), positions
        else:
            if set(new) != set(self.tensors):
                raise LlmkitError(f"cache holds {sorted(self.tensors)}, got {sorted(new)}")
            full = {k: torch.cat([self.tensors[k], v], dim=1) for k, v in new.items()}
            full_pos = torch.cat([self.positions, positions], dim=1)
        if self.max_tokens is None:
            self.tensors, self.positions = full, full_pos
        else:
            self.tensors = {k: v[:, -self.max_tokens:] for k, v in full.items()}
            self.positions = full_pos[:, -self.max_tokens:]
        return full, full_pos

    def values_per_token(self) -> int:
        """Cached numbers per token per batch row (e.g. 2 * n_kv_heads * head_dim for k and v)."""
        return sum(math.prod(v.shape[2:]) for v in self.tensors.values())


def as_positions(positions: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Accept positions as [T] or [B, T]; return [B, T] int64 (a negative position marks padding)."""
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(batch, -1)
    if tuple(positions.shape) != (batch, length):
        raise LlmkitError(f"positions have shape {tuple(positions.shape)}, expected [{batch}, {length}] or [{length}]")
    return positions.long()


class StaticLayerCache(LayerCache):
    """The same protocol over storage allocated once, for generation with a known length.

    Buffers of `capacity` tokens are allocated at the first `extend` (when the names, shapes and
    dtypes of what the block caches become known); later steps write in place and return views,
    so decoding allocates nothing per token. With `max_tokens` (a sliding window W) the storage is
    W tokens: each step concatenates the kept W with the new tokens for the block to attend over,
    then keeps the last W.
    """

    def __init__(self, capacity: int, max_tokens: int | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(max_tokens, dtype)
        if capacity < 1:
            raise LlmkitError(f"{type(self).__name__} capacity must be >= 1, got {capacity}")
        self.capacity = capacity if max_tokens is None else min(capacity, max_tokens)
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def _extend(
        self, positions: torch.Tensor, new: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        b, t = positions.shape
        if self._length == 0 and not self.tensors:
            self.tensors = {k: v.new_empty((b, self.capacity, *v.shape[2:])) for k, v in new.items()}
            self.positions = positions.new_empty((b, self.capacity))
        if set(new) != set(self.tensors):
            raise LlmkitError(f"cache holds {sorted(self.tensors)}, got {sorted(new)}")
        n = self._length
        if self.max_tokens is None:
            if n + t > self.capacity:
                raise LlmkitError(f"cache capacity {self.capacity} exceeded ({n} cached + {t} new)")
            for k, v in new.items():
                self.tensors[k][:, n:n + t] = v
            self.positions[:, n:n + t] = positions
            self._length = n + t
            return {k: v[:, :n + t] for k, v in self.tensors.items()}, self.positions[:, :n + t]
        full = {k: torch.cat([self.tensors[k][:, :n], v], dim=1) for k, v in new.items()}
        full_pos = torch.cat([self.positions[:, :n], positions], dim=1)
        keep = min(full_pos.shape[1], self.capacity)
        for k, v in full.items():
            self.tensors[k][:, :keep] = v[:, -keep:]
        self.positions[:, :keep] = full_pos[:, -keep:]
        self._length = keep
        return full, full_pos

    def values_per_token(self) -> int:
        return sum(math.prod(v.shape[2:]) for v in self.tensors.values())


class FixedLayerCache(StaticLayerCache):
    """The protocol over storage of one fixed shape whose fill state lives on the device, so that
    a decode step is the same computation every time and can be captured once and replayed (CUDA
    graphs, HPU graphs): no host value decides a shape, a slice or a slot.

    Storage: `capacity` token slots (a sliding window of W: W slots, used as a ring), allocated at
    the first `extend`, with positions -1 (an empty slot, which attention never sees). `extend`
    returns the storage as it was followed by the T new tokens ([B, capacity + T, ...]: every
    decode step attends over capacity + 1 keys, masked by position, as HF's StaticCache does),
    then writes the new tokens (the last `capacity` of them) at slots `(filled + i) % capacity`,
    `filled` being a device counter. `next_positions` ([B, 1], device) is one past each row's last
    position, so the next step's positions need no host read either. Without a window, writing past
    `capacity` tokens would overwrite the oldest: `generate` sizes it to prompt + new tokens, and
    the host-side count (`len`) refuses an overflow outside a replay.
    """

    def __init__(self, capacity: int, max_tokens: int | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(capacity, max_tokens, dtype)
        self.filled: torch.Tensor | None = None
        self.next_positions: torch.Tensor | None = None

    def _extend(
        self, positions: torch.Tensor, new: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        b, t = positions.shape
        if not self.tensors:
            self.tensors = {k: v.new_zeros((b, self.capacity, *v.shape[2:])) for k, v in new.items()}
            self.positions = positions.new_full((b, self.capacity), -1)
            self.filled = torch.zeros((), dtype=torch.long, device=positions.device)
            self.next_positions = positions.new_zeros((b, 1))
        if set(new) != set(self.tensors):
            raise LlmkitError(f"cache holds {sorted(self.tensors)}, got {sorted(new)}")
        if self.max_tokens is None and self._length + t > self.capacity:
            raise LlmkitError(f"cache capacity {self.capacity} exceeded ({self._length} cached + {t} new)")
        assert self.positions is not None and self.filled is not None and self.next_positions is not None
        full = {k: torch.cat([self.tensors[k], v], dim=1) for k, v in new.items()}
        full_pos = torch.cat([self.positions, positions], dim=1)
        keep = min(t, self.capacity)  # a static number: the shapes decide it
        slots = (self.filled + (t - keep) + torch.arange(keep, device=positions.device)) % self.capacity
        for k, v in new.items():
            self.tensors[k].index_copy_(1, slots, v[:, t - keep:])
        self.positions.index_copy_(1, slots, positions[:, t - keep:])
        self.filled.add_(t)
        self.next_positions.copy_(positions[:, -1:] + 1)
        self._length = min(self._length + t, self.capacity)
        return full, full_pos

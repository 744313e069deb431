"""The KV cache: per-layer key/value buffers [B, H, capacity, D] and every operation on them.

The model appends to it (`update`, then `advance`); decoding and the server select, merge, compact, crop and grow
it through the methods below, never through its buffers. Columns [0, length) are in use; the rest is headroom.
"""
from __future__ import annotations

import torch

from ..config import PhiConfig


class KVCache:
    """Key/value buffers of every layer; a step that runs past capacity grows them by doubling.

    Preallocate with `KVCache.allocate(...)` for decoding (no copies per step), or let the model create one.
    """

    def __init__(self, num_layers: int, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype  # of the buffers this cache makes; None: that of the first keys stored
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._length = 0  # tokens stored (same for all layers once a forward pass is complete)
        # Static mode (PhiForCausalLM.forward_static): new keys/values go to these positions and attention reads the
        # whole buffer under a mask, so every decoding step has the same shapes (what torch.compile wants).
        self.write_index: torch.Tensor | None = None

    @classmethod
    def allocate(cls, config: PhiConfig, batch_size: int, capacity: int, device=None, dtype=None) -> KVCache:
        cache = cls(config.num_hidden_layers, dtype)
        shape = (batch_size, config.num_attention_heads, capacity, config.head_dim)
        for i in range(config.num_hidden_layers):
            cache.keys[i] = torch.zeros(shape, device=device, dtype=dtype)
            cache.values[i] = torch.zeros(shape, device=device, dtype=dtype)
        return cache

    def _split(self, buffers: list[torch.Tensor], length: int) -> KVCache:
        """A new cache from this one's layout: the keys of every layer, then the values, `length` columns used."""
        n = len(self.keys)
        out = KVCache(n, self.dtype)
        out.keys, out.values, out._length = buffers[:n], buffers[n:], length
        return out

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys[0] is not None else 0

    # --- what the model calls ---
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys/values [B, H, T, D]; return all of that layer's keys/values to attend to."""
        if self.write_index is not None:
            self.keys[layer].index_copy_(2, self.write_index, k)
            self.values[layer].index_copy_(2, self.write_index, v)
            return self.keys[layer], self.values[layer]
        buf_k, buf_v, start = self.reserve(layer, k)
        t = k.shape[2]
        buf_k[:, :, start:start + t] = k
        buf_v[:, :, start:start + t] = v
        return buf_k[:, :, :start + t], buf_v[:, :, :start + t]

    def reserve(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room in one layer for new keys shaped like `like` [B, H, T, D] (made or grown as needed): the layer's
        whole key and value buffers and the column the new ones go to. `update` writes them; a decoding layer step on
        the C++ kernels writes them itself."""
        start, t = self._length, like.shape[2]
        if self.keys[layer] is None:  # a cache the model made: shaped like the first keys, grown below
            self.keys[layer] = self.values[layer] = like.new_zeros(*like.shape[:2], 0, like.shape[3],
                                                                   dtype=self.dtype or like.dtype)
        if self.keys[layer].shape[2] < start + t:
            self._grow_layer(layer, max(start + t, 2 * self.keys[layer].shape[2]))
        return self.keys[layer], self.values[layer], start

    def advance(self, tokens: int) -> None:
        """A forward pass stored `tokens` new columns in every layer."""
        self._length += tokens

    # --- what decoding and the server call ---
    def _grow_layer(self, layer: int, capacity: int) -> None:
        old_k, old_v = self.keys[layer], self.values[layer]
        new_k = old_k.new_zeros(*old_k.shape[:2], capacity, old_k.shape[3])
        new_v = new_k.clone()
        if self._length:
            new_k[:, :, :self._length] = old_k[:, :, :self._length]
            new_v[:, :, :self._length] = old_v[:, :, :self._length]
        self.keys[layer], self.values[layer] = new_k, new_v

    def grow(self, capacity: int) -> None:
        """Reallocate every layer to `capacity` columns (at least), keeping the columns in use."""
        if capacity > self.capacity:
            for layer in range(len(self.keys)):
                self._grow_layer(layer, capacity)

    def crop(self, length: int) -> None:
        """Forget every column from `length` on (guesses a decoding pass did not keep)."""
        self._length = min(self._length, length)

    def select_rows(self, index: torch.Tensor, drop_front: int = 0) -> KVCache:
        """A cache of the rows `index` names (repeats allowed: beams, n continuations of one prompt), without its
        first `drop_front` columns (padding no remaining row needs)."""
        keys = [k[:, :, drop_front:].index_select(0, index) for k in self.keys]
        values = [v[:, :, drop_front:].index_select(0, index) for v in self.values]
        return self._split(keys + values, self._length - drop_front)

    def merge(self, other: KVCache, headroom: int = 0) -> KVCache:
        """This cache's rows and then `other`'s, right-aligned on the longer length (the shorter side gets left
        padding, which the caller's attention mask hides), with `headroom` free columns after them."""
        length = max(self._length, other._length)
        out = []
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            rows = mine.shape[0]
            buf = mine.new_zeros(rows + theirs.shape[0], mine.shape[1], length + headroom, mine.shape[3])
            buf[:rows, :, length - self._length:length] = mine[:, :, :self._length]
            buf[rows:, :, length - other._length:length] = theirs[:, :, :other._length]
            out.append(buf)
        return self._split(out, length)

    def compact(self, columns: torch.Tensor, headroom: int = 0) -> KVCache:
        """A cache holding, per row, the columns `columns` [B, L] names, in that order (the real ones of a cache
        with holes), with `headroom` free columns after them."""
        length = columns.shape[1]
        out = []
        for buf in self.keys + self.values:
            b, h, _, d = buf.shape
            grown = buf.new_zeros(b, h, length + headroom, d)
            grown[:, :, :length] = buf[:, :, :self._length].gather(2, columns[:, None, :, None].expand(b, h, length, d))
            out.append(grown)
        return self._split(out, length)

    def write_at(self, position: int | None) -> None:
        """Static mode: the next forward_static writes its new keys/values at column `position`, which then counts
        as used; None returns to appending. The index tensor is kept and filled in place, since CUDA graphs replay
        the addresses they recorded."""
        if position is None:
            self.write_index = None
            return
        if self.write_index is None:
            self.write_index = torch.tensor([position], device=self.keys[0].device)
        else:
            self.write_index.fill_(position)
        self._length = max(self._length, position + 1)

    def reset(self) -> None:
        """Empty, zeroed buffers (masked columns get zero weight, but 0 * a stale inf would still be NaN)."""
        for t in self.keys + self.values:
            t.zero_()
        self._length, self.write_index = 0, None

    def mark_static_addresses(self) -> None:
        """Tell torch.compile the buffers stay where they are: a graph reads and writes them in place, no copies."""
        for t in self.keys + self.values:
            torch._dynamo.mark_static_address(t)

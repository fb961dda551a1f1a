"""Slotted key/value cache: each batch row is an independent sequence at its own length.

`StaticKVCache` writes every row at the same slots (one shared `index` (T,)), which suits a batch
that starts together. A server admits and evicts requests one at a time, so each row (a "slot" of
the batch) has its own fill level: `SlotKVCache.index` is (B, T), the cache slot each row's t-th new
token writes. Buffers stay fixed-shape `(B, n_kv_head, max_seq_len, head_dim)`; attention always
runs over all `max_seq_len` slots and the caller's 4-D mask hides empty ones (as with
`StaticKVCache`, `pos` is 0 and `advance` does nothing). `rows(a, b)` is a view on some rows that
shares the buffers, for prefilling one request without touching the others.
"""
from __future__ import annotations

import torch

from torchgraft.nn.kv_cache import KVCache, _CacheBuffers


class SlotLayerKVCache:
    """One layer of a `SlotKVCache`: writes row r's new tokens at `parent.index[r]`."""

    pos = 0  # positions and masks are explicit

    def __init__(self, parent: "SlotKVCache", k: torch.Tensor, v: torch.Tensor):
        self.parent = parent
        self.k = k
        self.v = v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` (B, H_kv, T, D) at slots `parent.index` (B, T), per row; return the full
        buffers (B, H_kv, max_seq_len, D). In place, with a tensor index: one compiled graph serves
        every decode step."""
        b, h, t, d = k.shape
        where = self.parent.index[:, None, :, None].expand(b, h, t, d)  # (B, H_kv, T, D)
        self.k.scatter_(2, where, k.to(self.k.dtype))
        self.v.scatter_(2, where, v.to(self.v.dtype))
        return self.k, self.v


class SlotKVCache(_CacheBuffers):
    """Fixed-shape KV cache whose rows fill independently (continuous batching).

    - `index` (B, T) long tensor: the slots the next forward writes, per row (set it, or copy into
      it in place for a compiled step);
    - the model gets explicit `position_ids` (B, T) and a 4-D bool mask (B, 1, T, max_seq_len);
    - `rows(start, stop)`: a `SlotKVCache` over those rows, sharing the buffers.
    """

    pos = 0

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v
        self.n_layer = len(k)
        self.batch_size, self.n_kv_head, self.max_seq_len, self.head_dim = k[0].shape
        self.index = torch.zeros(self.batch_size, 1, dtype=torch.long, device=k[0].device)
        self._layers = [SlotLayerKVCache(self, k[i], v[i]) for i in range(self.n_layer)]

    @classmethod
    def from_cache(cls, cache: KVCache) -> "SlotKVCache":
        """A slotted view of a `KVCache`'s preallocated buffers (e.g. from `model.make_kv_cache`)."""
        return cls(cache.k, cache.v)

    def rows(self, start: int, stop: int) -> "SlotKVCache":
        """A cache over rows [start, stop) that writes into this cache's buffers."""
        return SlotKVCache([t[start:stop] for t in self.k], [t[start:stop] for t in self.v])

    def layer(self, i: int) -> SlotLayerKVCache:
        return self._layers[i]

    def advance(self, n: int) -> None:
        """Nothing to do: the caller moves `index`."""

    def __repr__(self) -> str:
        return (f"SlotKVCache(n_layer={self.n_layer}, batch_size={self.batch_size}, "
                f"max_seq_len={self.max_seq_len}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, "
                f"dtype={self.dtype})")

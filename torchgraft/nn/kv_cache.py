"""Static key/value cache for autoregressive decoding.

One preallocated buffer per layer, `(batch, n_kv_head, max_seq_len, head_dim)`. A forward pass over
`T` new tokens writes each layer's keys/values at positions `[pos, pos + T)` and attends over
`[0, pos + T)`; after the last layer the model calls `advance(T)`. See docs/models.md.
"""
from __future__ import annotations

import torch


class LayerKVCache:
    """A view of one layer's buffers in a `KVCache`; `update(k, v)` is what attention calls."""

    def __init__(self, parent: "KVCache", k: torch.Tensor, v: torch.Tensor):
        self.parent = parent
        self.k = k
        self.v = v

    @property
    def pos(self) -> int:
        return self.parent.pos

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` (B, H_kv, T, D) at the current position; return keys/values (B, H_kv, pos+T, D)."""
        start, t = self.parent.pos, k.shape[2]
        end = start + t
        if end > self.parent.max_seq_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, cache holds "
                             f"{self.parent.max_seq_len} (make_kv_cache(max_seq_len=...))")
        b = k.shape[0]
        if b != self.k.shape[0]:
            raise ValueError(f"batch size {b} does not match the KV cache's {self.k.shape[0]}")
        self.k[:, :, start:end] = k.to(self.k.dtype)
        self.v[:, :, start:end] = v.to(self.v.dtype)
        return self.k[:, :, :end], self.v[:, :, :end]

    def query_slots(self, t: int, device: torch.device | None = None) -> torch.Tensor:
        """(T,) cache slots of the next `t` queries (for sliding-window masks)."""
        return torch.arange(self.pos, self.pos + t, device=device)


class _CacheBuffers:
    """What both caches read off their per-layer buffers `k`, `v` (lists of (B, H_kv, S, D) tensors)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class KVCache(_CacheBuffers):
    """Per-layer key/value buffers plus the number of positions already filled (`pos`).

    - `cache.pos`: tokens cached so far (the next token's cache slot); `len(cache)` is the same.
    - `cache.layer(i)` -> `LayerKVCache` for layer `i` (its `update(k, v)` writes and returns the
      keys/values to attend over).
    - `cache.advance(n)`: called once by the model after a forward over `n` tokens.
    - `cache.reset()`: back to empty (buffers are reused, not zeroed).
    - `cache.crop(n)`: forget everything after the first `n` positions.
    - `cache.reorder(index)`: select/reorder batch rows (beam search), in place.
    """

    def __init__(self, n_layer: int, batch_size: int, max_seq_len: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        self.n_layer = n_layer
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.n_kv_head = n_kv_head
        self.head_dim = head_dim
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        dtype = dtype or torch.get_default_dtype()
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.pos = 0

    def __len__(self) -> int:
        return self.pos

    @property
    def remaining(self) -> int:
        return self.max_seq_len - self.pos

    def layer(self, i: int) -> LayerKVCache:
        return LayerKVCache(self, self.k[i], self.v[i])

    def advance(self, n: int) -> None:
        if self.pos + n > self.max_seq_len:
            raise ValueError(f"KV cache overflow: {self.pos + n} > max_seq_len {self.max_seq_len}")
        self.pos += n

    def reset(self) -> None:
        self.pos = 0

    def crop(self, n: int) -> None:
        if not 0 <= n <= self.pos:
            raise ValueError(f"cannot crop a cache of {self.pos} positions to {n}")
        self.pos = n

    @torch.no_grad()
    def reorder(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        for i in range(self.n_layer):
            self.k[i] = self.k[i].index_select(0, index)
            self.v[i] = self.v[i].index_select(0, index)
        self.batch_size = int(index.numel())

    def __repr__(self) -> str:
        return (f"KVCache(n_layer={self.n_layer}, batch_size={self.batch_size}, pos={self.pos}, "
                f"max_seq_len={self.max_seq_len}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, "
                f"dtype={self.dtype})")


class StaticLayerKVCache:
    """One layer of a `StaticKVCache`: writes at the parent's slot `index`, returns whole buffers."""

    pos = 0  # see StaticKVCache: positions and masks are explicit

    def __init__(self, parent: "StaticKVCache", k: torch.Tensor, v: torch.Tensor):
        self.parent = parent
        self.k = k
        self.v = v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` (B, H_kv, T, D) into slots `parent.index` (T,); return the full buffers
        (B, H_kv, max_seq_len, D). In-place `index_copy_` with a tensor index: one compiled graph
        serves every decode step."""
        index = self.parent.index
        self.k.index_copy_(2, index, k.to(self.k.dtype))
        self.v.index_copy_(2, index, v.to(self.v.dtype))
        return self.k, self.v

    def query_slots(self, t: int, device: torch.device | None = None) -> torch.Tensor:
        """(T,) cache slots of the next queries: the slots being written."""
        return self.parent.index


class StaticKVCache(_CacheBuffers):
    """Fixed-shape KV cache for compiled decoding (`torch.compile` / CUDA graphs).

    Unlike `KVCache`, attention always runs over all `max_seq_len` slots, and nothing about the
    fill level lives on the host: the caller (the generation loop) owns it as tensors.

    - `index` (T,) long tensor: the slots the next forward writes (set it, or `index.copy_(...)`
      in place for a compiled step, before each forward);
    - the model must get explicit `position_ids` and a 4-D bool mask (B, 1, T, max_seq_len) that
      hides the empty slots (`static_attention_mask`);
    - `pos` is always 0 and `advance` does nothing, so the model reads no host position.
    Buffers can be shared with a `KVCache` (`from_cache`).
    """

    pos = 0

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v
        self.n_layer = len(k)
        self.batch_size, self.n_kv_head, self.max_seq_len, self.head_dim = k[0].shape
        self.index = torch.zeros(1, dtype=torch.long, device=k[0].device)
        self._layers = [StaticLayerKVCache(self, k[i], v[i]) for i in range(self.n_layer)]

    @classmethod
    def from_cache(cls, cache: KVCache) -> "StaticKVCache":
        """A static view of a `KVCache`'s preallocated buffers (e.g. from `model.make_kv_cache`)."""
        return cls(cache.k, cache.v)

    def layer(self, i: int) -> StaticLayerKVCache:
        return self._layers[i]

    def advance(self, n: int) -> None:
        """Nothing to do: the caller moves `index`."""

    def __repr__(self) -> str:
        return (f"StaticKVCache(n_layer={self.n_layer}, batch_size={self.batch_size}, "
                f"max_seq_len={self.max_seq_len}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, "
                f"dtype={self.dtype})")


def static_attention_mask(slot_mask: torch.Tensor, start: int, q_len: int) -> torch.Tensor:
    """4-D bool mask (B, 1, q_len, L) for queries in slots [start, start + q_len) of a static cache.

    `slot_mask` (B, L): 1 = a real token is (or will be, for these queries) in that slot. Query `i`
    sees real slots <= its own; a query with nothing to see (left padding) falls back to plain
    causal attention over its slots, as `make_attention_mask` does, so results match the dynamic
    cache. Empty slots past the queries are never seen.
    """
    b, length = slot_mask.shape
    q = torch.arange(start, start + q_len, device=slot_mask.device)
    k = torch.arange(length, device=slot_mask.device)
    causal = (k[None, :] <= q[:, None])[None, None]  # (1, 1, Tq, L)
    mask = causal & slot_mask.bool()[:, None, None, :]
    empty = ~mask.any(dim=-1, keepdim=True)
    return torch.where(empty, causal, mask)

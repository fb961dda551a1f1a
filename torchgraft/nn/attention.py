"""Multi-head attention on `F.scaled_dot_product_attention`.

Causal or bidirectional; padding masks; MHA / GQA / MQA via `n_kv_head`; an optional rotary
module (RoPE); KV cache.
State-dict names: `q_proj`, `k_proj`, `v_proj`, `o_proj` (each an `nn.Linear`), plus a
non-persistent `rotary.inv_freq` buffer when a rotary module is given.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.nn.kv_cache import LayerKVCache
from torchgraft.nn.linear import Linear
from torchgraft.nn.rope import RotaryEmbedding, apply_rope


def make_attention_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, causal: bool,
                        device: torch.device | None = None) -> tuple[torch.Tensor | None, bool]:
    """Turn a padding mask into what SDPA takes.

    `attention_mask`: None, a (B, kv_len) padding mask (1/True = attend, 0/False = padding), or an
    already prepared 4-D mask (bool, True = attend; or float, added to the scores), passed through.
    Queries are the last `q_len` of the `kv_len` positions (a KV cache holds the first ones).
    Returns `(mask, is_causal)`: `mask` is None or a bool (B|1, 1, q_len, kv_len) tensor.
    Rows with nothing to attend to (a left-padding query in causal mode) fall back to the plain
    causal row (full row when bidirectional) so outputs stay finite and do not depend on how the
    sequence was chunked through a KV cache; real tokens never see padding.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask, False
    if attention_mask is None:
        if not causal or q_len == 1:
            return None, False
        if q_len == kv_len:
            return None, True
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask must be (batch, {kv_len}) (all positions so far, cache "
                             f"included), got {tuple(attention_mask.shape)}")
        device = attention_mask.device
    causal_mask = None
    if causal:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
        k_pos = torch.arange(kv_len, device=device)
        causal_mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Tq, Tk)
    if attention_mask is None:
        return causal_mask, False
    pad = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
    mask = pad.expand(-1, -1, q_len, -1) if causal_mask is None else causal_mask & pad
    empty = ~mask.any(dim=-1, keepdim=True)
    # a query with nothing to attend to (left padding) falls back to plain causal (or full) attention
    fallback = causal_mask if causal_mask is not None else torch.ones_like(mask)
    mask = torch.where(empty, fallback, mask)
    return mask, False


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D); kv head j serves query heads j*n_rep ... (j+1)*n_rep-1."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class Attention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: model width C.
        n_head: query heads.
        n_kv_head: key/value heads (None = n_head: MHA; 1: MQA; else GQA, must divide n_head).
        head_dim: per-head width (default dim // n_head).
        causal: causal (decoder) or bidirectional (encoder) attention.
        bias: biases on q/k/v projections; `out_bias` for o_proj (default: same as `bias`).
        dropout: attention-probability dropout (training only).
        rotary: optional `RotaryEmbedding` applied to q and k (a decoder shares one across layers
            and may pass its precomputed `rope=(cos, sin)` to `forward`).
    """

    output_projection = "o_proj"  # the layer writing into the residual stream

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, head_dim: int | None = None,
                 causal: bool = True, bias: bool = True, out_bias: bool | None = None,
                 dropout: float = 0.0, rotary: RotaryEmbedding | None = None):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        if head_dim is None:
            if dim % n_head:
                raise ValueError(f"dim ({dim}) must be divisible by n_head ({n_head})")
            head_dim = dim // n_head
        self.dim, self.n_head, self.n_kv_head, self.head_dim = dim, n_head, n_kv_head, head_dim
        self.causal = causal
        self.dropout = dropout
        self.q_proj = Linear(dim, n_head * head_dim, bias=bias)
        self.k_proj = Linear(dim, n_kv_head * head_dim, bias=bias)
        self.v_proj = Linear(dim, n_kv_head * head_dim, bias=bias)
        self.o_proj = Linear(n_head * head_dim, dim, bias=bias if out_bias is None else out_bias)
        if rotary is not None and rotary.head_dim != head_dim:
            raise ValueError(f"rotary head_dim ({rotary.head_dim}) must equal the attention head_dim ({head_dim})")
        self.rotary = rotary

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: LayerKVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        `attention_mask`: (B, T_kv) padding mask over all positions (cache included) or a 4-D mask
        from `make_attention_mask`. `position_ids` (B, T) for RoPE (default: arange from the cache
        position). `rope`: precomputed `(cos, sin)` (B, T, head_dim), overrides `position_ids`.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        offset = kv_cache.pos if kv_cache is not None else 0
        if rope is None and self.rotary is not None:
            if position_ids is None:
                position_ids = torch.arange(offset, offset + t, device=x.device)[None]
            rope = self.rotary(position_ids)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        kv_len = k.shape[2]
        mask, is_causal = make_attention_mask(attention_mask, t, kv_len, self.causal, x.device)
        rep = self.n_head // self.n_kv_head
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.o_proj(y)

    def extra_repr(self) -> str:
        return (f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, "
                f"causal={self.causal}")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain softmax(q k^T / sqrt(d)) v with a bool mask (True = attend); for tests."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v

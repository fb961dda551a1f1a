"""Multi-head attention on `F.scaled_dot_product_attention`.

Causal or bidirectional; padding masks; MHA / GQA / MQA via `n_kv_head`; an optional rotary
module (RoPE); KV cache.
State-dict names: `q_proj`, `k_proj`, `v_proj`, `o_proj` (each an `nn.Linear`; `qkv_proj` instead
of the first three in `FusedQKVAttention`), optional `q_norm` / `k_norm`, plus a non-persistent
`rotary.inv_freq` buffer when a rotary module is given.

Options the families need are parameters or parts: q/k norms (Qwen3, Gemma 3, OLMo-2), a sliding
window (Mistral, Qwen2, Gemma), a score scale (Gemma's `query_pre_attn_scalar`) and tanh
soft-capping of the scores (Gemma 2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.nn.kv_cache import LayerKVCache
from torchgraft.nn.rope import RotaryEmbedding, apply_rope


def causal_mask(q_len: int, kv_len: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, 1, q_len, kv_len) bool, True = attend: the queries are the last q_len of kv_len positions."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    return (k_pos[None, :] <= q_pos[:, None])[None, None]


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
    causal_rows = causal_mask(q_len, kv_len, device) if causal else None
    if attention_mask is None:
        return causal_rows, False
    pad = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
    mask = pad.expand(-1, -1, q_len, -1) if causal_rows is None else causal_rows & pad
    empty = ~mask.any(dim=-1, keepdim=True)
    # a query with nothing to attend to (left padding) falls back to plain causal (or full) attention
    fallback = causal_rows if causal_rows is not None else torch.ones_like(mask)
    mask = torch.where(empty, fallback, mask)
    return mask, False


def sliding_window_mask(mask: torch.Tensor | None, is_causal: bool, q_slots: torch.Tensor, kv_len: int,
                        window: int) -> torch.Tensor:
    """`mask`, `is_causal` (from `make_attention_mask`) further limited to the last `window` key slots
    of each query: query slot i sees key slot j only when i - window < j (transformers' sliding
    window). `q_slots` (Tq,): the queries' cache slots. Every row keeps its own slot, so none is empty."""
    k_slots = torch.arange(kv_len, device=q_slots.device)
    band = (k_slots[None, :] > q_slots[:, None] - window)[None, None]  # (1, 1, Tq, Tk)
    if mask is None:
        return band & (k_slots[None, :] <= q_slots[:, None])[None, None] if is_causal else band
    return mask & band


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, softcap: float, dropout: float = 0.0) -> torch.Tensor:
    """softmax(cap * tanh(q k^T * scale / cap)) v (Gemma 2), softmax in float32; `mask` bool, True = attend."""
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        p = F.dropout(p, dropout)
    return p @ v


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
            and may pass its precomputed `rope=(cos, sin)` to `forward`); its width may be smaller
            than head_dim (partial rotary).
        q_norm, k_norm: optional norms applied to the q / k projections (B, T, heads * head_dim)
            before RoPE; a per-head norm is a `HeadNorm` (Qwen3, Gemma 3), a plain norm over the
            whole projection is OLMo-2's.
        sliding_window: attend only to the last `sliding_window` positions (None = all).
        scale: score scale (default 1/sqrt(head_dim)).
        softcap: tanh soft-capping of the scores, `cap * tanh(s / cap)` (Gemma 2); runs an eager
            softmax instead of SDPA.
    """

    output_projection = "o_proj"  # the layer writing into the residual stream

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, head_dim: int | None = None,
                 causal: bool = True, bias: bool = True, out_bias: bool | None = None,
                 dropout: float = 0.0, rotary: RotaryEmbedding | None = None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 sliding_window: int | None = None, scale: float | None = None, softcap: float | None = None):
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
        self.sliding_window = sliding_window
        self.scale = scale
        self.softcap = softcap
        self.make_qkv(dim, bias)
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.o_proj = nn.Linear(n_head * head_dim, dim, bias=bias if out_bias is None else out_bias)
        if rotary is not None and rotary.head_dim > head_dim:
            raise ValueError(f"rotary head_dim ({rotary.head_dim}) must not exceed the attention head_dim ({head_dim})")
        self.rotary = rotary

    def make_qkv(self, dim: int, bias: bool) -> None:
        """The input projections: separate `q_proj`, `k_proj`, `v_proj`."""
        self.q_proj = nn.Linear(dim, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_head * self.head_dim, bias=bias)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, T, H * D), k, v (B, T, H_kv * D)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: LayerKVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        `attention_mask`: (B, T_kv) padding mask over all positions (cache included) or a 4-D mask
        from `make_attention_mask`. `position_ids` (B, T) for RoPE (default: arange from the cache
        position). `rope`: precomputed `(cos, sin)` (B, T, head_dim), overrides `position_ids`.
        """
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)  # (B, T, H * D), (B, T, H_kv * D) x 2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
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
        if self.sliding_window is not None:
            slots = kv_cache.query_slots(t, x.device) if kv_cache is not None else \
                torch.arange(kv_len - t, kv_len, device=x.device)
            mask, is_causal = sliding_window_mask(mask, is_causal, slots, kv_len, self.sliding_window), False
        rep = self.n_head // self.n_kv_head
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        dropout = self.dropout if self.training else 0.0
        if self.softcap is not None:
            if mask is None and is_causal:
                mask = causal_mask(t, kv_len, x.device)
            scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)
            y = softcapped_attention(q, k, v, mask, scale, self.softcap, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=dropout, scale=self.scale)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.o_proj(y)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)}" for k in ("sliding_window", "scale", "softcap")
                        if getattr(self, k) is not None)
        return (f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, "
                f"causal={self.causal}{extra}")


class FusedQKVAttention(Attention):
    """`Attention` whose q, k, v come from one `qkv_proj` (Phi-3 / Phi-4 checkpoints and PEFT targets)."""

    def make_qkv(self, dim: int, bias: bool) -> None:
        self.qkv_proj = nn.Linear(dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=bias)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        return q, k, v


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain softmax(q k^T / sqrt(d)) v with a bool mask (True = attend); for tests."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v

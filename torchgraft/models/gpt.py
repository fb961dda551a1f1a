"""GPT-2 family (learned positions, LayerNorm, GELU-tanh MLP, tied embeddings) and the decoder-LM
core shared with the Llama family (`DecoderLM`).

State-dict names (docs/architecture.md): `tok_emb.weight`, `pos_emb.weight` (learned positions),
`blocks.{i}.attn_norm`, `blocks.{i}.attn.{q,k,v,o}_proj`, `blocks.{i}.mlp_norm`,
`blocks.{i}.mlp.{fc_in,fc_out}` or `blocks.{i}.mlp.{gate_proj,up_proj,down_proj}`, `norm`,
`lm_head.weight` (untied only; tied models use `tok_emb.weight` and have no `lm_head` key).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.models.registry import register_family, register_preset
from torchgraft.nn.attention import Attention, make_attention_mask
from torchgraft.nn.init import normal_init_
from torchgraft.nn.kv_cache import KVCache
from torchgraft.nn.mlp import MLP, GatedMLP
from torchgraft.nn.norm import make_norm
from torchgraft.nn.rope import RotaryEmbedding
from torchgraft.nn.transformer import PreNormBlock

RESIDUAL_PROJECTIONS = ("attn.o_proj.weight", "mlp.fc_out.weight", "mlp.down_proj.weight")


def _check_transformer_config(cfg) -> None:
    if cfg.n_embd <= 0 or cfg.n_layer < 0 or cfg.n_head <= 0 or cfg.vocab_size <= 0:
        raise ConfigError("model: n_embd, n_head and vocab_size must be positive, n_layer >= 0")
    if getattr(cfg, "head_dim", None) is None and cfg.n_embd % cfg.n_head:
        raise ConfigError(f"model.n_embd ({cfg.n_embd}) must be divisible by model.n_head ({cfg.n_head})")
    kv = cfg.n_kv_head or cfg.n_head
    if cfg.n_head % kv:
        raise ConfigError(f"model.n_head ({cfg.n_head}) must be a multiple of model.n_kv_head ({kv})")


class DecoderLM(nn.Module):
    """Decoder-only causal LM built from torchgraft.nn blocks (GPT-2 and Llama share it).

    `forward(input_ids (B, T), attention_mask=None, position_ids=None, kv_cache=None)
    -> logits (B, T, vocab_size)`.

    - `attention_mask` (B, T_kv): 1 = real token, 0 = padding, over every position so far (with a
      cache: cached positions + the new ones).
    - `position_ids` (B, T): default `arange(T)` offset by `kv_cache.pos`; pass them for
      left-padded batches (e.g. `(attention_mask.cumsum(-1) - 1).clamp(min=0)`).
    - `kv_cache`: from `make_kv_cache`; the new keys/values are written at `kv_cache.pos` and the
      cache advances by T.
    """

    positions: str = "learned"  # or "rope"
    norm_kind: str = "layer"  # or "rms"
    mlp_kind: str = "gelu"  # or "swiglu"

    def __init__(self, config):
        super().__init__()
        _check_transformer_config(config)
        self.config = config
        c = config
        C = c.n_embd
        self.n_kv_head = c.n_kv_head or c.n_head
        self.head_dim = getattr(c, "head_dim", None) or C // c.n_head
        hidden = c.intermediate_size or 4 * C
        self.tok_emb = nn.Embedding(c.vocab_size, C)
        self.pos_emb = nn.Embedding(c.block_size, C) if self.positions == "learned" else None
        self.rotary = None
        if self.positions == "rope":
            scaling = None
            if getattr(c, "rope_scaling", "none") == "llama3":
                scaling = dict(type="llama3", factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                               high_freq_factor=c.rope_high_freq_factor,
                               original_max_position_embeddings=c.rope_original_max_len)
            self.rotary = RotaryEmbedding(self.head_dim, c.rope_base, scaling=scaling)
        self.drop = nn.Dropout(c.dropout) if c.dropout else nn.Identity()
        blocks = []
        for _ in range(c.n_layer):
            attn = Attention(C, c.n_head, self.n_kv_head, head_dim=self.head_dim, causal=True,
                             bias=c.bias, dropout=c.dropout)
            if self.mlp_kind == "swiglu":
                mlp = GatedMLP(C, hidden, bias=c.bias, activation=c.activation)
            else:
                mlp = MLP(C, hidden, bias=c.bias, activation=c.activation, dropout=0.0)
            blocks.append(PreNormBlock(attn, mlp, make_norm(self.norm_kind, C, c.norm_eps, c.bias),
                                       make_norm(self.norm_kind, C, c.norm_eps, c.bias), dropout=c.dropout))
        self.blocks = nn.ModuleList(blocks)
        self.norm = make_norm(self.norm_kind, C, c.norm_eps, c.bias)
        self.lm_head = None if c.tie_embeddings else nn.Linear(C, c.vocab_size, bias=False)
        if not self.tok_emb.weight.is_meta:
            self.init_weights()

    # -- init ---------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) for Linear/Embedding weights, zero biases, unit norms; residual output
        projections (o_proj, fc_out, down_proj) get std / sqrt(2 * n_layer) (GPT-2)."""
        std = self.config.init_std
        normal_init_(self, std)
        for m in self.modules():
            if isinstance(m, RotaryEmbedding):
                m.reset_parameters()
        scaled = std / math.sqrt(2 * max(1, self.config.n_layer))
        for name, p in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, 0.0, scaled)

    # -- KV cache -----------------------------------------------------------------------------
    def make_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> KVCache:
        """Preallocate a `KVCache` for `batch_size` sequences of up to `max_seq_len` (default
        `block_size`) positions, in the model's dtype/device unless given."""
        w = self.tok_emb.weight
        max_seq_len = max_seq_len or self.config.block_size
        return KVCache(len(self.blocks), batch_size, max_seq_len, self.n_kv_head, self.head_dim,
                       dtype=dtype or w.dtype, device=device or w.device)

    # -- forward ------------------------------------------------------------------------------
    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None
                         ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C)."""
        b, t = input_ids.shape
        offset = kv_cache.pos if kv_cache is not None else 0
        if position_ids is None:
            if self.pos_emb is not None and offset + t > self.config.block_size:
                raise ValueError(f"sequence of {offset + t} tokens exceeds block_size {self.config.block_size}")
            position_ids = torch.arange(offset, offset + t, device=input_ids.device)[None].expand(b, t)
        else:
            position_ids = position_ids.long()
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        x = self.drop(x)
        rope = self.rotary(position_ids) if self.rotary is not None else None
        mask = attention_mask
        if attention_mask is not None:
            mask, _ = make_attention_mask(attention_mask, t, offset + t, True, input_ids.device)
        for i, block in enumerate(self.blocks):
            x = block(x, attention_mask=mask, position_ids=position_ids,
                      kv_cache=kv_cache.layer(i) if kv_cache is not None else None, rope=rope)
        if kv_cache is not None:
            kv_cache.advance(t)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.tok_emb.weight)
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, V); with `return_hidden=True` the final-norm hidden states (B, T, C) instead,
        for a loss that applies `output_embedding()` itself (chunked cross-entropy), while still
        going through `forward` (DDP / torch.compile wrappers see the call)."""
        hidden = self.forward_features(input_ids, attention_mask, position_ids, kv_cache)
        return hidden if return_hidden else self.logits(hidden)

    def output_embedding(self) -> torch.Tensor:
        """The (vocab, C) matrix that produces logits (tok_emb.weight when tied)."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head (MHA)
    n_embd: int = 768
    intermediate_size: int | None = None  # None = 4 * n_embd
    block_size: int = 1024
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    bias: bool = True
    dropout: float = 0.0
    activation: str = "gelu_tanh"  # GPT-2's "gelu_new"
    positions: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0  # used only with positions="rope"
    init_std: float = 0.02

    def __post_init__(self):
        _check_transformer_config(self)


class GPT(DecoderLM):
    """GPT-2: learned positions, LayerNorm, GELU (tanh) MLP, tied embeddings."""

    def __init__(self, config: GPTConfig):
        self.positions = config.positions
        super().__init__(config)


register_family("gpt", GPTConfig, GPT)
register_preset("gpt2", "gpt", description="GPT-2 small, 124M",
                n_layer=12, n_head=12, n_embd=768)
register_preset("gpt2-medium", "gpt", description="GPT-2 medium, 355M",
                n_layer=24, n_head=16, n_embd=1024)
register_preset("gpt2-large", "gpt", description="GPT-2 large, 774M",
                n_layer=36, n_head=20, n_embd=1280)
register_preset("gpt2-xl", "gpt", description="GPT-2 XL, 1.56B",
                n_layer=48, n_head=25, n_embd=1600)
register_preset("gpt-tiny", "gpt", description="tiny GPT for tests (2 layers, 64 wide, vocab 256)",
                vocab_size=256, n_layer=2, n_head=4, n_embd=64, block_size=64)

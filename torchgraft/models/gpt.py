"""GPT-2 family (learned positions, LayerNorm, GELU-tanh MLP, tied embeddings) and the decoder-LM
core shared with the Llama family (`DecoderLM`).

State-dict names (docs/architecture.md): `tok_emb.weight`, `pos_emb.weight` (learned positions),
`blocks.{i}.attn_norm`, `blocks.{i}.attn.{q,k,v,o}_proj`, `blocks.{i}.mlp_norm`,
`blocks.{i}.mlp.{fc_in,fc_out}` or `blocks.{i}.mlp.{gate_proj,up_proj,down_proj}`, `norm`,
`lm_head.weight` (untied only; tied models use `tok_emb.weight` and have no `lm_head` key).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.models.parts import ModelParts, token_inputs
from torchgraft.models.registry import register_family, register_preset
from torchgraft.nn.attention import Attention, make_attention_mask
from torchgraft.nn.init import normal_init_
from torchgraft.nn.kv_cache import KVCache
from torchgraft.nn.linear import TiedLinear
from torchgraft.nn.mlp import MLP, GatedMLP
from torchgraft.nn.norm import LayerNorm, RMSNorm
from torchgraft.nn.rope import RotaryEmbedding
from torchgraft.nn.transformer import PreNormBlock



def _check_transformer_config(cfg, head_dim: int | None = None) -> None:
    if cfg.n_embd <= 0 or cfg.n_layer < 0 or cfg.n_head <= 0 or cfg.vocab_size <= 0:
        raise ConfigError("model: n_embd, n_head and vocab_size must be positive, n_layer >= 0")
    if head_dim is None and cfg.n_embd % cfg.n_head:
        raise ConfigError(f"model.n_embd ({cfg.n_embd}) must be divisible by model.n_head ({cfg.n_head})")
    kv = cfg.n_kv_head or cfg.n_head
    if cfg.n_head % kv:
        raise ConfigError(f"model.n_head ({cfg.n_head}) must be a multiple of model.n_kv_head ({kv})")


class DecoderLM(nn.Module):
    """Decoder-only causal LM assembled from the parts a family builder passes in (GPT-2, Llama).

    `forward(input_ids (B, T), attention_mask=None, position_ids=None, kv_cache=None)
    -> logits (B, T, vocab_size)`.

    - `attention_mask` (B, T_kv): 1 = real token, 0 = padding, over every position so far (with a
      cache: cached positions + the new ones).
    - `position_ids` (B, T): default `arange(T)` offset by `kv_cache.pos`; pass them for
      left-padded batches (e.g. `(attention_mask.cumsum(-1) - 1).clamp(min=0)`).
    - `kv_cache`: from `make_kv_cache`; the new keys/values are written at `kv_cache.pos` and the
      cache advances by T.

    Parts: `tok_emb`, optional learned `pos_emb`, optional `rotary` (shared with every block's
    attention; cos/sin are computed once per forward; None when each attention holds its own, e.g.
    Gemma 3's local/global bases or SmolLM3's NoPE layers), `blocks`, final `norm`, optional untied
    `lm_head` (None = tied to `tok_emb`). `embed_scale` multiplies the token embeddings (Gemma:
    sqrt(C)); `logit_softcap` caps the logits as `cap * tanh(logits / cap)` (Gemma 2). No part is
    chosen here: see `gpt()` / `llama()` and the other family builders.
    """

    def __init__(self, config, *, tok_emb: nn.Embedding, blocks: list[nn.Module], norm: nn.Module,
                 pos_emb: nn.Embedding | None = None, rotary: RotaryEmbedding | None = None,
                 lm_head: nn.Linear | None = None, dropout: float = 0.0, head_dim: int | None = None,
                 embed_scale: float = 1.0, logit_softcap: float | None = None):
        super().__init__()
        self.embed_scale = embed_scale
        self.logit_softcap = logit_softcap
        self.config = config
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = head_dim or config.n_embd // config.n_head
        self.tok_emb = tok_emb
        self.pos_emb = pos_emb
        self.rotary = rotary
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.lm_head = lm_head
        self.tied_head = TiedLinear() if lm_head is None else None  # logits = tied_head(h, tok_emb)
        if not self.tok_emb.weight.is_meta:
            self.init_weights()

    def parts(self) -> ModelParts:
        n = len(self.blocks)
        heads = ("lm_head",) if self.lm_head is not None else ()
        return ModelParts(
            blocks=tuple(f"blocks.{i}" for i in range(n)), input_layer="tok_emb",
            classifier=heads[0] if heads else None,
            position_embedding="pos_emb" if self.pos_emb is not None else None,
            residual_projections=tuple(f"blocks.{i}.{r}" for i, b in enumerate(self.blocks)
                                       for r in b.residual_projections()),
            example_inputs=self.example_inputs, vocab=("tok_emb", *heads))

    def example_inputs(self, batch_size: int = 1, seq_len: int | None = None) -> tuple[torch.Tensor]:
        """`(input_ids,)` (batch_size, seq_len or block_size)."""
        c = self.config
        return token_inputs(self, c.vocab_size, c.block_size, batch_size, seq_len)

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
        for name in self.parts().residual_projections:
            nn.init.normal_(self.get_submodule(name).get_parameter("weight"), 0.0, scaled)

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
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.embed_scale != 1.0:
            x = x * x.new_tensor(self.embed_scale)  # rounded to the activation dtype, as transformers
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
        """(B, T, C) -> (B, T, V), soft-capped when the family caps them."""
        out = self.tied_head(hidden, self.tok_emb) if self.lm_head is None else self.lm_head(hidden)
        if self.logit_softcap is not None:
            out = torch.tanh(out / self.logit_softcap) * self.logit_softcap
        return out

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


# -- component builders (torchtune style): each family picks its parts here, nothing is switched later
def decoder_attention(c, rotary: RotaryEmbedding | None = None, head_dim: int | None = None) -> Attention:
    """Causal (GQA) self-attention of a decoder config, with the shared rotary module if any."""
    return Attention(c.n_embd, c.n_head, c.n_kv_head or c.n_head, head_dim=head_dim,
                     causal=True, bias=c.bias, dropout=c.dropout, rotary=rotary)


def gelu_mlp(c) -> MLP:
    return MLP(c.n_embd, c.intermediate_size or 4 * c.n_embd, bias=c.bias, activation=c.activation)


def swiglu_mlp(c) -> GatedMLP:
    return GatedMLP(c.n_embd, c.intermediate_size or 4 * c.n_embd, bias=c.bias, activation=c.activation)


def layer_norm(c) -> LayerNorm:
    return LayerNorm(c.n_embd, c.norm_eps, c.bias)


def rms_norm(c) -> RMSNorm:
    return RMSNorm(c.n_embd, c.norm_eps)


def pre_norm_block(c, attn: nn.Module, mlp: nn.Module, norm: Callable[[Any], nn.Module]) -> PreNormBlock:
    """GPT-2 / Llama block: `x += attn(norm(x)); x += mlp(norm(x))`."""
    return PreNormBlock(attn, mlp, norm(c), norm(c), dropout=c.dropout)


BlockBuilder = Callable[[Any, nn.Module, nn.Module, Callable[[Any], nn.Module]], nn.Module]


def decoder_lm(cls: type[DecoderLM], c, *, mlp: Callable[[Any], nn.Module], norm: Callable[[Any], nn.Module],
               rotary: RotaryEmbedding | None, learned_positions: bool, head_dim: int | None = None,
               attention: Callable[[Any, int], nn.Module] | None = None, block: BlockBuilder = pre_norm_block,
               embed_scale: float = 1.0, logit_softcap: float | None = None,
               layer_mlp: Callable[[Any, int], nn.Module] | None = None) -> DecoderLM:
    """Assemble `cls` from a config and the chosen parts: `n_layer` blocks `block(c, attention(c, i),
    layer_mlp(c, i), norm)` (default: pre-norm, `decoder_attention(c, rotary, head_dim)` and `mlp(c)`
    in every layer), then a final `norm(c)`."""
    _check_transformer_config(c, head_dim)
    if attention is None:
        def attention(c, i: int) -> nn.Module:
            return decoder_attention(c, rotary, head_dim)
    if layer_mlp is None:
        def layer_mlp(c, i: int) -> nn.Module:
            return mlp(c)
    blocks = [block(c, attention(c, i), layer_mlp(c, i), norm) for i in range(c.n_layer)]
    return cls(c, tok_emb=nn.Embedding(c.vocab_size, c.n_embd), blocks=blocks, norm=norm(c),
               pos_emb=nn.Embedding(c.block_size, c.n_embd) if learned_positions else None, rotary=rotary,
               lm_head=None if c.tie_embeddings else nn.Linear(c.n_embd, c.vocab_size, bias=False),
               dropout=c.dropout, head_dim=head_dim, embed_scale=embed_scale, logit_softcap=logit_softcap)


class GPT(DecoderLM):
    """GPT-2: learned positions (or RoPE with `positions="rope"`), LayerNorm, GELU (tanh) MLP, tied embeddings."""


def gpt(config: GPTConfig) -> GPT:
    """Builder of the "gpt" family."""
    rope = config.positions == "rope"
    rotary = RotaryEmbedding(config.n_embd // config.n_head, config.rope_base) if rope else None
    return decoder_lm(GPT, config, mlp=gelu_mlp, norm=layer_norm, rotary=rotary, learned_positions=not rope)


register_family("gpt", GPTConfig, gpt)
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

"""Gemma 2 and Gemma 3 (text) families.

What differs from Llama: RMSNorm as `x / rms(x) * (1 + w)` in float32 (`OffsetRMSNorm`), token
embeddings scaled by sqrt(C), GeGLU (tanh GELU) MLP, four norms per block (before and after each
sublayer, `SandwichBlock`), scores scaled by `query_pre_attn_scalar ** -0.5`, local (sliding) and
global layers from `layer_types`, tied embeddings.
- Gemma 2: tanh soft-capping of the attention scores and of the final logits.
- Gemma 3: per-head q/k norm, and a separate RoPE base for the local layers (`rope_local_base`,
  unscaled) and the global ones (`rope_base` with `rope_scaling`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from torchgraft.models.decoder import (
    DecoderConfig,
    LayerType,
    RopeScalingConfig,
    attention,
    gated_mlp,
    head_rms_norm,
    rotary,
    sandwich_block,
)
from torchgraft.models.gpt import DecoderLM, decoder_lm
from torchgraft.models.registry import register_family, register_preset
from torchgraft.nn.norm import OffsetRMSNorm


@dataclass
class Gemma2Config(DecoderConfig):
    vocab_size: int = 256000
    n_embd: int = 2304
    intermediate_size: int = 9216
    n_layer: int = 26
    n_head: int = 8
    n_kv_head: int | None = 4
    head_dim: int | None = 256
    block_size: int = 8192
    tie_embeddings: bool = True
    activation: str = "gelu_tanh"
    sliding_window: int | None = 4096
    layer_types: list[LayerType] | None = None  # None = alternating, local first
    query_pre_attn_scalar: float = 256.0
    attn_softcap: float | None = 50.0
    logit_softcap: float | None = 30.0

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.n_layer)]
        super().__post_init__()


@dataclass
class Gemma3Config(Gemma2Config):
    vocab_size: int = 262144
    n_embd: int = 1152
    intermediate_size: int = 6912
    n_layer: int = 26
    n_head: int = 4
    n_kv_head: int | None = 1
    block_size: int = 32768
    sliding_window: int | None = 512
    layer_types: list[LayerType] | None = None  # None = five local layers, then one global
    rope_base: float = 1_000_000.0  # global layers
    rope_local_base: float = 10_000.0
    attn_softcap: float | None = None
    logit_softcap: float | None = None

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                for i in range(self.n_layer)]
        super().__post_init__()


class Gemma2(DecoderLM):
    """Gemma 2: sandwich norms, GeGLU, soft-capped scores and logits, local/global layers."""


class Gemma3(DecoderLM):
    """Gemma 3 (text): sandwich norms, GeGLU, q/k norm, local/global layers with two RoPE bases."""


def gemma_norm(c: Gemma2Config) -> OffsetRMSNorm:
    return OffsetRMSNorm(c.n_embd, c.norm_eps)


def gemma2(c: Gemma2Config) -> Gemma2:
    rope = rotary(c)
    scale = c.query_pre_attn_scalar ** -0.5
    return decoder_lm(Gemma2, c, mlp=gated_mlp, norm=gemma_norm, rotary=rope, learned_positions=False,
                      head_dim=c.head_dim, block=sandwich_block, embed_scale=math.sqrt(c.n_embd),
                      logit_softcap=c.logit_softcap,
                      attention=lambda c, i: attention(c, i, rope=rope, scale=scale, softcap=c.attn_softcap))


def gemma3(c: Gemma3Config) -> Gemma3:
    local = rotary(c, base=c.rope_local_base, scaling=RopeScalingConfig())
    global_ = rotary(c)
    scale = c.query_pre_attn_scalar ** -0.5

    def qk_norm(_width: int) -> nn.Module:
        return head_rms_norm(c, OffsetRMSNorm)

    def layer_attention(c: Gemma3Config, i: int) -> nn.Module:
        rope = local if c.layer_types[i] == "sliding_attention" else global_
        return attention(c, i, rope=rope, scale=scale, softcap=c.attn_softcap, qk_norm=qk_norm)

    # each attention holds its layer's rotary module (two bases), so the model shares none
    return decoder_lm(Gemma3, c, mlp=gated_mlp, norm=gemma_norm, rotary=None, learned_positions=False,
                      head_dim=c.head_dim, block=sandwich_block, embed_scale=math.sqrt(c.n_embd),
                      logit_softcap=c.logit_softcap, attention=layer_attention)


register_family("gemma2", Gemma2Config, gemma2)
register_family("gemma3", Gemma3Config, gemma3)
register_preset("gemma2-2b", "gemma2", description="Gemma 2 2B (GQA 8/4, head_dim 256)")
register_preset("gemma2-9b", "gemma2", description="Gemma 2 9B (GQA 16/8, head_dim 256)",
                n_embd=3584, intermediate_size=14336, n_layer=42, n_head=16, n_kv_head=8)
register_preset("gemma3-1b", "gemma3", description="Gemma 3 1B (MQA, window 512, 5 local : 1 global)")
register_preset("gemma3-4b", "gemma3", description="Gemma 3 4B, text part (GQA 8/4, window 1024, "
                "global RoPE linear x8)",
                vocab_size=262208, n_embd=2560, intermediate_size=10240, n_layer=34, n_head=8, n_kv_head=4,
                block_size=131072, sliding_window=1024, rope_scaling={"type": "linear", "factor": 8.0})

"""Qwen2 / Qwen2.5 and Qwen3 families: Llama-shaped decoders built by `decoder_lm`.

- Qwen2 / Qwen2.5: biases on q/k/v (none on o_proj), RoPE base 1e6, optional sliding window on
  the layers `layer_types` marks, tied embeddings at the small sizes.
- Qwen3: no biases, per-head RMSNorm on q and k (over head_dim, before RoPE), head_dim 128.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from torchgraft.models.decoder import DecoderConfig, attention, gated_mlp, head_rms_norm, rotary
from torchgraft.models.gpt import DecoderLM, decoder_lm, rms_norm
from torchgraft.models.registry import register_family, register_preset


@dataclass
class Qwen2Config(DecoderConfig):
    vocab_size: int = 151936
    n_embd: int = 896
    intermediate_size: int = 4864
    n_layer: int = 24
    n_head: int = 14
    n_kv_head: int | None = 2
    block_size: int = 32768
    rope_base: float = 1_000_000.0
    tie_embeddings: bool = True
    bias: bool = True  # q/k/v; o_proj never has one


@dataclass
class Qwen3Config(DecoderConfig):
    vocab_size: int = 151936
    n_embd: int = 1024
    intermediate_size: int = 3072
    n_layer: int = 28
    n_head: int = 16
    n_kv_head: int | None = 8
    head_dim: int | None = 128
    block_size: int = 40960
    rope_base: float = 1_000_000.0
    tie_embeddings: bool = True


class Qwen2(DecoderLM):
    """Qwen2 / Qwen2.5: Llama with q/k/v biases."""


class Qwen3(DecoderLM):
    """Qwen3: Llama with per-head q/k RMSNorm."""


def qwen2(c: Qwen2Config) -> Qwen2:
    rope = rotary(c)
    return decoder_lm(Qwen2, c, mlp=gated_mlp, norm=rms_norm, rotary=rope, learned_positions=False,
                      head_dim=c.head_dim, attention=lambda c, i: attention(c, i, rope=rope, out_bias=False))


def qwen3(c: Qwen3Config) -> Qwen3:
    rope = rotary(c)
    def qk_norm(_width: int) -> nn.Module:  # per head, so the projection width does not matter
        return head_rms_norm(c)

    return decoder_lm(Qwen3, c, mlp=gated_mlp, norm=rms_norm, rotary=rope, learned_positions=False,
                      head_dim=c.head_dim, attention=lambda c, i: attention(c, i, rope=rope, qk_norm=qk_norm))


register_family("qwen2", Qwen2Config, qwen2)
register_family("qwen3", Qwen3Config, qwen3)
register_preset("qwen2.5-0.5b", "qwen2", description="Qwen2.5 0.5B (GQA 14/2, tied)")
register_preset("qwen2.5-1.5b", "qwen2", description="Qwen2.5 1.5B (GQA 12/2, tied)",
                n_embd=1536, intermediate_size=8960, n_layer=28, n_head=12, n_kv_head=2)
register_preset("qwen2.5-7b", "qwen2", description="Qwen2.5 7B (GQA 28/4)",
                vocab_size=152064, n_embd=3584, intermediate_size=18944, n_layer=28, n_head=28, n_kv_head=4,
                tie_embeddings=False)
register_preset("qwen3-0.6b", "qwen3", description="Qwen3 0.6B (GQA 16/8, head_dim 128, tied)")
register_preset("qwen3-1.7b", "qwen3", description="Qwen3 1.7B (GQA 16/8, tied)",
                n_embd=2048, intermediate_size=6144, n_layer=28, n_head=16, n_kv_head=8)
register_preset("qwen3-8b", "qwen3", description="Qwen3 8B (GQA 32/8)",
                n_embd=4096, intermediate_size=12288, n_layer=36, n_head=32, n_kv_head=8, tie_embeddings=False)

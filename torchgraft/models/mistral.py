"""Mistral family (v0.1): Llama with a sliding attention window on every layer."""
from __future__ import annotations

from dataclasses import dataclass

from torchgraft.models.decoder import DecoderConfig, attention, gated_mlp, rotary
from torchgraft.models.gpt import DecoderLM, decoder_lm, rms_norm
from torchgraft.models.registry import register_family, register_preset


@dataclass
class MistralConfig(DecoderConfig):
    vocab_size: int = 32000
    n_embd: int = 4096
    intermediate_size: int = 14336
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = 8
    block_size: int = 32768
    norm_eps: float = 1e-5
    sliding_window: int | None = 4096


class Mistral(DecoderLM):
    """Mistral: RoPE, RMSNorm, SwiGLU, GQA, sliding-window attention."""


def mistral(c: MistralConfig) -> Mistral:
    rope = rotary(c)
    return decoder_lm(Mistral, c, mlp=gated_mlp, norm=rms_norm, rotary=rope, learned_positions=False,
                      head_dim=c.head_dim, attention=lambda c, i: attention(c, i, rope=rope))


register_family("mistral", MistralConfig, mistral)
register_preset("mistral-7b", "mistral", description="Mistral 7B v0.1 (GQA 32/8, window 4096)")

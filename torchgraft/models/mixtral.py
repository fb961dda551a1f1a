"""Mixtral family: Mistral's decoder with a sparse mixture-of-experts MLP in every layer (8 SwiGLU
experts, the top 2 per token, their softmax weights renormalised to sum to 1; optionally a
train-time multiplicative noise on the block's input, `router_jitter`)."""
from __future__ import annotations

from dataclasses import dataclass

from torchgraft.models.decoder import DecoderConfig, attention, rotary
from torchgraft.models.gpt import DecoderLM, decoder_lm, rms_norm
from torchgraft.models.moe import check_moe_config, sparse_moe
from torchgraft.models.registry import register_family, register_preset


@dataclass
class MixtralConfig(DecoderConfig):
    vocab_size: int = 32000
    n_embd: int = 4096
    intermediate_size: int = 14336  # width of each expert
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = 8
    block_size: int = 32768
    norm_eps: float = 1e-5
    rope_base: float = 1_000_000.0
    n_experts: int = 8
    top_k: int = 2
    router_jitter: float = 0.0  # config.json's router_jitter_noise: train-time input noise of each MoE block

    def __post_init__(self):
        super().__post_init__()
        check_moe_config(self)


class Mixtral(DecoderLM):
    """Mixtral: Mistral with top-2-of-8 SwiGLU experts instead of the dense MLP."""


def mixtral(c: MixtralConfig) -> Mixtral:
    """Builder of the "mixtral" family."""
    rope = rotary(c)
    return decoder_lm(Mixtral, c, mlp=lambda c: sparse_moe(c, c.intermediate_size, renormalize=True,
                                                                      jitter=c.router_jitter),
                      norm=rms_norm, rotary=rope, learned_positions=False, head_dim=c.head_dim,
                      attention=lambda c, i: attention(c, i, rope=rope))


register_family("mixtral", MixtralConfig, mixtral)
register_preset("mixtral-8x7b", "mixtral", description="Mixtral 8x7B v0.1 (46.7B, 12.9B active; GQA 32/8)")
register_preset("mixtral-tiny", "mixtral", description="tiny Mixtral for tests (4 experts, top 2, 64 wide)",
                vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96,
                block_size=128, n_experts=4, top_k=2)

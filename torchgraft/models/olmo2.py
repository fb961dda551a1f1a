"""OLMo-2 family: Llama with the norms after each sublayer instead of before (`x += norm(attn(x))`,
no input norm) and RMSNorm of q and k over the whole projection (all heads together)."""
from __future__ import annotations

from dataclasses import dataclass

from torchgraft.models.decoder import DecoderConfig, attention, gated_mlp, post_norm_block, rotary
from torchgraft.models.gpt import DecoderLM, decoder_lm, rms_norm
from torchgraft.models.registry import register_family, register_preset
from torchgraft.nn.norm import RMSNorm


@dataclass
class Olmo2Config(DecoderConfig):
    vocab_size: int = 100352
    n_embd: int = 4096
    intermediate_size: int = 11008
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = 32
    block_size: int = 4096
    rope_base: float = 500_000.0


class Olmo2(DecoderLM):
    """OLMo-2: post-sublayer RMSNorm, q/k RMSNorm over the full projection."""


def olmo2(c: Olmo2Config) -> Olmo2:
    rope = rotary(c)

    def qk_norm(width: int) -> RMSNorm:
        return RMSNorm(width, c.norm_eps)

    return decoder_lm(Olmo2, c, mlp=gated_mlp, norm=rms_norm, rotary=rope, learned_positions=False,
                      head_dim=c.head_dim, block=post_norm_block,
                      attention=lambda c, i: attention(c, i, rope=rope, qk_norm=qk_norm))


register_family("olmo2", Olmo2Config, olmo2)
register_preset("olmo2-7b", "olmo2", description="OLMo-2 7B (1124)")
register_preset("olmo2-13b", "olmo2", description="OLMo-2 13B (1124)",
                n_embd=5120, intermediate_size=13824, n_layer=40, n_head=40, n_kv_head=40)

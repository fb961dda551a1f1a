"""Phi-3 / Phi-4 (mini) family: Llama with fused `qkv_proj` and `gate_up_proj` (kept fused, so
checkpoints, LoRA targets and PEFT adapter files use Phi-3's own module names) and partial rotary
(`partial_rotary_factor` of each head rotates; Phi-4-mini: 0.75), LongRoPE at the long-context sizes."""
from __future__ import annotations

from dataclasses import dataclass

from torchgraft.models.decoder import DecoderConfig, attention, rotary
from torchgraft.models.gpt import DecoderLM, decoder_lm, rms_norm
from torchgraft.models.registry import register_family, register_preset
from torchgraft.nn.attention import FusedQKVAttention
from torchgraft.nn.mlp import FusedGatedMLP


@dataclass
class Phi3Config(DecoderConfig):
    vocab_size: int = 32064
    n_embd: int = 3072
    intermediate_size: int = 8192
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = 32
    block_size: int = 4096
    norm_eps: float = 1e-5
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        half = int(self.attn_head_dim * self.partial_rotary_factor) // 2
        rs = self.rope_scaling
        for name in ("short_factor", "long_factor"):
            factors = getattr(rs, name)
            if rs.type == "longrope" and len(factors or ()) != half:
                from torchgraft.errors import ConfigError

                raise ConfigError(f"model.rope_scaling.{name} has {len(factors or ())} entries; LongRoPE needs "
                                  f"one per rotated frequency ({half} = head_dim * partial_rotary_factor / 2)")


class Phi3(DecoderLM):
    """Phi-3 / Phi-4-mini: fused projections, (partial) RoPE, RMSNorm, SwiGLU."""


def fused_swiglu_mlp(c: Phi3Config) -> FusedGatedMLP:
    return FusedGatedMLP(c.n_embd, c.intermediate_size, bias=False, activation=c.activation)


def phi3(c: Phi3Config) -> Phi3:
    rope = rotary(c, rotary_dim=int(c.attn_head_dim * c.partial_rotary_factor))
    return decoder_lm(Phi3, c, mlp=fused_swiglu_mlp, norm=rms_norm, rotary=rope, learned_positions=False,
                      head_dim=c.head_dim, attention=lambda c, i: attention(c, i, rope=rope, cls=FusedQKVAttention))


register_family("phi3", Phi3Config, phi3)
register_preset("phi-3-mini", "phi3", description="Phi-3 mini 4k (3.8B, MHA 32)", sliding_window=2047)
# LongRoPE factors of microsoft/Phi-4-mini-instruct (48 = rotary_dim / 2 per list)
_PHI4_MINI_SHORT = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
register_preset("phi-4-mini", "phi3", description="Phi-4-mini (3.8B, GQA 24/8, tied, partial rotary 0.75, "
                "LongRoPE to 128k)",
                vocab_size=200064, n_embd=3072, intermediate_size=8192, n_layer=32, n_head=24, n_kv_head=8,
                tie_embeddings=True, partial_rotary_factor=0.75, block_size=131072, sliding_window=262144,
                rope_scaling={"type": "longrope", "original_max_position_embeddings": 4096,
                              "short_factor": _PHI4_MINI_SHORT, "long_factor": _PHI4_MINI_SHORT})

"""Llama family (built by `llama(config)` from `gpt.decoder_lm`): RoPE (rotate-half, as HF LlamaModel), RMSNorm, SwiGLU, GQA, no biases, untied lm_head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torchgraft.models.decoder import RopeScalingConfig
from torchgraft.models.gpt import DecoderLM, _check_transformer_config, decoder_lm, rms_norm, swiglu_mlp
from torchgraft.models.registry import register_family, register_preset
from torchgraft.nn.rope import RotaryEmbedding


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None = n_head (MHA); 8 for Llama-3 (GQA)
    n_embd: int = 4096
    intermediate_size: int = 11008
    block_size: int = 4096  # default KV-cache length; RoPE itself has no table limit
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    bias: bool = False
    dropout: float = 0.0
    activation: str = "silu"  # SwiGLU
    head_dim: int | None = None  # None = n_embd // n_head
    init_std: float = 0.02
    # RoPE frequency scaling (HF rope_type): "llama3" (Llama 3.1+), "linear", "dynamic" (NTK, from
    # block_size), "yarn" (default betas); "none" = plain RoPE. rope_factor is every scaling's factor
    rope_scaling: Literal["none", "llama3", "linear", "dynamic", "yarn"] = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    def __post_init__(self):
        _check_transformer_config(self, self.head_dim)


class Llama(DecoderLM):
    """Llama: RoPE (optionally Llama-3.1 scaled), RMSNorm, SwiGLU, GQA, untied head."""


def llama_rotary(c: LlamaConfig) -> RotaryEmbedding:
    """The one RoPE module of a Llama config (rotate-half; frequency scaling if asked)."""
    kind = "default" if c.rope_scaling == "none" else c.rope_scaling
    scaling = RopeScalingConfig(type=kind, factor=c.rope_factor, original_max_position_embeddings=c.rope_original_max_len,
                                low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor)
    return RotaryEmbedding(c.head_dim or c.n_embd // c.n_head, c.rope_base, scaling=scaling.scaling(c.block_size))


def llama(config: LlamaConfig) -> Llama:
    """Builder of the "llama" family."""
    return decoder_lm(Llama, config, mlp=swiglu_mlp, norm=rms_norm, rotary=llama_rotary(config),
                      learned_positions=False, head_dim=config.head_dim)


register_family("llama", LlamaConfig, llama)
register_preset("llama-tiny", "llama", description="tiny Llama for tests (GQA 4/2, 64 wide)",
                vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160,
                block_size=128)
register_preset("llama2-7b", "llama", description="Llama-2 7B",
                vocab_size=32000, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008,
                block_size=4096, norm_eps=1e-5, rope_base=10000.0)
register_preset("llama3-8b", "llama", description="Llama-3 8B (GQA 32/8)",
                vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                intermediate_size=14336, block_size=8192, norm_eps=1e-5, rope_base=500000.0)
register_preset("llama3.2-1b", "llama", description="Llama-3.2 1B (GQA 32/8, tied, llama3 RoPE scaling)",
                vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                intermediate_size=8192, block_size=131072, norm_eps=1e-5, rope_base=500000.0,
                tie_embeddings=True, rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
                rope_high_freq_factor=4.0, rope_original_max_len=8192)
register_preset("llama3-70b", "llama", description="Llama-3 70B (GQA 64/8)",
                vocab_size=128256, n_layer=80, n_head=64, n_kv_head=8, n_embd=8192,
                intermediate_size=28672, block_size=8192, norm_eps=1e-5, rope_base=500000.0)

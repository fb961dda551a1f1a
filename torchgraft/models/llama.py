"""Llama family: RoPE (rotate-half, as HF LlamaModel), RMSNorm, SwiGLU, GQA, no biases, untied lm_head."""
from __future__ import annotations

from dataclasses import dataclass

from torchgraft.models.gpt import DecoderLM, _check_transformer_config
from torchgraft.models.registry import register_family, register_preset


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

    def __post_init__(self):
        _check_transformer_config(self)


class Llama(DecoderLM):
    positions = "rope"
    norm_kind = "rms"
    mlp_kind = "swiglu"


register_family("llama", LlamaConfig, Llama)
register_preset("llama-tiny", "llama", description="tiny Llama for tests (GQA 4/2, 64 wide)",
                vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160,
                block_size=128)
register_preset("llama2-7b", "llama", description="Llama-2 7B",
                vocab_size=32000, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008,
                block_size=4096, norm_eps=1e-5, rope_base=10000.0)
register_preset("llama3-8b", "llama", description="Llama-3 8B (GQA 32/8)",
                vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                intermediate_size=14336, block_size=8192, norm_eps=1e-5, rope_base=500000.0)
register_preset("llama3-70b", "llama", description="Llama-3 70B (GQA 64/8)",
                vocab_size=128256, n_layer=80, n_head=64, n_kv_head=8, n_embd=8192,
                intermediate_size=28672, block_size=8192, norm_eps=1e-5, rope_base=500000.0)

"""What the Llama-shaped families (Qwen2/3, Mistral, Gemma 2/3, Phi-3, OLMo-2, SmolLM3) share: the
config fields (`DecoderConfig`, `RopeScalingConfig`) and the part builders their `decoder_lm` calls
pass in. A family file subclasses the config with its own fields and picks parts; nothing here
checks which family it is building.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from torchgraft.models.gpt import _check_transformer_config
from torchgraft.nn.attention import Attention
from torchgraft.nn.mlp import GatedMLP
from torchgraft.nn.norm import HeadNorm, RMSNorm
from torchgraft.nn.rope import RotaryEmbedding
from torchgraft.nn.rope_scaling import (
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    LongRopeScaling,
    RopeScaling,
    YarnScaling,
)
from torchgraft.nn.transformer import SandwichBlock

LayerType = Literal["full_attention", "sliding_attention"]


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling, as transformers' `rope_parameters` (`rope_type` and its fields)."""
    type: Literal["default", "linear", "dynamic", "llama3", "yarn", "longrope"] = "default"
    factor: float | None = None  # None: 1 (linear, dynamic, llama3), block_size / original (yarn, longrope)
    original_max_position_embeddings: int | None = None  # None = the model's block_size
    low_freq_factor: float = 1.0    # llama3
    high_freq_factor: float = 4.0   # llama3
    beta_fast: float = 32.0         # yarn
    beta_slow: float = 1.0          # yarn
    mscale: float | None = None     # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True           # yarn
    attention_factor: float | None = None  # yarn / longrope; None = derived from factor
    short_factor: list[float] | None = None  # longrope
    long_factor: list[float] | None = None   # longrope

    def scaling(self, max_positions: int) -> RopeScaling:
        """The `RopeScaling` object the rotary module delegates to."""
        orig = self.original_max_position_embeddings or max_positions
        factor = self.factor if self.factor is not None else 1.0
        if self.type == "linear":
            return LinearScaling(factor)
        if self.type == "dynamic":
            return DynamicNTKScaling(factor, max_positions)
        if self.type == "llama3":
            return Llama3Scaling(factor, self.low_freq_factor, self.high_freq_factor, orig)
        long_factor = self.factor if self.factor is not None else max_positions / orig
        if self.type == "yarn":
            return YarnScaling(long_factor, orig, self.beta_fast, self.beta_slow, self.mscale,
                               self.mscale_all_dim, self.attention_factor, self.truncate)
        if self.type == "longrope":
            return LongRopeScaling(tuple(self.short_factor or ()), tuple(self.long_factor or ()), orig,
                                   long_factor, self.attention_factor)
        return RopeScaling()


@dataclass
class DecoderConfig:
    """Fields of a Llama-shaped decoder; families subclass it with their defaults and extras."""
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None = n_head (MHA)
    n_embd: int = 4096
    intermediate_size: int = 11008
    block_size: int = 4096  # max positions (KV-cache default, RoPE scaling reference)
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    tie_embeddings: bool = False
    bias: bool = False  # q/k/v projection biases
    dropout: float = 0.0
    activation: str = "silu"
    head_dim: int | None = None  # None = n_embd // n_head
    init_std: float = 0.02
    sliding_window: int | None = None  # None = full attention everywhere
    # per layer, as transformers: "sliding_attention" layers use sliding_window; None = all sliding
    # when sliding_window is set (Mistral), else all full
    layer_types: list[LayerType] | None = None

    per_layer_fields = ("layer_types",)  # one entry per block (`grow` extends them with the blocks)

    def __post_init__(self):
        _check_transformer_config(self, self.head_dim)
        if self.layer_types is not None and len(self.layer_types) != self.n_layer:
            from torchgraft.errors import ConfigError

            raise ConfigError(f"model.layer_types has {len(self.layer_types)} entries; model.n_layer is "
                              f"{self.n_layer}: give one per layer")

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    def window(self, i: int) -> int | None:
        """The sliding window of layer `i` (None = full attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None


# -- part builders -----------------------------------------------------------------------------

def rotary(c: DecoderConfig, base: float | None = None, scaling: RopeScalingConfig | None = None,
           rotary_dim: int | None = None) -> RotaryEmbedding:
    """A RoPE module for `c` (its base and scaling unless given; `rotary_dim` < head_dim = partial)."""
    return RotaryEmbedding(rotary_dim or c.attn_head_dim, c.rope_base if base is None else base,
                           scaling=(scaling or c.rope_scaling).scaling(c.block_size))


def head_rms_norm(c: DecoderConfig, norm: Callable[[int, float], nn.Module] = RMSNorm) -> HeadNorm:
    """A per-head q/k norm over head_dim (Qwen3; Gemma 3 passes its offset norm)."""
    return HeadNorm(norm(c.attn_head_dim, c.norm_eps), c.attn_head_dim)


def attention(c: DecoderConfig, i: int, *, rope: RotaryEmbedding | None = None, cls: type[Attention] = Attention,
              out_bias: bool | None = None, qk_norm: Callable[[int], nn.Module] | None = None,
              scale: float | None = None, softcap: float | None = None) -> Attention:
    """Causal GQA attention of layer `i`: its sliding window from `c.window(i)`, the rest as given.
    `qk_norm(width)` builds the q and k norms for a projection of that width."""
    hd = c.attn_head_dim
    kv = c.n_kv_head or c.n_head
    return cls(c.n_embd, c.n_head, kv, head_dim=hd, causal=True, bias=c.bias, out_bias=out_bias,
               dropout=c.dropout, rotary=rope, sliding_window=c.window(i), scale=scale, softcap=softcap,
               q_norm=qk_norm(c.n_head * hd) if qk_norm else None,
               k_norm=qk_norm(kv * hd) if qk_norm else None)


def gated_mlp(c: DecoderConfig) -> GatedMLP:
    """SwiGLU (GeGLU with activation "gelu_tanh") without biases: `c.bias` is for q/k/v only."""
    return GatedMLP(c.n_embd, c.intermediate_size, bias=False, activation=c.activation)


def sandwich_block(c: Any, attn: nn.Module, mlp: nn.Module, norm: Callable[[Any], nn.Module]) -> SandwichBlock:
    """Gemma 2/3: a norm before and after each sublayer (four per block)."""
    return SandwichBlock(attn, mlp, norm(c), norm(c), norm(c), norm(c), dropout=c.dropout)


def post_norm_block(c: Any, attn: nn.Module, mlp: nn.Module, norm: Callable[[Any], nn.Module]) -> SandwichBlock:
    """OLMo-2: a norm after each sublayer only, inside the residual (`x += norm(attn(x))`)."""
    return SandwichBlock(attn, mlp, nn.Identity(), nn.Identity(), norm(c), norm(c), dropout=c.dropout)

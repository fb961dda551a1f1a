"""SmolLM2 (presets of the `llama` family: the checkpoints are `LlamaForCausalLM`) and the SmolLM3
family: Llama with NoPE layers (every `no_rope_layer_interval`-th layer has no RoPE; transformers'
`no_rope_layers[i]` is 1 where layer i uses RoPE)."""
from __future__ import annotations

from dataclasses import dataclass

from torchgraft.models.decoder import DecoderConfig, attention, gated_mlp, rotary
from torchgraft.models.gpt import DecoderLM, decoder_lm, rms_norm
from torchgraft.models.registry import register_family, register_preset


@dataclass
class SmolLM3Config(DecoderConfig):
    vocab_size: int = 128256
    n_embd: int = 2048
    intermediate_size: int = 11008
    n_layer: int = 36
    n_head: int = 16
    n_kv_head: int | None = 4
    block_size: int = 65536
    rope_base: float = 5_000_000.0
    tie_embeddings: bool = True
    no_rope_layers: list[int] | None = None  # 1 = RoPE, 0 = NoPE; None = NoPE every 4th layer

    per_layer_fields = ("layer_types", "no_rope_layers")

    def __post_init__(self):
        if self.no_rope_layers is None:
            self.no_rope_layers = [int((i + 1) % 4 != 0) for i in range(self.n_layer)]
        if len(self.no_rope_layers) != self.n_layer:
            from torchgraft.errors import ConfigError

            raise ConfigError(f"model.no_rope_layers has {len(self.no_rope_layers)} entries; model.n_layer is "
                              f"{self.n_layer}: give one per layer")
        super().__post_init__()


class SmolLM3(DecoderLM):
    """SmolLM3: Llama with NoPE layers."""


def smollm3(c: SmolLM3Config) -> SmolLM3:
    rope = rotary(c)
    # each attention holds the shared rotary module or none (NoPE), so the model passes none
    return decoder_lm(SmolLM3, c, mlp=gated_mlp, norm=rms_norm, rotary=None, learned_positions=False,
                      head_dim=c.head_dim,
                      attention=lambda c, i: attention(c, i, rope=rope if c.no_rope_layers[i] else None))


register_family("smollm3", SmolLM3Config, smollm3)
register_preset("smollm3-3b", "smollm3", description="SmolLM3 3B (GQA 16/4, tied, NoPE every 4th layer)")
_SMOLLM2 = dict(vocab_size=49152, tie_embeddings=True, block_size=8192, norm_eps=1e-5)
register_preset("smollm2-135m", "llama", description="SmolLM2 135M (GQA 9/3, tied)",
                n_embd=576, intermediate_size=1536, n_layer=30, n_head=9, n_kv_head=3, rope_base=100000.0,
                **_SMOLLM2)
register_preset("smollm2-360m", "llama", description="SmolLM2 360M (GQA 15/5, tied)",
                n_embd=960, intermediate_size=2560, n_layer=32, n_head=15, n_kv_head=5, rope_base=100000.0,
                **_SMOLLM2)
register_preset("smollm2-1.7b", "llama", description="SmolLM2 1.7B (MHA 32, tied)",
                n_embd=2048, intermediate_size=8192, n_layer=24, n_head=32, n_kv_head=32, rope_base=130000.0,
                **_SMOLLM2)

"""Qwen3-MoE family: Qwen3's decoder (per-head q/k RMSNorm) with a sparse mixture-of-experts MLP in
its layers: many narrow SwiGLU experts, top-k per token, renormalised when `norm_topk_prob`. Layers
listed in `mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense SwiGLU MLP."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from torchgraft.models.decoder import DecoderConfig, attention, gated_mlp, head_rms_norm, rotary
from torchgraft.models.gpt import DecoderLM, decoder_lm, rms_norm
from torchgraft.models.moe import check_moe_config, sparse_moe, sparse_or_dense
from torchgraft.models.registry import register_family, register_preset


@dataclass
class Qwen3MoeConfig(DecoderConfig):
    vocab_size: int = 151936
    n_embd: int = 2048
    intermediate_size: int = 6144  # width of the dense layers' MLP (none in the published models)
    n_layer: int = 48
    n_head: int = 32
    n_kv_head: int | None = 4
    head_dim: int | None = 128
    block_size: int = 40960
    rope_base: float = 1_000_000.0
    n_experts: int = 128
    top_k: int = 8
    expert_size: int = 768  # width of each expert (config.json's moe_intermediate_size)
    norm_topk_prob: bool = True
    mlp_only_layers: list[int] = field(default_factory=list)  # layers with a dense MLP instead
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 (and not in mlp_only_layers)

    def __post_init__(self):
        super().__post_init__()
        check_moe_config(self)


class Qwen3Moe(DecoderLM):
    """Qwen3-MoE: Qwen3 attention (q/k norms) with top-k-of-E SwiGLU experts."""


def qwen3_moe(c: Qwen3MoeConfig) -> Qwen3Moe:
    """Builder of the "qwen3_moe" family."""
    rope = rotary(c)

    def qk_norm(_width: int) -> nn.Module:  # per head, so the projection width does not matter
        return head_rms_norm(c)

    sparse = sparse_or_dense(lambda c: sparse_moe(c, c.expert_size, renormalize=c.norm_topk_prob), gated_mlp)
    return decoder_lm(Qwen3Moe, c, mlp=gated_mlp, layer_mlp=sparse, norm=rms_norm, rotary=rope,
                      learned_positions=False, head_dim=c.head_dim,
                      attention=lambda c, i: attention(c, i, rope=rope, qk_norm=qk_norm))


register_family("qwen3_moe", Qwen3MoeConfig, qwen3_moe)
register_preset("qwen3-30b-a3b", "qwen3_moe", description="Qwen3-30B-A3B (30.5B, 3.3B active; 128 experts, top 8)")
register_preset("qwen3-moe-tiny", "qwen3_moe", description="tiny Qwen3-MoE for tests (8 experts, top 2)",
                vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=16, intermediate_size=96,
                expert_size=32, block_size=128, n_experts=8, top_k=2)

"""Qwen2-MoE family (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's decoder (q/k/v biases, no o_proj bias) with
a mixture-of-experts MLP: top-k of E narrow SwiGLU experts (softmax weights not renormalised unless
`norm_topk_prob`) plus one wide shared SwiGLU expert on every token, scaled by `sigmoid(gate(x))`.
Layers in `mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense SwiGLU MLP."""
from __future__ import annotations

from dataclasses import dataclass, field

from torchgraft.models.decoder import DecoderConfig, attention, gated_mlp, rotary
from torchgraft.models.gpt import DecoderLM, decoder_lm, rms_norm
from torchgraft.models.moe import check_moe_config, sparse_moe, sparse_or_dense
from torchgraft.models.registry import register_family, register_preset


@dataclass
class Qwen2MoeConfig(DecoderConfig):
    """Defaults: Qwen1.5-MoE-A2.7B (= transformers' `Qwen2MoeConfig` defaults)."""
    vocab_size: int = 151936
    n_embd: int = 2048
    intermediate_size: int = 5632  # width of the dense layers' MLP (none in the published models)
    n_layer: int = 24
    n_head: int = 16
    n_kv_head: int | None = 16
    block_size: int = 8192
    rope_base: float = 1_000_000.0
    bias: bool = True  # q/k/v (config.json's qkv_bias); o_proj never has one
    n_experts: int = 60
    top_k: int = 4
    expert_size: int = 1408  # width of each routed expert (moe_intermediate_size)
    shared_expert_size: int = 5632  # width of the shared expert (shared_expert_intermediate_size)
    norm_topk_prob: bool = False
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_moe_config(self)


class Qwen2Moe(DecoderLM):
    """Qwen2-MoE: Qwen2 attention with routed experts plus a sigmoid-gated shared expert."""


def qwen2_moe(c: Qwen2MoeConfig) -> Qwen2Moe:
    """Builder of the "qwen2_moe" family."""
    rope = rotary(c)
    sparse = sparse_or_dense(lambda c: sparse_moe(c, c.expert_size, renormalize=c.norm_topk_prob,
                                                  shared_size=c.shared_expert_size), gated_mlp)
    return decoder_lm(Qwen2Moe, c, mlp=gated_mlp, layer_mlp=sparse, norm=rms_norm, rotary=rope,
                      learned_positions=False, head_dim=c.head_dim,
                      attention=lambda c, i: attention(c, i, rope=rope, out_bias=False))


register_family("qwen2_moe", Qwen2MoeConfig, qwen2_moe)
register_preset("qwen1.5-moe-a2.7b", "qwen2_moe",
                description="Qwen1.5-MoE-A2.7B (14.3B, 2.7B active; 60 experts top 4 + a shared expert)")
register_preset("qwen2-moe-tiny", "qwen2_moe", description="tiny Qwen2-MoE for tests (8 experts, top 2, shared)",
                vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96,
                expert_size=32, shared_expert_size=64, block_size=128, n_experts=8, top_k=2)

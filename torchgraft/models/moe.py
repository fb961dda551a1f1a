"""The sparse mixture-of-experts MLP part that the MoE families (Mixtral, Qwen3-MoE) pass to
`decoder_lm` in place of a dense `gated_mlp` (see torchgraft/nn/moe.py and docs/moe.md)."""
from __future__ import annotations

from typing import Any

from torch import nn

from torchgraft.nn.moe import MoE, GroupedExperts, SoftmaxTopK


def sparse_moe(c: Any, expert_size: int, renormalize: bool) -> MoE:
    """`c.n_experts` SwiGLU experts of width `expert_size`, `c.top_k` of them per token, chosen by a
    bias-free router; `renormalize`: the k weights are rescaled to sum to 1."""
    return MoE(nn.Linear(c.n_embd, c.n_experts, bias=False), SoftmaxTopK(c.top_k, renormalize),
               GroupedExperts(c.n_experts, c.n_embd, expert_size, c.activation))


def check_moe_config(c: Any) -> None:
    """ConfigError unless 1 <= top_k <= n_experts."""
    from torchgraft.errors import ConfigError

    if c.n_experts < 1 or not 1 <= c.top_k <= c.n_experts:
        raise ConfigError(f"model.top_k ({c.top_k}) must be between 1 and model.n_experts ({c.n_experts})")

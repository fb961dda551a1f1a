"""The sparse mixture-of-experts MLP part that the MoE families (Mixtral, Qwen3-MoE, Qwen2-MoE) pass
to `decoder_lm` in place of a dense `gated_mlp` (see torchgraft/nn/moe.py and docs/moe.md), and the
rule of the Qwen MoE families for which layers are sparse."""
from __future__ import annotations

from typing import Any

from torch import nn

from torchgraft.nn.mlp import GatedMLP
from torchgraft.nn.moe import MoE, GroupedExperts, RouterJitter, SoftmaxTopK


def sparse_moe(c: Any, expert_size: int, renormalize: bool, *, shared_size: int | None = None,
               jitter: float = 0.0) -> MoE:
    """`c.n_experts` SwiGLU experts of width `expert_size`, `c.top_k` of them per token, chosen by a
    bias-free router; `renormalize`: the k weights are rescaled to sum to 1. `shared_size`: a dense
    SwiGLU shared expert of that width added to every token, scaled by a sigmoid gate (Qwen2-MoE).
    `jitter` > 0: Mixtral's train-time multiplicative router noise."""
    shared = GatedMLP(c.n_embd, shared_size, bias=False, activation=c.activation) if shared_size else None
    return MoE(nn.Linear(c.n_embd, c.n_experts, bias=False), SoftmaxTopK(c.top_k, renormalize),
               GroupedExperts(c.n_experts, c.n_embd, expert_size, c.activation),
               shared_expert=shared, shared_gate=nn.Linear(c.n_embd, 1, bias=False) if shared_size else None,
               jitter=RouterJitter(jitter) if jitter > 0 else None)


def is_sparse_layer(c: Any, i: int) -> bool:
    """Qwen2-/Qwen3-MoE: layer `i` has the expert block unless it is in `c.mlp_only_layers` or
    `(i + 1)` is not a multiple of `c.decoder_sparse_step` (then it has a dense MLP of width
    `c.intermediate_size`), as transformers' `Qwen3MoeDecoderLayer` decides."""
    return i not in c.mlp_only_layers and (i + 1) % c.decoder_sparse_step == 0


def sparse_or_dense(sparse: Any, dense: Any) -> Any:
    """A `layer_mlp(c, i)` for `decoder_lm`: `sparse(c)` on the sparse layers, `dense(c)` elsewhere."""
    def layer_mlp(c: Any, i: int) -> nn.Module:
        return sparse(c) if is_sparse_layer(c, i) else dense(c)
    return layer_mlp


def check_moe_config(c: Any) -> None:
    """ConfigError unless 1 <= top_k <= n_experts (and, where the config has them, the dense-layer
    fields are valid: `decoder_sparse_step` >= 1, `mlp_only_layers` within the layers)."""
    from torchgraft.errors import ConfigError

    if c.n_experts < 1 or not 1 <= c.top_k <= c.n_experts:
        raise ConfigError(f"model.top_k ({c.top_k}) must be between 1 and model.n_experts ({c.n_experts})")
    if getattr(c, "decoder_sparse_step", 1) < 1:
        raise ConfigError(f"model.decoder_sparse_step ({c.decoder_sparse_step}) must be >= 1 "
                          "(1: every layer sparse)")
    bad = [i for i in getattr(c, "mlp_only_layers", ()) if not 0 <= i < c.n_layer]
    if bad:
        raise ConfigError(f"model.mlp_only_layers has {bad}, outside the {c.n_layer} layers (0 to {c.n_layer - 1})")

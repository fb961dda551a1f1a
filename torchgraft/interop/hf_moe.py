"""Hugging Face layouts of the mixture-of-experts families: `MixtralForCausalLM` <-> `mixtral`,
`Qwen3MoeForCausalLM` <-> `qwen3_moe`.

Attention, norms and embeddings are named as in the Llama-shaped families (`hf_decoders.py`). The
experts are stored one module per expert, as the Hub checkpoints and transformers' `save_pretrained`
write them, and stacked into our (E, ...) expert weights on import:

| Hugging Face (`model.layers.{i}.`)                      | torchgraft (`blocks.{i}.mlp.`)                  |
|---------------------------------------------------------|-------------------------------------------------|
| Mixtral `block_sparse_moe.gate.weight`, Qwen3 `mlp.gate.weight` | `gate.weight` (E, C)                    |
| Mixtral `block_sparse_moe.experts.{j}.w1` / `.w3`, Qwen3 `mlp.experts.{j}.gate_proj` / `.up_proj` | `experts.gate_up_proj.weight` (E, 2H, C), [gate; up] |
| Mixtral `block_sparse_moe.experts.{j}.w2`, Qwen3 `mlp.experts.{j}.down_proj` | `experts.down_proj.weight` (E, C, H) |
"""
from __future__ import annotations

from typing import Any

import torch

from torchgraft.errors import ConfigError
from torchgraft.interop.hf_decoders import (
    _DERIVED,
    LLAMA_NORMS,
    check_activation,
    common_from_hf,
    common_to_hf,
    rename_rules,
)
from torchgraft.interop.hf_spec import HFSpec, Rule, copy, need

Tensors = tuple[torch.Tensor, ...]


def _stack_gate_up(n: int):
    """(gate_0..gate_{n-1}, up_0..up_{n-1}) -> (E, 2H, C) and back."""
    def to_ours(*ts: torch.Tensor) -> Tensors:
        return (torch.cat([torch.stack(ts[:n]), torch.stack(ts[n:])], dim=1),)

    def to_hf(w: torch.Tensor) -> Tensors:
        gate, up = w.chunk(2, dim=1)
        return tuple(g.contiguous() for g in gate.unbind(0)) + tuple(u.contiguous() for u in up.unbind(0))
    return to_ours, to_hf


def _stack(*ts: torch.Tensor) -> Tensors:
    return (torch.stack(ts),)


def _unstack(w: torch.Tensor) -> Tensors:
    return tuple(x.contiguous() for x in w.unbind(0))


def moe_rules(mlp: str, gate: str, up: str, down: str):
    """`rules(cfg, prefix, arch)`: the decoder's renamed tensors, with the MoE block's tensors under
    `layers.{i}.{mlp}` and expert `j`'s projections named `experts.{j}.{gate,up,down}`."""
    dense = rename_rules(LLAMA_NORMS)

    def rules(cfg: Any, p: str, arch: str) -> list[Rule]:
        out = [r for r in dense(cfg, p, arch) if ".mlp." not in r.ours[0]]
        n = cfg.n_experts
        to_ours, to_hf = _stack_gate_up(n)
        for i in range(cfg.n_layer):
            h, b = f"{p}layers.{i}.{mlp}.", f"blocks.{i}.mlp."
            experts = [f"{h}experts.{j}." for j in range(n)]
            out.append(copy(f"{h}gate.weight", f"{b}gate.weight"))
            out.append(Rule(tuple(f"{e}{gate}.weight" for e in experts) + tuple(f"{e}{up}.weight" for e in experts),
                            (f"{b}experts.gate_up_proj.weight",), to_ours, to_hf))
            out.append(Rule(tuple(f"{e}{down}.weight" for e in experts), (f"{b}experts.down_proj.weight",),
                            _stack, _unstack))
        return out
    return rules


def _num_experts(hf: dict[str, Any], arch: str) -> int:
    n = hf.get("num_local_experts") or hf.get("num_experts")
    if not n:
        raise ConfigError(f"config.json of this {arch} has no 'num_local_experts'; the file is incomplete")
    return int(n)


def _mixtral_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_activation(hf, arch, ("silu",))
    if hf.get("router_jitter_noise"):
        raise ConfigError(f"{arch} with router_jitter_noise={hf['router_jitter_noise']} is not supported by "
                          "torchgraft (set it to 0.0 in config.json)")
    return {**common_from_hf(hf, arch), "layer_types": None, "n_experts": _num_experts(hf, arch),
            "top_k": need(hf, "num_experts_per_tok", arch)}


def _mixtral_to_hf(cfg: Any) -> dict[str, Any]:
    out = {**common_to_hf(cfg), "hidden_act": "silu", "num_local_experts": cfg.n_experts,
           "num_experts_per_tok": cfg.top_k, "router_jitter_noise": 0.0, "output_router_logits": False}
    del out["layer_types"]
    return out


def _qwen3_moe_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_activation(hf, arch, ("silu",))
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ConfigError(f"{arch} with dense layers (mlp_only_layers / decoder_sparse_step != 1) is not "
                          "supported by torchgraft (every layer must be sparse)")
    return {**common_from_hf(hf, arch), "n_experts": _num_experts(hf, arch),
            "top_k": need(hf, "num_experts_per_tok", arch), "expert_size": need(hf, "moe_intermediate_size", arch),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False))}


def _qwen3_moe_to_hf(cfg: Any) -> dict[str, Any]:
    return {**common_to_hf(cfg), "hidden_act": "silu", "attention_bias": False,
            "use_sliding_window": cfg.sliding_window is not None, "num_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": cfg.expert_size,
            "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "output_router_logits": False}


def _spec(model_type: str, family: str, arch: str, from_hf, to_hf, rules) -> HFSpec:
    return HFSpec(model_type=model_type, family=family, architectures=(arch,), config_from_hf=from_hf,
                  config_to_hf=lambda cfg: (arch, to_hf(cfg)), rules=rules, prefixes={arch: ("model.", "")},
                  anchor="embed_tokens.weight", derived=_DERIVED)


SPECS = [
    _spec("mixtral", "mixtral", "MixtralForCausalLM", _mixtral_from_hf, _mixtral_to_hf,
          moe_rules("block_sparse_moe", "w1", "w3", "w2")),
    _spec("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_from_hf, _qwen3_moe_to_hf,
          moe_rules("mlp", "gate_proj", "up_proj", "down_proj")),
]

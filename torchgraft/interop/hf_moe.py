"""Hugging Face layouts of the mixture-of-experts families: `MixtralForCausalLM` <-> `mixtral`,
`Qwen3MoeForCausalLM` <-> `qwen3_moe`, `Qwen2MoeForCausalLM` <-> `qwen2_moe`.

Attention, norms and embeddings are named as in the Llama-shaped families (`hf_decoders.py`). The
experts are stored one module per expert, as the Hub checkpoints and transformers' `save_pretrained`
write them, and stacked into our (E, ...) expert weights on import:

| Hugging Face (`model.layers.{i}.`)                      | torchgraft (`blocks.{i}.mlp.`)                  |
|---------------------------------------------------------|-------------------------------------------------|
| Mixtral `block_sparse_moe.gate.weight`, Qwen3 `mlp.gate.weight` | `gate.weight` (E, C)                    |
| Mixtral `block_sparse_moe.experts.{j}.w1` / `.w3`, Qwen3 `mlp.experts.{j}.gate_proj` / `.up_proj` | `experts.gate_up_proj.weight` (E, 2H, C), [gate; up] |
| Mixtral `block_sparse_moe.experts.{j}.w2`, Qwen3 `mlp.experts.{j}.down_proj` | `experts.down_proj.weight` (E, C, H) |
| Qwen2-MoE `mlp.shared_expert.{gate,up,down}_proj.weight`  | `shared_expert.{gate,up,down}_proj.weight`      |
| Qwen2-MoE `mlp.shared_expert_gate.weight` (1, C)          | `shared_gate.weight`                            |

Dense layers of the Qwen MoE families (`mlp_only_layers`, `decoder_sparse_step`) keep Llama's
`mlp.{gate,up,down}_proj` names, as in transformers.
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
    """`rules(cfg, prefix, arch)`: the decoder's renamed tensors, with each sparse layer's MoE block
    under `layers.{i}.{mlp}` (router `gate`, shared expert and its gate `shared_expert_gate`) and
    expert `j`'s projections named `experts.{j}.{gate,up,down}`. Dense layers (Qwen MoE families'
    `mlp_only_layers`) keep the dense `mlp.{gate,up,down}_proj` names."""
    dense = rename_rules(LLAMA_NORMS)

    def rules(cfg: Any, p: str, arch: str) -> list[Rule]:
        base = dense(cfg, p, arch)
        sparse = sorted({int(r.ours[0].split(".")[1]) for r in base if ".mlp.experts." in r.ours[0]})
        out = []
        for r in base:
            name = r.ours[0]
            if ".mlp.experts." in name:  # stacked below
                continue
            if ".mlp." in name and int(name.split(".")[1]) in sparse:  # router, shared expert + gate
                hf_name = r.hf[0].replace(".mlp.", f".{mlp}.", 1).replace(".shared_gate.", ".shared_expert_gate.")
                out.append(copy(hf_name, name))
            else:
                out.append(r)
        n = cfg.n_experts
        to_ours, to_hf = _stack_gate_up(n)
        for i in sparse:
            h, b = f"{p}layers.{i}.{mlp}.", f"blocks.{i}.mlp."
            experts = [f"{h}experts.{j}." for j in range(n)]
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
    return {**common_from_hf(hf, arch), "layer_types": None, "n_experts": _num_experts(hf, arch),
            "top_k": need(hf, "num_experts_per_tok", arch),
            "router_jitter": float(hf.get("router_jitter_noise") or 0.0)}


def _mixtral_to_hf(cfg: Any) -> dict[str, Any]:
    out = {**common_to_hf(cfg), "hidden_act": "silu", "num_local_experts": cfg.n_experts,
           "num_experts_per_tok": cfg.top_k, "router_jitter_noise": cfg.router_jitter, "output_router_logits": False}
    del out["layer_types"]
    return out


def _qwen3_moe_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_activation(hf, arch, ("silu",))
    return {**common_from_hf(hf, arch), **_qwen_moe_fields(hf, arch)}


def _qwen_moe_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """The routing and dense-layer fields Qwen2-MoE and Qwen3-MoE share."""
    return {"n_experts": _num_experts(hf, arch), "top_k": need(hf, "num_experts_per_tok", arch),
            "expert_size": need(hf, "moe_intermediate_size", arch),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
            "mlp_only_layers": [int(i) for i in hf.get("mlp_only_layers") or []],
            "decoder_sparse_step": int(hf.get("decoder_sparse_step") or 1)}


def _qwen_moe_to_hf(cfg: Any) -> dict[str, Any]:
    return {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": cfg.expert_size,
            "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": cfg.decoder_sparse_step,
            "mlp_only_layers": list(cfg.mlp_only_layers), "output_router_logits": False}


def _qwen3_moe_to_hf(cfg: Any) -> dict[str, Any]:
    return {**common_to_hf(cfg), "hidden_act": "silu", "attention_bias": False,
            "use_sliding_window": cfg.sliding_window is not None, **_qwen_moe_to_hf(cfg)}


def _qwen2_moe_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_activation(hf, arch, ("silu",))
    return {**common_from_hf(hf, arch), **_qwen_moe_fields(hf, arch), "bias": bool(hf.get("qkv_bias", True)),
            "shared_expert_size": need(hf, "shared_expert_intermediate_size", arch)}


def _qwen2_moe_to_hf(cfg: Any) -> dict[str, Any]:
    return {**common_to_hf(cfg), "hidden_act": "silu", "qkv_bias": cfg.bias,
            "use_sliding_window": cfg.sliding_window is not None,
            "shared_expert_intermediate_size": cfg.shared_expert_size, **_qwen_moe_to_hf(cfg)}


def _spec(model_type: str, family: str, arch: str, from_hf, to_hf, rules) -> HFSpec:
    return HFSpec(model_type=model_type, family=family, architectures=(arch,), config_from_hf=from_hf,
                  config_to_hf=lambda cfg: (arch, to_hf(cfg)), rules=rules, prefixes={arch: ("model.", "")},
                  anchor="embed_tokens.weight", derived=_DERIVED)


SPECS = [
    _spec("mixtral", "mixtral", "MixtralForCausalLM", _mixtral_from_hf, _mixtral_to_hf,
          moe_rules("block_sparse_moe", "w1", "w3", "w2")),
    _spec("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_from_hf, _qwen3_moe_to_hf,
          moe_rules("mlp", "gate_proj", "up_proj", "down_proj")),
    _spec("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", _qwen2_moe_from_hf, _qwen2_moe_to_hf,
          moe_rules("mlp", "gate_proj", "up_proj", "down_proj")),
]

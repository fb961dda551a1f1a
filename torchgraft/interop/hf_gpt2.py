"""GPT-2 (`GPT2LMHeadModel`, `GPT2Model`) <-> torchgraft `gpt` family.

Hugging Face GPT-2 stores its projections as `Conv1D` (weight shaped (in, out), so transposed
relative to `nn.Linear`) and fuses q/k/v into one `c_attn` of width 3C.

| Hugging Face (`transformer.` prefix, or none)  | torchgraft                                   |
|------------------------------------------------|----------------------------------------------|
| wte.weight                                     | tok_emb.weight                               |
| wpe.weight                                     | pos_emb.weight                               |
| h.{i}.ln_1.{weight,bias}                       | blocks.{i}.attn_norm.{weight,bias}           |
| h.{i}.attn.c_attn.weight (C, 3C)  [T, split]   | blocks.{i}.attn.{q,k,v}_proj.weight (C, C)   |
| h.{i}.attn.c_attn.bias (3C)       [split]      | blocks.{i}.attn.{q,k,v}_proj.bias            |
| h.{i}.attn.c_proj.{weight [T],bias}            | blocks.{i}.attn.o_proj.{weight,bias}         |
| h.{i}.ln_2.{weight,bias}                       | blocks.{i}.mlp_norm.{weight,bias}            |
| h.{i}.mlp.c_fc.{weight [T],bias}               | blocks.{i}.mlp.fc_in.{weight,bias}           |
| h.{i}.mlp.c_proj.{weight [T],bias}             | blocks.{i}.mlp.fc_out.{weight,bias}          |
| ln_f.{weight,bias}                             | norm.{weight,bias}                           |
| lm_head.weight (untied only)                   | lm_head.weight                               |

Skipped on import (buffers, recomputed): `h.{i}.attn.bias`, `h.{i}.attn.masked_bias`.
"""
from __future__ import annotations

from typing import Any

import torch

from torchgraft.errors import ConfigError
from torchgraft.interop.hf_spec import HFSpec, Rule, Tensors, check_equal, copy, need, transpose

# HF activation names -> torchgraft.nn.mlp names
ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu", "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu"}
ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu",
             "quick_gelu": "quick_gelu"}


def _split_qkv_weight(w: torch.Tensor) -> Tensors:
    return tuple(x.contiguous() for x in w.t().chunk(3, dim=0))  # (C, 3C) -> 3 x (C, C)


def _fuse_qkv_weight(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tensors:
    return (torch.cat([q, k, v], dim=0).t().contiguous(),)  # 3 x (C, C) -> (C, 3C)


def _split_qkv_bias(b: torch.Tensor) -> Tensors:
    return tuple(x.contiguous() for x in b.chunk(3))


def _fuse_qkv_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tensors:
    return (torch.cat([q, k, v]),)


def _conv1d(hf: str, ours: str) -> list[Rule]:
    return [Rule((f"{hf}.weight",), (f"{ours}.weight",), transpose, transpose),
            copy(f"{hf}.bias", f"{ours}.bias")]


def _norm(hf: str, ours: str) -> list[Rule]:
    return [copy(f"{hf}.weight", f"{ours}.weight"), copy(f"{hf}.bias", f"{ours}.bias")]


def rules(cfg: Any, p: str, arch: str) -> list[Rule]:
    r = [copy(f"{p}wte.weight", "tok_emb.weight"), copy(f"{p}wpe.weight", "pos_emb.weight")]
    for i in range(cfg.n_layer):
        h, b = f"{p}h.{i}.", f"blocks.{i}."
        attn = (f"{b}attn.q_proj", f"{b}attn.k_proj", f"{b}attn.v_proj")
        r += _norm(f"{h}ln_1", f"{b}attn_norm")
        r += [Rule((f"{h}attn.c_attn.weight",), tuple(f"{a}.weight" for a in attn),
                   _split_qkv_weight, _fuse_qkv_weight),
              Rule((f"{h}attn.c_attn.bias",), tuple(f"{a}.bias" for a in attn),
                   _split_qkv_bias, _fuse_qkv_bias)]
        r += _conv1d(f"{h}attn.c_proj", f"{b}attn.o_proj")
        r += _norm(f"{h}ln_2", f"{b}mlp_norm")
        r += _conv1d(f"{h}mlp.c_fc", f"{b}mlp.fc_in")
        r += _conv1d(f"{h}mlp.c_proj", f"{b}mlp.fc_out")
    r += _norm(f"{p}ln_f", "norm")
    r.append(copy("lm_head.weight", "lm_head.weight"))
    return r


def config_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in ACT_FROM_HF:
        raise ConfigError(f"{arch} with activation_function={act!r} is not supported "
                          f"(supported: {', '.join(ACT_FROM_HF)})")
    check_equal(hf, "scale_attn_weights", True, arch, default=True)
    check_equal(hf, "scale_attn_by_inverse_layer_idx", False, arch, default=False)
    check_equal(hf, "add_cross_attention", False, arch, default=False)
    n_embd = need(hf, "n_embd", arch)
    return {
        "vocab_size": need(hf, "vocab_size", arch),
        "n_layer": need(hf, "n_layer", arch),
        "n_head": need(hf, "n_head", arch),
        "n_embd": n_embd,
        "intermediate_size": hf.get("n_inner"),  # None = 4 * n_embd, both sides
        "block_size": hf.get("n_positions") or hf.get("n_ctx") or 1024,
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "bias": True,
        "dropout": float(hf.get("resid_pdrop", 0.0) or 0.0),
        "activation": ACT_FROM_HF[act],
        "positions": "learned",
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


def config_to_hf(cfg: Any) -> tuple[str, dict[str, Any]]:
    arch = "GPT2LMHeadModel"
    if cfg.positions != "learned":
        raise ConfigError(f"a gpt model with positions={cfg.positions!r} has no GPT-2 equivalent in "
                          "Hugging Face (GPT-2 uses learned positions); export a llama model instead")
    if cfg.n_kv_head not in (None, cfg.n_head):
        raise ConfigError("Hugging Face GPT-2 has no grouped-query attention; n_kv_head must equal n_head")
    if not cfg.bias:
        raise ConfigError("Hugging Face GPT-2 always has biases; this model has bias=false")
    if cfg.activation not in ACT_TO_HF:
        raise ConfigError(f"activation {cfg.activation!r} has no Hugging Face name")
    return arch, {
        "activation_function": ACT_TO_HF[cfg.activation],
        "vocab_size": cfg.vocab_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_inner": cfg.intermediate_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        # GPT-2's <|endoftext|> when the vocabulary has it; none for custom vocabularies
        "bos_token_id": 50256 if cfg.vocab_size > 50256 else None,
        "eos_token_id": 50256 if cfg.vocab_size > 50256 else None,
    }


SPEC = HFSpec(
    model_type="gpt2",
    family="gpt",
    architectures=("GPT2LMHeadModel", "GPT2Model"),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    prefixes={"GPT2LMHeadModel": ("transformer.", ""), "GPT2Model": ("", "transformer.")},
    anchor="wte.weight",
    derived=(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$",
             r"^lm_head\.weight$"),  # a tied model's duplicate head (HF re-ties it too)
)

"""Llama (`LlamaForCausalLM`, `LlamaModel`) <-> torchgraft `llama` family.

Both use the rotate-half RoPE convention, so q/k weights copy over without any permutation.

| Hugging Face (`model.` prefix, or none)                  | torchgraft                                   |
|----------------------------------------------------------|----------------------------------------------|
| embed_tokens.weight                                      | tok_emb.weight                               |
| layers.{i}.input_layernorm.weight                        | blocks.{i}.attn_norm.weight                  |
| layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias?}       | blocks.{i}.attn.{q,k,v,o}_proj.{weight,bias?}|
| layers.{i}.post_attention_layernorm.weight               | blocks.{i}.mlp_norm.weight                   |
| layers.{i}.mlp.{gate,up,down}_proj.{weight,bias?}        | blocks.{i}.mlp.{gate,up,down}_proj.*         |
| norm.weight                                              | norm.weight                                  |
| lm_head.weight (untied only)                             | lm_head.weight                               |

Skipped on import (buffers, recomputed): `rotary_emb.inv_freq`, `layers.{i}.self_attn.rotary_emb.inv_freq`.
"""
from __future__ import annotations

from typing import Any

from torchgraft.errors import ConfigError
from torchgraft.interop.hf_spec import HFSpec, Rule, check_equal, copy, linear, need


def rules(cfg: Any, p: str, arch: str) -> list[Rule]:
    r = [copy(f"{p}embed_tokens.weight", "tok_emb.weight")]
    for i in range(cfg.n_layer):
        h, b = f"{p}layers.{i}.", f"blocks.{i}."
        r.append(copy(f"{h}input_layernorm.weight", f"{b}attn_norm.weight"))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            r += linear(f"{h}self_attn.{proj}", f"{b}attn.{proj}")
        r.append(copy(f"{h}post_attention_layernorm.weight", f"{b}mlp_norm.weight"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            r += linear(f"{h}mlp.{proj}", f"{b}mlp.{proj}")
    r.append(copy(f"{p}norm.weight", "norm.weight"))
    r.append(copy("lm_head.weight", "lm_head.weight"))
    return r


def _rope(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """Our rope fields from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`)."""
    from torchgraft.interop.hf_decoders import rope_from_hf, rope_params

    theta, s = rope_from_hf(rope_params(hf), hf, arch)
    kind = s["type"]
    if kind not in ("default", "llama3", "linear", "dynamic", "yarn"):
        raise ConfigError(f"{arch} with RoPE scaling {kind!r} is not supported by torchgraft's llama "
                          "(default, llama3, linear, dynamic, yarn)")
    odd = [k for k, default in (("beta_fast", 32.0), ("beta_slow", 1.0), ("mscale", None), ("mscale_all_dim", None),
                                ("attention_factor", None), ("truncate", True)) if s.get(k, default) != default]
    if odd:
        raise ConfigError(f"{arch} with RoPE {kind} settings {', '.join(odd)} is not supported by torchgraft's llama")
    fields: dict[str, Any] = {"rope_base": theta, "rope_scaling": "none" if kind == "default" else kind}
    if kind in ("llama3", "yarn"):
        fields["rope_original_max_len"] = int(need(s, "original_max_position_embeddings", arch))
    if kind != "default":  # yarn without a factor: max positions / original, as transformers
        default = hf.get("max_position_embeddings", 1) / fields["rope_original_max_len"] if kind == "yarn" else 1.0
        fields["rope_factor"] = float(s.get("factor") or default)
    if kind == "llama3":
        fields["rope_low_freq_factor"] = float(s.get("low_freq_factor", 1.0))
        fields["rope_high_freq_factor"] = float(s.get("high_freq_factor", 4.0))
    return fields


def _rope_to_hf(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
                           "rope_theta": cfg.rope_base}
    if cfg.rope_scaling != "none":
        out["factor"] = cfg.rope_factor
    if cfg.rope_scaling in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = cfg.rope_original_max_len
    if cfg.rope_scaling == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    return out


def config_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_equal(hf, "hidden_act", "silu", arch, default="silu")
    attn_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ConfigError(f"{arch} with attention_bias={attn_bias} but mlp_bias={mlp_bias} is not "
                          "supported (torchgraft's llama has one `bias` switch for both)")
    n_embd, n_head = need(hf, "hidden_size", arch), need(hf, "num_attention_heads", arch)
    head_dim = hf.get("head_dim")
    return {
        "vocab_size": need(hf, "vocab_size", arch),
        "n_layer": need(hf, "num_hidden_layers", arch),
        "n_head": n_head,
        "n_kv_head": hf.get("num_key_value_heads") or n_head,
        "n_embd": n_embd,
        "intermediate_size": need(hf, "intermediate_size", arch),
        "block_size": hf.get("max_position_embeddings") or 4096,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        **_rope(hf, arch),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "bias": attn_bias,
        "dropout": float(hf.get("attention_dropout", 0.0) or 0.0),
        "activation": "silu",
        "head_dim": None if head_dim in (None, n_embd // n_head) else head_dim,
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


def config_to_hf(cfg: Any) -> tuple[str, dict[str, Any]]:
    if cfg.activation != "silu":
        raise ConfigError(f"Hugging Face Llama uses SiLU; this model has activation={cfg.activation!r}")
    return "LlamaForCausalLM", {
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "hidden_size": cfg.n_embd,
        "head_dim": cfg.head_dim or cfg.n_embd // cfg.n_head,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,  # transformers 4.x
        "rope_parameters": _rope_to_hf(cfg),  # 5.x
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        # unknown here (transformers would default to 1/2); set them with save_hf(config_overrides=...)
        "bos_token_id": None,
        "eos_token_id": None,
    }


SPEC = HFSpec(
    model_type="llama",
    family="llama",
    architectures=("LlamaForCausalLM", "LlamaModel"),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    prefixes={"LlamaForCausalLM": ("model.", ""), "LlamaModel": ("", "model.")},
    anchor="embed_tokens.weight",
    derived=(r"rotary_emb\.(original_)?inv_freq$",
             r"^lm_head\.weight$"),  # a tied model's duplicate head (HF re-ties it too)
)

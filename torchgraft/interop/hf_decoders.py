"""Hugging Face layouts of the Llama-shaped families (Qwen2, Qwen3, Mistral, Gemma 2/3, Phi-3, OLMo-2,
SmolLM3) <-> their torchgraft families.

Tensors: every family keeps Llama's names (`model.embed_tokens`, `model.layers.{i}.self_attn.*`,
`.mlp.*`, `model.norm`, `lm_head`); the block norms differ and are renamed per family:

| torchgraft (blocks.{i}.) | Llama / Qwen / Mistral / Phi-3 / SmolLM3 | Gemma 2/3                  | OLMo-2                     |
|--------------------------|------------------------------------------|----------------------------|----------------------------|
| attn_norm                | input_layernorm                          | input_layernorm            | (none)                     |
| attn_post_norm           | (none)                                   | post_attention_layernorm   | post_attention_layernorm   |
| mlp_norm                 | post_attention_layernorm                 | pre_feedforward_layernorm  | (none)                     |
| mlp_post_norm            | (none)                                   | post_feedforward_layernorm | post_feedforward_layernorm |
| attn.q_norm(.norm)       | self_attn.q_norm (Qwen3)                 | self_attn.q_norm (Gemma 3) | self_attn.q_norm           |

The rule table is derived from the model's own state-dict names (built on meta), so it covers exactly
the tensors the config implies. Config fields shared by all of them (sizes, RoPE with its
`rope_parameters` scaling, sliding window and `layer_types`) go through `common_from_hf` /
`common_to_hf`; each family adds its own.
"""
from __future__ import annotations

from typing import Any

from torchgraft.errors import ConfigError
from torchgraft.interop.hf_spec import HFSpec, Rule, copy, need

LLAMA_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
GEMMA_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
               "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}
OLMO2_NORMS = {"attn_post_norm": "post_attention_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}
_DERIVED = (r"rotary_emb\.(original_|local_|global_|full_attention_|sliding_attention_)?inv_freq$",
            r"^lm_head\.weight$")  # a tied model's duplicate head


def _hf_block_name(rest: str, norms: dict[str, str]) -> str:
    """`attn.q_norm.norm.weight` -> `self_attn.q_norm.weight`, `attn_norm.weight` -> `input_layernorm.weight`."""
    head, _, tail = rest.partition(".")
    if head in norms:
        return f"{norms[head]}.{tail}"
    if head == "attn":
        return "self_attn." + tail.replace("q_norm.norm.", "q_norm.").replace("k_norm.norm.", "k_norm.")
    return rest  # mlp.*


def rename_rules(norms: dict[str, str]):
    """A `rules(cfg, prefix, arch)` for a family whose block norms are named by `norms`."""
    def rules(cfg: Any, p: str, arch: str) -> list[Rule]:
        from torchgraft.models.registry import build

        out = []
        for name in build(cfg, device="meta").state_dict():
            if name.startswith("blocks."):
                _, i, rest = name.split(".", 2)
                out.append(copy(f"{p}layers.{i}.{_hf_block_name(rest, norms)}", name))
            elif name == "lm_head.weight":
                out.append(copy("lm_head.weight", name))
            else:  # tok_emb.weight, norm.weight
                out.append(copy(p + name.replace("tok_emb.", "embed_tokens."), name))
        return out
    return rules


# -- config ------------------------------------------------------------------------------------

_ROPE_FIELDS = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate", "attention_factor",
                "short_factor", "long_factor")


def rope_params(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5.x `rope_parameters`, or 4.x `rope_theta` + `rope_scaling`, as one dict."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def rope_from_hf(params: dict[str, Any], hf: dict[str, Any], arch: str) -> tuple[float, dict[str, Any]]:
    """(rope base, our `rope_scaling` section) from one `rope_parameters` dict."""
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "su":  # Phi-3's old name
        kind = "longrope"
    if kind not in ("default", "linear", "dynamic", "llama3", "yarn", "longrope"):
        raise ConfigError(f"{arch} with RoPE scaling {kind!r} is not supported by torchgraft "
                          "(default, linear, dynamic, llama3, yarn, longrope)")
    section: dict[str, Any] = {"type": kind}
    for k in _ROPE_FIELDS:
        v = params.get(k)
        if v is None and k == "original_max_position_embeddings" and kind in ("yarn", "longrope", "llama3"):
            v = hf.get(k)
        if v is not None:
            section[k] = v
    return float(params.get("rope_theta", 10000.0)), section


def rope_to_hf(base: float, rs: Any) -> dict[str, Any]:
    """One `rope_parameters` dict from our base and `RopeScalingConfig`."""
    out: dict[str, Any] = {"rope_type": rs.type, "rope_theta": base}
    if rs.type == "default":
        return out
    wanted = {"linear": ("factor",), "dynamic": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                       "mscale_all_dim", "truncate", "attention_factor"),
              "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                           "long_factor")}[rs.type]
    out.update({k: getattr(rs, k) for k in wanted if getattr(rs, k) is not None})
    return out


def check_activation(hf: dict[str, Any], arch: str, want: tuple[str, ...], key: str = "hidden_act") -> str:
    act = hf.get(key) or want[0]
    if act not in want:
        raise ConfigError(f"{arch} with {key}={act!r} is not supported by torchgraft (only {want[0]!r})")
    return act


def common_from_hf(hf: dict[str, Any], arch: str, *, window: bool = True) -> dict[str, Any]:
    """Our `DecoderConfig` fields from a Llama-shaped HF config (`window`: read the sliding window;
    `use_sliding_window: false` turns it off, as in Qwen2/Qwen3/SmolLM3)."""
    n_embd, n_head = need(hf, "hidden_size", arch), need(hf, "num_attention_heads", arch)
    base, scaling = rope_from_hf(rope_params(hf), hf, arch)
    sliding = hf.get("sliding_window") if window and hf.get("use_sliding_window", True) is not False else None
    fields = {
        "vocab_size": need(hf, "vocab_size", arch),
        "n_layer": need(hf, "num_hidden_layers", arch),
        "n_head": n_head,
        "n_kv_head": hf.get("num_key_value_heads") or n_head,
        "n_embd": n_embd,
        "intermediate_size": need(hf, "intermediate_size", arch),
        "block_size": hf.get("max_position_embeddings") or 4096,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_base": base,
        "rope_scaling": scaling,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "dropout": float(hf.get("attention_dropout", 0.0) or 0.0),
        "head_dim": hf.get("head_dim") or n_embd // n_head,
        "init_std": float(hf.get("initializer_range", 0.02)),
        "sliding_window": sliding,
        "layer_types": list(hf["layer_types"]) if hf.get("layer_types") and sliding is not None else None,
    }
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(f"{arch} with attention_bias/mlp_bias is not supported by torchgraft "
                          "(these families have no such biases)")
    return fields


def common_to_hf(cfg: Any) -> dict[str, Any]:
    """The Llama-shaped part of a config.json (RoPE as transformers 5.x `rope_parameters`)."""
    sliding = cfg.sliding_window is not None
    types = cfg.layer_types or [("sliding_attention" if sliding else "full_attention")] * cfg.n_layer
    return {
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "hidden_size": cfg.n_embd,
        "head_dim": cfg.attn_head_dim,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_to_hf(cfg.rope_base, cfg.rope_scaling),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.dropout,
        "initializer_range": cfg.init_std,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(types),
        "use_cache": True,
        # unknown here; set them with save_hf(config_overrides=...)
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def decoder_spec(model_type: str, family: str, arch: str, config_from_hf, config_to_hf,
                 norms: dict[str, str] = LLAMA_NORMS) -> HFSpec:
    """The `HFSpec` of a `...ForCausalLM` with Llama-style tensor names."""
    return HFSpec(model_type=model_type, family=family, architectures=(arch,), config_from_hf=config_from_hf,
                  config_to_hf=lambda cfg: (arch, config_to_hf(cfg)), rules=rename_rules(norms),
                  prefixes={arch: ("model.", "")}, anchor="embed_tokens.weight", derived=_DERIVED)


# -- the families ------------------------------------------------------------------------------

def _qwen2_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_activation(hf, arch, ("silu",))
    return {**common_from_hf({**hf, "attention_bias": False}, arch), "bias": True}


def _qwen2_to_hf(cfg: Any) -> dict[str, Any]:
    return {**common_to_hf(cfg), "hidden_act": "silu", "use_sliding_window": cfg.sliding_window is not None}


def _qwen3_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_activation(hf, arch, ("silu",))
    return common_from_hf(hf, arch)


def _qwen3_to_hf(cfg: Any) -> dict[str, Any]:
    return {**common_to_hf(cfg), "hidden_act": "silu", "attention_bias": False,
            "use_sliding_window": cfg.sliding_window is not None}


def _mistral_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_activation(hf, arch, ("silu",))
    return {**common_from_hf(hf, arch), "layer_types": None}


def _mistral_to_hf(cfg: Any) -> dict[str, Any]:
    out = {**common_to_hf(cfg), "hidden_act": "silu"}
    del out["layer_types"]
    return out


def _gemma_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_activation(hf, arch, ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"), key="hidden_activation")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{arch} with use_bidirectional_attention is not supported by torchgraft")
    return {**common_from_hf(hf, arch), "activation": "gelu_tanh",
            "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar", 256)),
            "attn_softcap": hf.get("attn_logit_softcapping"), "logit_softcap": hf.get("final_logit_softcapping")}


def _gemma2_to_hf(cfg: Any) -> dict[str, Any]:
    return {**common_to_hf(cfg), "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
            "query_pre_attn_scalar": int(q) if (q := cfg.query_pre_attn_scalar).is_integer() else q,
            "attn_logit_softcapping": cfg.attn_softcap,
            "final_logit_softcapping": cfg.logit_softcap}


def _gemma3_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5.x: one rope_parameters per layer type
        global_, local = params["full_attention"], params.get("sliding_attention") or {}
    else:
        global_, local = rope_params(hf), {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    fields = _gemma_from_hf({**hf, "rope_parameters": global_}, arch)
    local_base, local_scaling = rope_from_hf(local, hf, arch)
    if local_scaling["type"] != "default":
        raise ConfigError(f"{arch} with a scaled RoPE on the sliding layers is not supported by torchgraft")
    if fields["layer_types"] is None and fields["sliding_window"] is not None:  # 4.x: a pattern
        every = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
        fields["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                 for i in range(fields["n_layer"])]
    return {**fields, "rope_local_base": local_base}


def _gemma3_to_hf(cfg: Any) -> dict[str, Any]:
    out = _gemma2_to_hf(cfg)
    out["rope_parameters"] = {"full_attention": rope_to_hf(cfg.rope_base, cfg.rope_scaling),
                              "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base}}
    return out


def _phi3_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_activation(hf, arch, ("silu",))
    partial = rope_params(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return {**common_from_hf(hf, arch), "layer_types": None, "partial_rotary_factor": float(partial)}


def _phi3_to_hf(cfg: Any) -> dict[str, Any]:
    out = {**common_to_hf(cfg), "hidden_act": "silu"}
    del out["layer_types"]
    out["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
    orig = cfg.rope_scaling.original_max_position_embeddings
    out["original_max_position_embeddings"] = orig or cfg.block_size
    if cfg.rope_scaling.type == "longrope":
        out["rope_parameters"].setdefault("original_max_position_embeddings", orig or cfg.block_size)
    return out


def _olmo2_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_activation(hf, arch, ("silu",))
    return common_from_hf(hf, arch, window=False)


def _olmo2_to_hf(cfg: Any) -> dict[str, Any]:
    out = {**common_to_hf(cfg), "hidden_act": "silu", "attention_bias": False}
    for k in ("sliding_window", "layer_types"):
        del out[k]
    return out


def _smollm3_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    check_activation(hf, arch, ("silu",))
    fields = common_from_hf(hf, arch)
    n = fields["n_layer"]
    nope = hf.get("no_rope_layers") or [int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
    return {**fields, "no_rope_layers": [int(x) for x in nope]}


def _smollm3_to_hf(cfg: Any) -> dict[str, Any]:
    return {**common_to_hf(cfg), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "no_rope_layers": list(cfg.no_rope_layers), "use_sliding_window": cfg.sliding_window is not None}


SPECS = [
    decoder_spec("qwen2", "qwen2", "Qwen2ForCausalLM", _qwen2_from_hf, _qwen2_to_hf),
    decoder_spec("qwen3", "qwen3", "Qwen3ForCausalLM", _qwen3_from_hf, _qwen3_to_hf),
    decoder_spec("mistral", "mistral", "MistralForCausalLM", _mistral_from_hf, _mistral_to_hf),
    decoder_spec("gemma2", "gemma2", "Gemma2ForCausalLM", _gemma_from_hf, _gemma2_to_hf, GEMMA_NORMS),
    decoder_spec("gemma3_text", "gemma3", "Gemma3ForCausalLM", _gemma3_from_hf, _gemma3_to_hf, GEMMA_NORMS),
    decoder_spec("phi3", "phi3", "Phi3ForCausalLM", _phi3_from_hf, _phi3_to_hf),
    decoder_spec("olmo2", "olmo2", "Olmo2ForCausalLM", _olmo2_from_hf, _olmo2_to_hf, OLMO2_NORMS),
    decoder_spec("smollm3", "smollm3", "SmolLM3ForCausalLM", _smollm3_from_hf, _smollm3_to_hf),
]

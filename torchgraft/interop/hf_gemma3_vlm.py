"""Gemma 3 multimodal checkpoints (`Gemma3ForConditionalGeneration`, model_type "gemma3": gemma-3-4b/12b/
27b) -> torchgraft's text-only `gemma3` family.

Such a directory holds the text model under `language_model.model.` (the Hub layout, and what
transformers 5.x `save_pretrained` writes; `model.language_model.` is also read), its settings under
`config.json`'s `text_config`, plus a SigLIP `vision_tower.*` and a `multi_modal_projector.*`.
torchgraft loads the text model only: the vision tower and projector are dropped, with a warning
(`VisionTowerDroppedWarning`), and the load report lists them as skipped. `save_hf` of the loaded
model writes a text-only `Gemma3ForCausalLM` (the family's own layout, `hf_decoders.py`); images
can then no longer be given to it.
"""
from __future__ import annotations

import warnings
from typing import Any

from torchgraft.errors import ConfigError
from torchgraft.interop.hf_decoders import _DERIVED, GEMMA_NORMS, _gemma3_from_hf, _gemma3_to_hf, rename_rules
from torchgraft.interop.hf_spec import HFSpec, Rule, copy

ARCH = "Gemma3ForConditionalGeneration"
PREFIXES = ("language_model.model.", "model.language_model.")

# transformers' Gemma3TextConfig defaults: Hub config.json files store only the fields that differ
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10000.0, "tie_word_embeddings": True,
}


class VisionTowerDroppedWarning(UserWarning):
    """A multimodal checkpoint was loaded as its text model; its vision tower is not part of it."""


def _from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"config.json of this {arch} has no 'text_config' object; the file is incomplete")
    warnings.warn(f"{arch}: loading the text model only; the vision tower and multi-modal projector are "
                  "dropped (save_hf writes a text-only Gemma3ForCausalLM)", VisionTowerDroppedWarning, stacklevel=2)
    merged = {**TEXT_DEFAULTS, **text}
    if "tie_word_embeddings" in hf:  # the outer config decides the head (transformers ties it there)
        merged["tie_word_embeddings"] = hf["tie_word_embeddings"]
    return _gemma3_from_hf(merged, arch)


def _rules(cfg: Any, p: str, arch: str) -> list[Rule]:
    """The text model's tensors under prefix `p`; an untied head sits next to it
    (`language_model.lm_head.weight` in the Hub layout, `lm_head.weight` in transformers 5.x's)."""
    head = "language_model.lm_head.weight" if p == PREFIXES[0] else "lm_head.weight"
    return [copy(head, "lm_head.weight") if r.ours == ("lm_head.weight",) else r
            for r in rename_rules(GEMMA_NORMS)(cfg, p, arch)]


SPEC = HFSpec(model_type="gemma3", family="gemma3", architectures=(ARCH,), config_from_hf=_from_hf,
              # save_hf takes the text-only gemma3 spec (first in the list); this one reads only
              config_to_hf=lambda cfg: ("Gemma3ForCausalLM", _gemma3_to_hf(cfg)), rules=_rules,
              prefixes={ARCH: PREFIXES}, anchor="embed_tokens.weight",
              derived=(*_DERIVED, r"^(model\.)?(vision_tower|multi_modal_projector)\.",
                       r"^language_model\.lm_head\.weight$"))

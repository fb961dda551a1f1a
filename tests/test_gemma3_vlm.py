"""Gemma 3 multimodal checkpoints (`Gemma3ForConditionalGeneration`) load as the text-only gemma3
family: logits equal to transformers' multimodal model on text (left-padded, fp32 1e-4), the vision
tower is dropped with a warning, and `save_hf` writes a text-only `Gemma3ForCausalLM` with the same
logits. Also: the `model.language_model.` layout and a Hub-style config.json holding only the
text fields that differ from transformers' defaults."""
from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

import torchgraft
from torchgraft.interop.hf import load_hf_with_report, save_hf
from torchgraft.interop.hf_gemma3_vlm import VisionTowerDroppedWarning

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()

from test_hf_parity import _randomize  # noqa: E402

VOCAB = 300  # the last three ids are the image / begin / end-of-image tokens
TOL = 1e-4  # fp32, width 32, 2 layers (as tests/test_decoder_families.py)
TEXT = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64, head_dim=16,
            query_pre_attn_scalar=12, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=28,
              patch_size=14)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    cfg = T.Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4, image_token_index=299,
                         boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = _randomize(T.Gemma3ForConditionalGeneration(cfg))
    path = tmp_path_factory.mktemp("gemma3-vlm")
    model.save_pretrained(path)
    return path, model


def _batch():
    ids = torch.randint(1, 297, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _compare(ours, hf) -> None:
    ids, mask, pos = _batch()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=pos)
        b = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert_close(a[real], b[real], rtol=TOL, atol=TOL)


def _load(path):
    with pytest.warns(VisionTowerDroppedWarning, match="vision tower"):
        return load_hf_with_report(path)


def test_text_model_loads_with_transformers_logits(vlm):
    path, hf = vlm
    ours, report = _load(path)
    assert type(ours).__name__ == "Gemma3"
    assert report.loaded == len(ours.state_dict())
    dropped = [k for k in report.skipped if k.startswith(("vision_tower.", "multi_modal_projector."))]
    n_vision = sum(1 for k in hf.state_dict() if ".vision_tower." in k or ".multi_modal_projector." in k)
    assert n_vision and len(dropped) == n_vision
    _compare(ours, hf)


def test_save_hf_writes_text_only_causal_lm(vlm, tmp_path):
    path, hf = vlm
    ours, _ = _load(path)
    save_hf(ours, tmp_path / "text")
    cfg = json.loads((tmp_path / "text" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "text").eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    ids, mask, pos = _batch()
    with torch.no_grad():
        a = back(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert_close(a[mask.bool()], b[mask.bool()], rtol=TOL, atol=TOL)


def test_model_language_model_layout_and_hub_style_config(vlm, tmp_path):
    """Tensors under `model.language_model.` (transformers' in-memory names) and a config.json whose
    text_config omits the fields equal to Gemma3TextConfig's defaults load the same."""
    from safetensors.torch import load_file, save_file

    path, hf = vlm
    state = load_file(str(path / "model.safetensors"))
    renamed = {k.replace("language_model.model.", "model.language_model.", 1)
               .replace("vision_tower.", "model.vision_tower.", 1) if not k.startswith("model.") else k: v
               for k, v in state.items()}
    assert any(k.startswith("model.language_model.") for k in renamed)
    (tmp_path / "m").mkdir()
    save_file(renamed, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    defaults = T.Gemma3TextConfig().to_dict()
    cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if defaults.get(k) != v}
    assert "rms_norm_eps" not in cfg["text_config"] and "hidden_size" in cfg["text_config"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ours, _ = _load(tmp_path / "m")
    _compare(ours, hf)


def test_no_text_config_is_a_clear_error(vlm, tmp_path):
    import shutil

    from torchgraft.errors import ConfigError

    path, _ = vlm
    shutil.copytree(path, tmp_path / "bad")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["text_config"]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="text_config"):
        torchgraft.load_hf(tmp_path / "bad")

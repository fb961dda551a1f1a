"""Bad Hugging Face input gives one clear TorchgraftError line; strict=False reports what it ignored."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import torchgraft
from torchgraft.errors import CheckpointError, ConfigError, TorchgraftError
from torchgraft.interop.hf import load_hf_with_report
from torchgraft.testing import assert_close_computed, transformer_tol

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()


@pytest.fixture
def gpt2_dir(tmp_path):
    cfg = T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                       bos_token_id=0, eos_token_id=0)
    T.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    return tmp_path


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    ts = load_file(d / "model.safetensors")
    fn(ts)
    save_file(ts, d / "model.safetensors", metadata={"format": "pt"})


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert isinstance(e.value, TorchgraftError) and "\n" not in msg
    return msg


def test_missing_config_json(tmp_path):
    with pytest.raises(CheckpointError) as e:
        torchgraft.load_hf(tmp_path)
    assert "no config.json" in _one_line(e)
    with pytest.raises(CheckpointError, match="does not exist"):
        torchgraft.load_hf(tmp_path / "nope")


def test_unsupported_architecture(gpt2_dir):
    _edit_config(gpt2_dir, architectures=["T5ForConditionalGeneration"], model_type="t5")
    with pytest.raises(ConfigError) as e:
        torchgraft.load_hf(gpt2_dir)
    msg = _one_line(e)
    assert "T5ForConditionalGeneration" in msg and "GPT2LMHeadModel" in msg


def test_unsupported_settings(gpt2_dir):
    _edit_config(gpt2_dir, activation_function="mish")
    with pytest.raises(ConfigError, match="activation_function='mish'"):
        torchgraft.load_hf(gpt2_dir)
    _edit_config(gpt2_dir, activation_function="gelu_new", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        torchgraft.load_hf(gpt2_dir)


def test_llama_rope_scaling_rejected(tmp_path):
    cfg = T.LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        vocab_size=50)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    _edit_config(tmp_path, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                            "long_factor": [1.0] * 4, "original_max_position_embeddings": 8})
    with pytest.raises(ConfigError, match="RoPE scaling 'longrope'"):
        torchgraft.load_hf(tmp_path)


def test_missing_tensor_is_named(gpt2_dir):
    _edit_tensors(gpt2_dir, lambda ts: ts.pop("transformer.h.0.mlp.c_fc.weight"))
    with pytest.raises(CheckpointError) as e:
        torchgraft.load_hf(gpt2_dir)
    assert "transformer.h.0.mlp.c_fc.weight" in _one_line(e)


def test_shape_mismatch(gpt2_dir):
    _edit_config(gpt2_dir, vocab_size=60)
    with pytest.raises(CheckpointError) as e:
        torchgraft.load_hf(gpt2_dir)
    assert "tok_emb.weight" in _one_line(e) and "(50, 16)" in str(e.value)


def test_extra_tensor_strict_and_lenient(gpt2_dir):
    def add(ts):
        ts["transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16)  # old-style causal mask: derivable
        ts["score.weight"] = torch.zeros(3, 16)  # unknown head: not derivable

    _edit_tensors(gpt2_dir, add)
    with pytest.raises(CheckpointError) as e:
        torchgraft.load_hf(gpt2_dir)
    msg = _one_line(e)
    assert "score.weight" in msg and "strict=False" in msg and "attn.bias" not in msg
    model, report = load_hf_with_report(gpt2_dir, strict=False)
    assert report.ignored == ["score.weight"]
    assert report.skipped == ["transformer.h.0.attn.bias"]
    assert "ignored" in report.summary()


def test_gpt2_without_prefix_loads(gpt2_dir):
    """Old GPT-2 files (like the original `gpt2` upload) have no `transformer.` prefix."""
    ref = torchgraft.load_hf(gpt2_dir)

    def strip(ts):
        for k in list(ts):
            if k.startswith("transformer."):
                ts[k[len("transformer."):]] = ts.pop(k)

    _edit_tensors(gpt2_dir, strip)
    model = torchgraft.load_hf(gpt2_dir)
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))


def test_save_hf_rejects_what_hf_cannot_hold(tmp_path):
    rope_gpt = torchgraft.build("gpt-tiny", positions="rope")
    with pytest.raises(ConfigError, match="positions='rope'"):
        torchgraft.save_hf(rope_gpt, tmp_path)
    model = torchgraft.build("gpt-tiny")
    model.blocks[0].attn.q_proj.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, 64)))
    with pytest.raises(ConfigError, match="lora_A.*merge LoRA"):
        torchgraft.save_hf(model, tmp_path)
    with pytest.raises(ConfigError, match="no .config"):
        torchgraft.save_hf(torch.nn.Linear(2, 2), tmp_path)


def test_cli_error_is_one_line(tmp_path, capsys):
    from torchgraft.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "model_type": "gpt2"}))
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path), str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_bert_pretraining_checkpoint_needs_strict_false(tmp_path):
    """bert-base-uncased style files (BertForMaskedLM) load as the encoder once `cls.*` is dropped."""
    cfg = T.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                       vocab_size=50, max_position_embeddings=16)
    hf = T.BertForMaskedLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="cls.predictions"):
        torchgraft.load_hf(tmp_path)
    model, report = load_hf_with_report(tmp_path, strict=False)
    assert model.config.task == "none" and model.pooler is None
    assert report.ignored and all(k.startswith("cls.") for k in report.ignored)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert_close_computed(model(ids), hf.bert(ids).last_hidden_state, transformer_tol(model.config, 7))


def test_tied_model_with_duplicate_head_in_file(tmp_path):
    """Some uploads store lm_head.weight although tie_word_embeddings is true; it is the same matrix."""
    cfg = T.LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        vocab_size=50, tie_word_embeddings=True)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    _edit_tensors(tmp_path, lambda ts: ts.__setitem__("lm_head.weight", ts["model.embed_tokens.weight"].clone()))
    model, report = load_hf_with_report(tmp_path)
    assert model.lm_head is None and "lm_head.weight" in report.skipped

"""Parity with `transformers`: random-weight HF models from small configs, saved locally, loaded with
`torchgraft.load_hf`; and torchgraft models exported with `save_hf`, loaded by `from_pretrained`."""
from __future__ import annotations

import json

import pytest
import torch

import torchgraft
from torchgraft.interop.hf import load_hf_with_report
from torchgraft.testing import assert_close_computed, transformer_tol

pytestmark = pytest.mark.numeric  # float comparisons: re-run under a forced CPU capability (docs/testing.md)

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()

VOCAB = 97


def _gpt2_cfg(**kw):
    return T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                        bos_token_id=0, eos_token_id=0, **kw)


def _llama_cfg(**kw):
    base = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64, rope_theta=500.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    base.update(kw)
    return T.LlamaConfig(**base)


def _bert_cfg(**kw):
    return T.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        vocab_size=VOCAB, max_position_embeddings=40, **kw)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """HF init leaves biases and norms at 0/1; perturb every tensor so a swapped name would show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hf_model(cls, cfg, path, **save_kw):
    torch.manual_seed(0)
    model = _randomize(cls(cfg))
    model.save_pretrained(path, **save_kw)
    return model


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))

DECODERS = {
    "gpt2": (T.GPT2LMHeadModel, _gpt2_cfg, {}),
    "gpt2-sharded": (T.GPT2LMHeadModel, _gpt2_cfg, {"max_shard_size": "20KB"}),
    "llama-gqa-untied": (T.LlamaForCausalLM, _llama_cfg, {}),
    "llama-tied-mha": (T.LlamaForCausalLM, lambda: _llama_cfg(num_key_value_heads=4, tie_word_embeddings=True,
                                                               rope_theta=10000.0), {}),
    "llama-head-dim": (T.LlamaForCausalLM, lambda: _llama_cfg(head_dim=16), {}),  # n_head*head_dim != C
    "llama-sharded-bias": (T.LlamaForCausalLM, lambda: _llama_cfg(attention_bias=True, mlp_bias=True,
                                                                   num_key_value_heads=1),
                           {"max_shard_size": "30KB"}),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_logits_match_transformers(name, tmp_path):
    cls, make_cfg, save_kw = DECODERS[name]
    hf = _hf_model(cls, make_cfg(), tmp_path, **save_kw)
    if "sharded" in name:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours, report = load_hf_with_report(tmp_path)
    assert not ours.training
    with torch.no_grad():
        tol = transformer_tol(ours.config, IDS.shape[1])  # ours and transformers: other kernels, same maths
        assert_close_computed(ours(IDS), hf(IDS).logits, tol)
    # padded batch: left padding + explicit positions, compared on real tokens only
    mask = torch.ones_like(IDS)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(IDS, attention_mask=mask, position_ids=pos)
        b = hf(IDS, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert_close_computed(a[real], b[real], tol)
    tied = hf.config.tie_word_embeddings
    assert ours.config.tie_embeddings == tied
    assert ("lm_head.weight" in ours.state_dict()) == (not tied)
    assert report.loaded == len(ours.state_dict())


def test_gpt2_base_model_loads_as_tied_lm(tmp_path):
    hf = _hf_model(T.GPT2Model, _gpt2_cfg(), tmp_path)
    ours = torchgraft.load_hf(tmp_path)
    with torch.no_grad():
        hidden = hf(IDS).last_hidden_state
        assert_close_computed(ours(IDS), hidden @ hf.wte.weight.T, transformer_tol(ours.config, IDS.shape[1]))


def _greedy_no_cache(model, ids, n):
    for _ in range(n):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied"])
def test_greedy_generation_identical(name, tmp_path):
    cls, make_cfg, _ = DECODERS[name]
    hf = _hf_model(cls, make_cfg(), tmp_path)
    hf.generation_config.eos_token_id = None
    ours = torchgraft.load_hf(tmp_path)
    prompt = IDS[:, :5]
    n = 16
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        mine = _greedy_no_cache(ours, prompt, n)
    assert ref.shape == (2, 5 + n)
    assert torch.equal(mine, ref)
    from torchgraft.generation import generate

    res = generate(ours, prompt, max_new_tokens=n, eos_token_id=None)  # KV-cache path
    assert res.tokens == ref[:, 5:].tolist()


@pytest.mark.parametrize("arch", ["BertModel", "BertForSequenceClassification", "BertForTokenClassification"])
def test_bert_matches_transformers(arch, tmp_path):
    cls = getattr(T, arch)
    kw = {} if arch == "BertModel" else {"num_labels": 3}
    hf = _hf_model(cls, _bert_cfg(**kw), tmp_path)
    ours = torchgraft.load_hf(tmp_path)
    mask = torch.ones_like(IDS)
    mask[1, 7:] = 0
    types = torch.zeros_like(IDS)
    types[:, 6:] = 1
    with torch.no_grad():
        out = hf(input_ids=IDS, attention_mask=mask, token_type_ids=types)
        mine = ours(IDS, attention_mask=mask, token_type_ids=types)
    if arch == "BertModel":
        real = mask.bool()
        assert_close_computed(mine[real], out.last_hidden_state[real], transformer_tol(ours.config, IDS.shape[1]))
        assert ours.config.task == "none" and ours.pooler is not None
    else:
        assert ours.config.num_labels == 3
        ref = out.logits if arch == "BertForSequenceClassification" else out.logits[mask.bool()]
        got = mine if arch == "BertForSequenceClassification" else mine[mask.bool()]
        assert_close_computed(got, ref, transformer_tol(ours.config, IDS.shape[1]))
    if arch == "BertForTokenClassification":
        assert ours.pooler is None  # HF builds it with add_pooling_layer=False


# ------------------------------------------------------------------ torchgraft -> HF -> torchgraft

EXPORTS = {
    "gpt": ("gpt-tiny", {}, T.AutoModelForCausalLM),
    "llama-gqa": ("llama-tiny", {}, T.AutoModelForCausalLM),
    "llama-tied": ("llama-tiny", {"tie_embeddings": True, "rope_base": 500000.0}, T.AutoModelForCausalLM),
    "bert": ("bert-tiny", {"vocab_size": 128, "block_size": 32}, T.AutoModel),
    "bert-cls": ("bert-tiny", {"vocab_size": 128, "block_size": 32, "task": "sequence_classification",
                               "num_labels": 4}, T.AutoModelForSequenceClassification),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_save_hf_loads_in_transformers(name, tmp_path):
    preset, overrides, auto = EXPORTS[name]
    ours = torchgraft.build(preset, **overrides).eval()
    _randomize(ours)
    torchgraft.save_hf(ours, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    hf = auto.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == cfg["architectures"][0]
    ids = IDS % ours.config.vocab_size
    with torch.no_grad():
        mine = ours(ids)
        out = hf(ids)
    ref = out.last_hidden_state if name == "bert" else out.logits
    assert_close_computed(mine, ref, transformer_tol(ours.config, ids.shape[1]))
    if hasattr(ours, "lm_head"):
        # tied weights are stored once and re-tied by transformers
        assert (ours.lm_head is None) == (hf.lm_head.weight is hf.get_input_embeddings().weight)
    back = torchgraft.load_hf(tmp_path)
    sd_a, sd_b = ours.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    assert back.config == ours.config


def test_save_hf_dtype_and_single_file(tmp_path):
    ours = torchgraft.build("llama-tiny").eval()
    torchgraft.save_hf(ours, tmp_path, dtype=torch.bfloat16)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert hf.dtype == torch.bfloat16
    back = torchgraft.load_hf(tmp_path)
    assert back.tok_emb.weight.dtype == torch.bfloat16
    assert torch.equal(back.tok_emb.weight, ours.tok_emb.weight.to(torch.bfloat16))
    f32 = torchgraft.load_hf(tmp_path, dtype=torch.float32)
    assert f32.tok_emb.weight.dtype == torch.float32
    assert f32.rotary.inv_freq.dtype == torch.float32

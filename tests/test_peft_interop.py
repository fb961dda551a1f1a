"""Adapters move between torchgraft and the real `peft` package in both directions, same outputs."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from torchgraft import peft as tp
from torchgraft.testing import assert_close_computed, transformer_tol

pytestmark = pytest.mark.numeric  # float comparisons: re-run under a forced CPU capability (docs/testing.md)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _ids():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def _perturb(named_params):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in named_params:
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


CASES = [
    ("llama", ["q_proj", "v_proj", "down_proj", "embed_tokens"], False),
    ("llama", ["q_proj", "o_proj", "embed_tokens"], True),
    ("gpt2", ["c_attn", "c_fc"], False),
    ("gpt2", ["c_attn", "c_proj"], True),
]


@pytest.mark.parametrize("arch,targets,dora", CASES, ids=[f"{a}-{'dora' if d else 'lora'}" for a, _, d in CASES])
def test_torchgraft_adapter_loads_in_peft(tmp_path, arch, targets, dora):
    base = _llama() if arch == "llama" else _gpt2()
    ref_base = copy.deepcopy(base)
    ids = _ids()
    tp.apply_lora(base, targets, rank=4, alpha=8, dora=dora)
    _perturb(base.named_parameters())
    with torch.no_grad():
        ours = base(ids).logits
        assert (ours - ref_base(ids).logits).abs().max() > 1e-3
    tp.save_adapter(base, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model = peft.PeftModel.from_pretrained(ref_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = theirs_model(ids).logits
    assert_close_computed(theirs, ours, transformer_tol(ref_base.config, ids.shape[1]))


@pytest.mark.parametrize("arch,targets,dora", CASES, ids=[f"{a}-{'dora' if d else 'lora'}" for a, _, d in CASES])
def test_peft_adapter_loads_in_torchgraft(tmp_path, arch, targets, dora):
    base = _llama() if arch == "llama" else _gpt2()
    ours_model = copy.deepcopy(base)
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora,
                              fan_in_fan_out=arch == "gpt2")
        pm = peft.get_peft_model(base, cfg).eval()
        _perturb(pm.named_parameters())  # non-zero B, moved magnitudes
        pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        theirs = pm(ids).logits
    layers = tp.load_adapter(ours_model, tmp_path / "adapter")
    assert len(layers) > 0
    with torch.no_grad():
        ours = ours_model(ids).logits
    tol = transformer_tol(ours_model.config, ids.shape[1])
    assert_close_computed(ours, theirs, tol)
    # merged weights agree with PEFT's merge_and_unload
    tp.merge(ours_model)
    merged_theirs = pm.merge_and_unload()
    with torch.no_grad():
        assert_close_computed(ours_model(ids).logits, merged_theirs(ids).logits, tol)


ZOO_CASES = [
    ("llama-tiny", ["q_proj", "v_proj", "down_proj", "tok_emb"], True),
    ("gpt-tiny", ["fc_in", "fc_out", "o_proj"], False),  # HF GPT-2 Conv1D: transposed, fan_in_fan_out
]


@pytest.mark.parametrize("name,targets,dora", ZOO_CASES, ids=[c[0] for c in ZOO_CASES])
def test_zoo_model_adapter_with_hf_names_both_ways(tmp_path, name, targets, dora):
    """A LoRA trained on a torchgraft zoo model loads in PEFT on its `save_hf` export, and back."""
    import torchgraft
    from torchgraft.interop.hf import save_hf

    ours = torchgraft.build(name).eval()
    save_hf(ours, tmp_path / "hf")
    ids = _ids()
    tp.apply_lora(ours, targets, rank=4, alpha=8, dora=dora)
    _perturb(ours.named_parameters())
    tp.save_adapter(ours, tmp_path / "ad", hf_names=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    with torch.no_grad():
        tol = transformer_tol(ours.config, ids.shape[1])
        assert_close_computed(pm(ids).logits, ours(ids), tol)
        pm.save_pretrained(tmp_path / "back")
    again = torchgraft.build(name).eval()
    with torch.no_grad():
        again.load_state_dict({k.replace(".base_layer", ""): v for k, v in ours.state_dict().items()
                               if ".lora_" not in k})
    layers = tp.load_adapter(again, tmp_path / "back", hf_names=True)
    assert sorted(layers) == sorted(tp.lora_layers(ours))
    with torch.no_grad():
        assert_close_computed(again(ids), ours(ids), tol)


def test_hf_names_refuses_fused_layers(tmp_path):
    import torchgraft
    from torchgraft.errors import ConfigError

    m = torchgraft.build("gpt-tiny")
    tp.apply_lora(m, ["q_proj"], rank=2)
    with pytest.raises(ConfigError, match="no one-to-one Hugging Face counterpart"):
        tp.save_adapter(m, tmp_path / "ad", hf_names=True)

"""LoRA / DoRA: injection on any model, trainable set, merge == unmerged, disabled == base, save/load."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchgraft
from torchgraft import peft as tp
from torchgraft.errors import CheckpointError, ConfigError
from torchgraft.testing import assert_close_computed, tolerance, transformer_tol

pytestmark = pytest.mark.numeric  # float comparisons: re-run under a forced CPU capability (docs/testing.md)


class UserModel(nn.Module):
    """Unregistered model with every supported layer kind."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv1x1 = nn.Conv2d(6, 6, 1)
        self.proj = nn.Linear(8 + 6, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, ids, img):
        e = self.emb(ids).mean(1)  # (B, 8)
        c = self.conv1x1(torch.relu(self.conv(img))).mean((2, 3))  # (B, 6)
        return self.out(torch.tanh(self.proj(torch.cat([e, c], -1))))


# UserModel: the longest sum is the 3x3x3 conv window (27 terms); conv, projection and output: depth 3
USER_TOL = tolerance(reduction=27, depth=3)


def _inputs(b=3):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (b, 7), generator=g), torch.randn(b, 3, 9, 9, generator=g)


def _randomize_adapters(model):
    with torch.no_grad():
        for layer in tp.lora_layers(model).values():
            for _, p in layer.adapter_parameters():
                p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("dora", [False, True])
def test_user_model_all_layer_kinds_merge_unmerge_disable(dora):
    m = UserModel().eval()
    ids, img = _inputs()
    base_out = m(ids, img)
    base_sd = {k: v.clone() for k, v in m.state_dict().items()}
    layers = tp.apply_lora(m, ["emb", "conv*", "proj"], rank=4, alpha=8, dora=dora)
    assert set(layers) == {"emb", "conv", "conv1x1", "proj"}
    assert isinstance(layers["emb"], tp.LoRAEmbedding) and isinstance(layers["conv"], tp.LoRAConv2d)
    # a fresh adapter is the identity (DoRA rescales by norm / norm: rounding)
    assert_close_computed(m(ids, img), base_out, USER_TOL)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert "proj.base_layer.weight" in m.state_dict() and "proj.lora_A.default.weight" in m.state_dict()
    _randomize_adapters(m)
    out = m(ids, img)
    assert (out - base_out).abs().max() > 1e-3  # the adapters do something
    with tp.disabled(m):
        assert torch.equal(m(ids, img), base_out)  # the base layers alone: the same ops
    tp.merge(m)
    assert_close_computed(m(ids, img), out, USER_TOL)
    assert not torch.equal(m.proj.base_layer.weight, base_sd["proj.weight"])
    with tp.disabled(m):  # disabling a merged model runs the base weights
        assert_close_computed(m(ids, img), base_out, USER_TOL)
    assert_close_computed(m(ids, img), out, USER_TOL)
    tp.unmerge(m)
    for k, v in base_sd.items():
        mod, _, leaf = k.rpartition(".")
        key = f"{mod}.base_layer.{leaf}" if mod in layers else k
        assert_close_computed(m.state_dict()[key], v, tolerance(reduction=4, depth=2), msg=key)  # W + BA - BA
    assert_close_computed(m(ids, img), out, USER_TOL)


def test_training_moves_only_adapters_and_lowers_loss():
    m = torchgraft.build("gpt-tiny")
    tp.apply_lora(m, ["q_proj", "v_proj", "fc_in"], rank=4, alpha=8)
    snap = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, m.config.vocab_size, (4, 33))
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for n, p in m.named_parameters():
        assert torch.equal(p, snap[n]) == (".lora_" not in n), n
    assert tp.trainable_fraction(m) < 0.1


def test_gpt_dora_unload_and_tied_embedding_wrapper():
    m = torchgraft.build("gpt-tiny").eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 10))
    tp.apply_lora(m, ["blocks.*.attn.*_proj", "fc_out"], rank=2, alpha=4, dora=True)
    _randomize_adapters(m)
    out = m(ids)
    tp.unload(m)
    assert not tp.lora_layers(m) and "blocks.0.attn.q_proj.weight" in m.state_dict()
    assert all(p.requires_grad for p in m.parameters())
    assert_close_computed(m(ids), out, transformer_tol(m.config, 10))
    # an embedding wrapper still exposes .weight, so a tied output head keeps working
    m2 = torchgraft.build("gpt-tiny").eval()
    base = m2(ids)
    tp.apply_lora(m2, ["tok_emb"], rank=2, alpha=4)
    assert m2.tok_emb.weight is m2.tok_emb.base_layer.weight
    assert torch.equal(m2(ids), base)  # A starts at zero: the lookup adds exact zeros


def test_rslora_scaling_and_bad_targets():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    layers = tp.apply_lora(m, ["0"], rank=4, alpha=8, use_rslora=True)
    assert layers["0"].scaling == pytest.approx(8 / 2)
    with pytest.raises(ConfigError, match="already has LoRA"):
        tp.apply_lora(m, ["2"])
    with pytest.raises(ConfigError, match="target 'nope' matches no"):
        tp.apply_lora(nn.Sequential(nn.Linear(2, 2)), ["nope"])
    with pytest.raises(ConfigError, match="none is Linear/Conv2d/Embedding"):
        tp.apply_lora(nn.Sequential(nn.ReLU()), ["0"])
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        tp.merge(nn.Linear(2, 2))


@pytest.mark.parametrize("dora", [False, True])
def test_save_load_roundtrip_peft_names(tmp_path, dora):
    m = UserModel().eval()
    tp.apply_lora(m, ["emb", "conv", "proj"], rank=3, alpha=6, dora=dora)
    _randomize_adapters(m)
    ids, img = _inputs()
    out = m(ids, img)
    tp.save_adapter(m, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["use_dora"] is dora
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    assert "base_model.model.proj.lora_A.weight" in keys and "base_model.model.emb.lora_embedding_B" in keys
    assert ("base_model.model.conv.lora_magnitude_vector" in keys) is dora
    fresh = UserModel().eval()
    fresh.load_state_dict({k: v for k, v in UserModel().state_dict().items()})
    fresh.load_state_dict(_base_state(m))
    tp.load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh(ids, img), out)  # the same weights, bitwise, in the same modules


def _base_state(m):
    return {k.replace(".base_layer", ""): v for k, v in m.state_dict().items() if ".lora_" not in k}


def test_load_adapter_errors(tmp_path):
    m = UserModel()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        tp.load_adapter(m, tmp_path)
    tp.apply_lora(m, ["proj"], rank=2)
    tp.save_adapter(m, tmp_path / "a")
    other = nn.Module()
    other.proj = nn.Linear(14, 16)
    other.extra = nn.Linear(16, 16)
    tp.apply_lora(other, ["proj", "extra"], rank=2)
    with pytest.raises(CheckpointError, match="does not fit this model: 2 missing"):
        tp.load_adapter(other, tmp_path / "a")
    small = nn.Module()
    small.proj = nn.Linear(14, 8)
    with pytest.raises(CheckpointError, match="shape"):
        tp.load_adapter(small, tmp_path / "a")

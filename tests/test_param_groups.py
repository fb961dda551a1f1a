"""param_groups: no decay for norms/biases/embeddings, layer-wise LR decay, lr_mult."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchgraft
from torchgraft.errors import ConfigError
from torchgraft.tools.param_groups import layer_ids


def _lookup(groups):
    return {n: g for g in groups for n in g["param_names"]}


def test_gpt_decay_split_and_layer_decay():
    m = torchgraft.build("gpt-tiny")  # 2 blocks
    groups = torchgraft.param_groups(m, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    by = _lookup(groups)
    # every trainable parameter exactly once
    assert sorted(by) == sorted(n for n, _ in m.named_parameters())
    assert by["blocks.0.attn.q_proj.weight"]["weight_decay"] == 0.1
    assert by["tok_emb.weight"]["weight_decay"] == 0.0  # embedding
    assert by["blocks.1.attn_norm.weight"]["weight_decay"] == 0.0  # norm
    # L = 2: embeddings layer 0 -> 0.5**3, block 0 -> 0.5**2, block 1 -> 0.5, final norm -> 1
    assert by["tok_emb.weight"]["lr"] == pytest.approx(0.125)
    assert by["blocks.0.mlp.fc_in.weight"]["lr"] == pytest.approx(0.25)
    assert by["blocks.1.mlp.fc_in.weight"]["lr"] == pytest.approx(0.5)
    assert by["norm.weight"]["lr"] == pytest.approx(1.0)
    for g in groups:
        assert g["lr"] == pytest.approx(g["lr_scale"])
    # usable by a torch optimizer as is
    opt = torch.optim.AdamW(groups)
    m(torch.randint(0, 256, (1, 8))).sum().backward()
    opt.step()


def test_resnet_style_and_bert_style_layer_ids():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)
            self.bn1 = nn.BatchNorm2d(4)
            self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))
            self.layer2 = nn.Sequential(nn.Conv2d(4, 4, 1))
            self.fc = nn.Linear(4, 2)

    ids, n = layer_ids(Tiny())
    assert n == 3
    assert ids["conv1.weight"] == 0 and ids["bn1.weight"] == 0
    assert ids["layer1.0.weight"] == 1 and ids["layer1.1.weight"] == 2 and ids["layer2.0.weight"] == 3
    assert ids["fc.weight"] == 4

    class HF(nn.Module):  # encoder.layer.{i} naming
        def __init__(self):
            super().__init__()
            self.embeddings = nn.Embedding(5, 4)
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(nn.Linear(4, 4) for _ in range(12))
            self.classifier = nn.Linear(4, 2)

    ids, n = layer_ids(HF())
    assert n == 12 and ids["encoder.layer.10.weight"] == 11 and ids["encoder.layer.2.weight"] == 3
    assert ids["classifier.weight"] == 13 and ids["embeddings.weight"] == 0


def test_lr_mult_and_frozen_params_left_out():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    torchgraft.freeze(m, "0")
    groups = torchgraft.param_groups(m, lr=0.1, weight_decay=0.01, lr_mult={"2.*": 10.0})
    by = _lookup(groups)
    assert "0.weight" not in by
    assert by["2.weight"]["lr"] == pytest.approx(1.0) and by["2.weight"]["weight_decay"] == 0.01
    assert by["2.bias"]["weight_decay"] == 0.0 and by["1.weight"]["weight_decay"] == 0.0
    assert by["1.weight"]["lr"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="lr_mult pattern 'nope' matches no"):
        torchgraft.param_groups(m, lr=0.1, lr_mult={"nope": 2.0})
    with pytest.raises(ConfigError, match="layer_decay"):
        torchgraft.param_groups(m, lr=0.1, layer_decay=1.5)

"""freeze / unfreeze: frozen parameters and BatchNorm statistics stay bitwise unchanged while training."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchgraft
from torchgraft.errors import ConfigError
from torchgraft.tools.freeze import GradualUnfreeze, is_frozen_bn, trainable_summary


class ConvNet(nn.Module):
    """User-defined (unregistered) CNN with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer1(self.stem(x)).mean((2, 3)))


def _train(model, steps=5, opt_params=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(opt_params if opt_params is not None else model.parameters(), lr=1e-2,
                            weight_decay=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g)
        y = torch.randint(0, 3, (4,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_frozen_params_and_bn_stats_bitwise_unchanged():
    m = ConvNet()
    names = torchgraft.freeze(m, ["stem"])
    assert names == ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    # the optimizer holds every parameter, with weight decay: frozen ones must still not move
    _train(m)
    after = m.state_dict()
    for k in before:
        if k.startswith("stem."):
            assert torch.equal(after[k], before[k]), k  # weights, running_mean/var, num_batches_tracked
    assert not torch.equal(after["layer1.0.weight"], before["layer1.0.weight"])
    assert not torch.equal(after["layer1.1.running_mean"], before["layer1.1.running_mean"])
    assert int(after["layer1.1.num_batches_tracked"]) == 5
    # model.train() does not put the frozen BN back into training: a forward leaves it in eval
    m.train()
    m(torch.randn(2, 3, 8, 8))
    assert m.stem[1].training is False and m.layer1[1].training is True
    assert is_frozen_bn(m.stem[1]) and not is_frozen_bn(m.layer1[1])


def test_parameter_globs_and_unfreeze_restores_bn():
    m = ConvNet()
    torchgraft.freeze(m)  # everything
    assert trainable_summary(m)["trainable"] == 0
    torchgraft.unfreeze(m, ["head.*"])
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    torchgraft.unfreeze(m, "layer1.1.weight")  # one BN parameter trainable again -> BN trains again
    assert not is_frozen_bn(m.layer1[1]) and is_frozen_bn(m.stem[1])
    before = m.layer1[1].running_mean.clone()
    _train(m, steps=1)
    assert not torch.equal(m.layer1[1].running_mean, before)


def test_bad_pattern_is_a_clear_error():
    with pytest.raises(ConfigError, match="pattern 'stme' matches no module.*did you mean 'stem'"):
        torchgraft.freeze(ConvNet(), ["stme"])


def test_freeze_registered_gpt_blocks():
    m = torchgraft.build("gpt-tiny")
    torchgraft.freeze(m, ["tok_emb", "pos_emb", "blocks.0"])
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert "blocks.0.attn.q_proj.weight" in frozen and "blocks.1.attn.q_proj.weight" not in frozen
    snap = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, m.config.vocab_size, (2, 16))
    for _ in range(3):
        loss = nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        assert torch.equal(p, snap[n]) == (n in frozen), n


def test_gradual_unfreeze_callback_adds_params_to_optimizer():
    m = ConvNet()
    torchgraft.freeze(m)
    cb = GradualUnfreeze({0: ["head"], 2: ["layer1"], 4: ["*"]})
    cb.unfreeze_due(m, 0)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    stem_before = m.stem[0].weight.clone()

    class FakeTrainer:  # the attributes the callback reads
        model, optimizer, step = m, opt, 0

    t = FakeTrainer()
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        t.step = step
        cb.on_step_start(t)
        loss = m(torch.randn(2, 3, 8, 8, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 3:
            assert torch.equal(m.stem[0].weight, stem_before)
    assert [s for s, _ in cb.events] == [0, 2, 4]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    assert not torch.equal(m.stem[0].weight, stem_before)

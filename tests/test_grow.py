"""grow(): deeper and wider models compute the same function and keep training. New identity blocks
add exact zeros (bitwise equal); widening re-sums split weights, so it is equal up to the rounding of
the widened sums (torchgraft.testing)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchgraft
from torchgraft.errors import ConfigError
from torchgraft.testing import assert_close_computed, model_tol, transformer_tol


def _lm_loss(m, ids):
    return nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def _train(model, loss_fn, steps=12, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_grow_transformer_deeper_and_wider(name):
    m = torchgraft.build(name).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.config.vocab_size, (4, 33), generator=g)
    _train(m, lambda mm: _lm_loss(mm, ids), steps=5)  # a "trained" model, not a fresh init
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    big, report = torchgraft.grow(m, depth=2, width=2.0, example_inputs=ids)
    tol = transformer_tol(big.config, ids.shape[1])
    with torch.no_grad():
        scale = m(ids).abs().max().item()
    assert report.max_abs_diff is not None and report.max_abs_diff <= tol * scale
    assert len(big.blocks) == 4 and big.config.n_layer == 4
    assert big.config.intermediate_size == 2 * (m.config.intermediate_size or 4 * m.config.n_embd)
    assert report.params_after > report.params_before
    kinds = [c["kind"] for c in report.changes]
    assert kinds.count("width") == 2 and kinds.count("depth") == 1
    with torch.no_grad():
        assert_close_computed(big.eval()(ids), m(ids), tol)
    for k, v in m.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])
    # the grown model keeps training from where the small one was
    start = _lm_loss(big, ids).item()
    losses = _train(big, lambda mm: _lm_loss(mm, ids))
    assert losses[-1] < start - 0.1
    # the new (zero-initialised) output projections learned something
    assert big.blocks[1].attn.o_proj.weight.abs().max() > 0


def test_grow_resnet_deeper_train_mode_too():
    m = torchgraft.build("resnet18", num_classes=4, width=16)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    big, report = torchgraft.grow(m, depth=1, example_inputs=x)
    assert report.max_abs_diff == 0 and big.config.layers == (3, 3, 3, 3)  # the new blocks add exact zeros
    assert [len(getattr(big, f"layer{i}")) for i in range(1, 5)] == [3, 3, 3, 3]
    # zeroed BN gamma: identity even with batch statistics
    m.train(), big.train()
    assert torch.equal(big(x), m(x))
    ce = lambda mm: nn.functional.cross_entropy(mm(x), y)  # noqa: E731
    losses = _train(big, ce, steps=8)
    assert losses[-1] < losses[0]
    # more new blocks than a stage has: copies of the stride-1 block, never of the downsampling one
    big3, report3 = torchgraft.grow(m, depth=3, example_inputs=x)
    assert report3.max_abs_diff == 0 and big3.config.layers == (5, 5, 5, 5)


class UserMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x)


class UserCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 2 * 2, 4))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("cls,shape", [(UserMLP, (16, 10)), (UserCNN, (16, 1, 10, 10))])
def test_grow_user_models_net2net(cls, shape):
    torch.manual_seed(0)
    m = cls()
    x = torch.randn(*shape)
    y = torch.randint(0, 3, (shape[0],))
    ce = lambda mm: nn.functional.cross_entropy(mm(x), y)  # noqa: E731
    _train(m, ce, steps=3)  # moves BN statistics too
    big, report = torchgraft.grow(m, depth=1, width=2.0, example_inputs=x)
    with torch.no_grad():
        assert report.max_abs_diff <= model_tol(big) * m.eval()(x).abs().max().item()
    widths = [c for c in report.changes if c["kind"] == "width"]
    assert widths and all(c["after"] == 2 * c["before"] for c in widths)
    assert any(c["kind"] == "depth" for c in report.changes)
    assert report.params_after > report.params_before
    start = ce(big.train()).item()
    losses = _train(big, ce, steps=10)
    assert losses[-1] < start
    # copies of a unit start identical; the uneven split of outgoing weights lets most of them diverge
    fresh, _ = torchgraft.grow(m, width=2.0)
    n_old = m.net[0].weight.shape[0]
    assert len(torch.unique(fresh.net[0].weight.detach(), dim=0)) == n_old
    assert len(torch.unique(big.net[0].weight.detach(), dim=0)) > 1.5 * n_old


def test_grow_errors():
    with pytest.raises(ConfigError, match="grow needs depth="):
        torchgraft.grow(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="factor > 1"):
        torchgraft.grow(UserMLP(), width=0.5)
    with pytest.raises(ConfigError, match="don't know how to deepen"):
        torchgraft.grow(nn.Linear(2, 2), depth=1)
    with pytest.raises(ConfigError, match="cannot widen Linear: no Linear/Conv2d output"):
        torchgraft.grow(nn.Linear(2, 2), width=2.0)  # traced: nothing reads its output but the caller

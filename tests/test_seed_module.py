"""The seed document's own module, exactly as written there (two convs, two linears, F.relu,
F.max_pool2d and a fixed `x.view(-1, 64 * 5 * 5)`), through every module tool at top level:
summary, transfer, freeze, param_groups, LoRA and grow, each checked with numbers.

Input 3x26x26: conv 3x3 26 -> 24, pool -> 12, conv 3x3 -> 10, pool -> 5, so 64 * 5 * 5 features."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraft
from torchgraft.testing import assert_close_computed, tolerance

pytestmark = pytest.mark.numeric


class MyModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * 5 * 5, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = x.view(-1, 64 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return x


# hand counts: weights + biases
CONV1, CONV2 = 3 * 32 * 9 + 32, 32 * 64 * 9 + 64
FC1, FC2 = 1600 * 128 + 128, 128 * 10 + 10
# the seed net's longest reduction is fc1's 1600 inputs; 4 layers deep
TOL = tolerance(reduction=1600, depth=4)


def _x(n=4, seed=1):
    return torch.randn(n, 3, 26, 26, generator=torch.Generator().manual_seed(seed))


def test_summary_shapes_and_counts():
    s = torchgraft.summary(MyModule(), input_size=(2, 3, 26, 26))
    rows = {r.name: r for r in s.rows}
    assert rows["conv1"].output_shape == [2, 32, 24, 24] and rows["conv2"].output_shape == [2, 64, 10, 10]
    assert rows["fc1"].output_shape == [2, 128] and s.output_shape == [2, 10]
    assert [rows[n].parameters for n in ("conv1", "conv2", "fc1", "fc2")] == [CONV1, CONV2, FC1, FC2]
    assert s.parameters == s.trainable_parameters == CONV1 + CONV2 + FC1 + FC2 == 225_610


def test_transfer_into_a_new_head():
    src = MyModule()
    dst = MyModule()
    dst.fc2 = nn.Linear(128, 5)  # 5 classes instead of 10
    head = dst.fc2.weight.clone()
    report = torchgraft.transfer(src, dst)
    assert sorted(report.copied) == ["conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight",
                                     "fc1.bias", "fc1.weight"]
    assert sorted(report.mismatched) == ["fc2.bias", "fc2.weight"]
    assert torch.equal(dst.fc2.weight, head)
    # same features up to the head: same kernels on the same inputs, so bitwise equal
    feats = {}
    for m, key in ((src, "src"), (dst, "dst")):
        m.fc1.register_forward_hook(lambda _m, _i, out, key=key: feats.__setitem__(key, out))
        m(_x())
    assert torch.equal(feats["src"], feats["dst"])


def test_freeze_convs_then_train_leaves_them_bitwise_unchanged():
    m = MyModule()
    frozen = torchgraft.freeze(m, ["conv1", "conv2"])
    assert sorted(frozen) == ["conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(m(_x()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert m.conv1.weight.grad is None and m.conv2.bias.grad is None
    for k in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"):
        assert torch.equal(m.state_dict()[k], before[k]), k
    assert not torch.equal(m.fc1.weight, before["fc1.weight"])
    assert losses[-1] < losses[0]
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == FC1 + FC2


def test_param_groups_split_decay_and_scale_the_head():
    m = MyModule()
    groups = torchgraft.param_groups(m, lr=1e-3, weight_decay=0.1, lr_mult={"fc2.*": 10.0})
    by = {n: g for g in groups for n in g["param_names"]}
    assert set(by) == {n for n, _ in m.named_parameters()}
    assert by["conv1.weight"]["weight_decay"] == 0.1 and by["conv1.bias"]["weight_decay"] == 0.0
    assert by["fc2.weight"]["lr"] == pytest.approx(1e-2) and by["fc1.weight"]["lr"] == pytest.approx(1e-3)
    assert sum(p.numel() for g in groups for p in g["params"]) == 225_610
    torch.optim.AdamW(groups).step()  # torch accepts them


def test_lora_on_fc1_and_conv2():
    m = MyModule().eval()
    x = _x()
    base = m(x)
    layers = torchgraft.peft.apply_lora(m, ["fc1", "conv2"], rank=4, alpha=8)
    assert set(layers) == {"fc1", "conv2"}
    lora_fc1 = 4 * 1600 + 128 * 4  # A (r, in), B (out, r)
    lora_conv2 = 4 * 32 * 3 * 3 + 64 * 4  # A (r, in, 3, 3), B (out, r, 1, 1)
    trainable = {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == lora_fc1 + lora_conv2 and all(".lora_" in n for n in trainable)
    # B starts at zero: the adapted model is the base model, up to the extra zero addition
    assert_close_computed(m(x), base, TOL)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2))
    snap = {n: p.clone() for n, p in m.named_parameters()}
    for _ in range(3):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        assert torch.equal(p, snap[n]) == (".lora_" not in n), n
    tuned = m(x)
    assert (tuned - base).abs().max() > 1e-3  # the adapters did change the function
    torchgraft.peft.merge(m)  # merged weights compute the same function
    assert_close_computed(m(x), tuned, TOL)


def test_grow_widens_exactly_the_free_hidden_dims_and_preserves_the_function():
    m = MyModule().eval()
    x = _x()
    big, report = torchgraft.grow(m, width=2, example_inputs=x)
    by = {c["where"]: c for c in report.changes}
    conv = by["conv1 -> conv2"]
    assert conv["kind"] == "width" and (conv["before"], conv["after"]) == (32, 64)
    assert by["fc1 -> fc2"]["kind"] == "width" and by["fc1 -> fc2"]["after"] == 256
    assert by["conv2"]["kind"] == "kept" and "view" in by["conv2"]["how"]  # feeds the fixed view(-1, 1600)
    assert by["fc2"]["kind"] == "kept" and "output" in by["fc2"]["how"]
    assert (big.conv1.out_channels, big.conv2.in_channels, big.conv2.out_channels) == (64, 64, 64)
    assert (big.fc1.in_features, big.fc1.out_features, big.fc2.in_features) == (1600, 256, 256)
    wide = (3 * 64 * 9 + 64) + (64 * 64 * 9 + 64) + (1600 * 256 + 256) + (256 * 10 + 10)
    assert (report.params_before, report.params_after) == (225_610, wide)
    assert m.conv1.out_channels == 32  # the input model is untouched
    # function preserved: the widened sums have up to 1600 terms (fc1), 4 layers
    assert_close_computed(big(x), m(x), TOL)
    assert report.max_abs_diff <= TOL * float(m(x).detach().abs().max())
    # and the copies are not stuck together: a few steps train the grown model
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(big.parameters(), lr=0.05)
    big.train()
    first = F.cross_entropy(big(x), y).item()
    for _ in range(5):
        loss = F.cross_entropy(big(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert F.cross_entropy(big(x), y).item() < first


def test_grow_widens_the_zoo_lenet_through_torch_max_pool2d_and_flatten():
    m = torchgraft.build("lenet").eval()  # torch.relu, torch.max_pool2d, x.flatten(1)
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    big, report = torchgraft.grow(m, width=2, example_inputs=x)
    grown = {c["where"]: (c["before"], c["after"]) for c in report.changes if c["kind"] == "width"}
    assert grown == {"conv1 -> conv2": (20, 40), "conv2 -> fc1": (64, 128), "fc1 -> fc2": (1024, 2048)}
    assert big.fc1.in_features == 128 * 5 * 5  # flatten: 25 positions per channel
    assert any(c["kind"] == "note" and c["where"] == "config" for c in report.changes)
    assert_close_computed(big(x), m(x), tolerance(reduction=3200, depth=4))


def test_grow_traced_through_batchnorm_keeps_the_function_in_eval_and_train():
    class ConvBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 4, 3)

        def forward(self, x):
            return self.c2(F.relu(self.bn(self.c1(x)))).mean((2, 3))

    m = ConvBN()
    x = torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    m.train()
    m(x)  # BatchNorm statistics that are not the init's
    big, report = torchgraft.grow(m.eval(), width=2)
    assert [c["how"] for c in report.changes if c["kind"] == "width"] == ["Net2WiderNet, traced (via bn)"]
    assert big.bn.num_features == 16 and big.c2.in_channels == 16
    assert_close_computed(big(x), m(x), tolerance(reduction=16 * 9, depth=2))
    # batch statistics: a copied channel has its original's mean and variance
    assert_close_computed(big.train()(x), m.train()(x), tolerance(reduction=16 * 9 * 64, depth=3))


def test_grow_on_a_residual_or_untraceable_module_says_why():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.b(F.relu(self.a(x)))

    big, report = torchgraft.grow(Residual(), width=2)
    assert [c["where"] for c in report.changes if c["kind"] == "width"] == ["a -> b"]
    assert "addition" in next(c["how"] for c in report.changes if c["where"] == "b")

    class TokenMLP(nn.Module):  # a Linear's units are the last dim: flatten(1) mixes them with positions
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6 * 5, 3)

        def forward(self, x):  # (B, 5, 4)
            return self.b(torch.relu(self.a(x)).flatten(1))

    with pytest.raises(torchgraft.TorchgraftError, match="a: it feeds `.flatten"):
        torchgraft.grow(TokenMLP(), width=2)

    class ConvThenLinear(nn.Module):  # the Linear reads the image's last dim (W), not its channels
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):  # (B, 3, 8, 8)
            return self.fc(torch.relu(self.bn(self.c(x))))

    with pytest.raises(torchgraft.TorchgraftError, match="c: it feeds fc"):
        torchgraft.grow(ConvThenLinear(), width=2)

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else x

    with pytest.raises(torchgraft.TorchgraftError, match="torch.fx cannot trace"):
        torchgraft.grow(DataDependent(), width=2)


def test_module_tools_are_top_level():
    import importlib

    for name in ("summary", "transfer", "freeze", "unfreeze", "param_groups", "grow", "apply_lora",
                 "measure_flops", "estimate_memory"):
        assert callable(getattr(torchgraft, name)), name
    assert torchgraft.summary is importlib.import_module("torchgraft.tools.summary").summary

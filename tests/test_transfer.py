"""transfer(): matching, mismatched, renamed tensors, exclude, strict errors, sources on disk."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchgraft
from torchgraft.errors import CheckpointError, TorchgraftError, TransferError


class UserNet(nn.Module):
    """A model that is not in the registry, with BatchNorm buffers."""

    def __init__(self, classes: int = 4, hidden: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = nn.Linear(8, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.relu(self.mlp(self.pool(self.features(x)).flatten(1))))


def _perturb(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t))
    return m


def test_matching_copies_everything_and_outputs_agree():
    src, dst = _perturb(UserNet()), UserNet()
    src.eval(), dst.eval()
    report = torchgraft.transfer(src, dst, strict=True)
    n = len(src.state_dict())
    assert report.summary()["copied"] == n and report.ok
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(dst(x), src(x))  # the same weights in the same modules
    # the copy is a copy, not an alias
    with torch.no_grad():
        src.head.weight.add_(1.0)
    assert not torch.equal(dst.head.weight, src.head.weight)


def test_lenet_head_mismatch_is_skipped_and_reported():
    a = _perturb(torchgraft.build("lenet"))
    b = torchgraft.build("lenet", num_classes=5)
    head_before = b.fc2.weight.clone()
    report = torchgraft.transfer(a, b)
    assert report.mismatched == ["fc2.weight", "fc2.bias"]
    assert set(report.copied) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                  "fc1.weight", "fc1.bias"}
    assert torch.equal(b.fc2.weight, head_before)
    assert torch.equal(b.conv1.weight, a.conv1.weight)
    d = report.to_dict()
    json.dumps(d)  # JSON-ready
    assert d["summary"]["mismatched"] == 2 and d["mismatched"] == ["fc2.weight", "fc2.bias"]
    rec = next(t for t in d["tensors"] if t["name"] == "fc2.weight")
    assert rec["src_shape"] == [10, 1024] and rec["dst_shape"] == [5, 1024]
    text = str(report)
    assert "fc2.weight" in text and "mismatched" in text and "(10, 1024)" in text


def test_exclude_keeps_head_untouched_even_when_shapes_match():
    a, b = _perturb(torchgraft.build("lenet")), torchgraft.build("lenet")
    head = b.fc2.weight.clone()
    report = torchgraft.transfer(a, b, exclude=["fc2.*"], strict=True)
    assert report.excluded == ["fc2.weight", "fc2.bias"] and report.ok
    assert torch.equal(b.fc2.weight, head)
    assert torch.equal(b.fc1.weight, a.fc1.weight)
    # a bare module name works as a prefix too
    assert torchgraft.transfer(a, torchgraft.build("lenet"), exclude=["fc2"]).excluded == ["fc2.weight", "fc2.bias"]


def test_missing_and_unexpected():
    src = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    dst = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    report = torchgraft.transfer(src, dst)
    assert report.missing == ["2.weight", "2.bias"]
    report = torchgraft.transfer(dst, src)
    assert report.unexpected == ["2.weight", "2.bias"]
    assert report.summary()["copied"] == 4


def test_renamed_parameters_glob_and_regex_rules():
    src = _perturb(UserNet())
    hf_style = {f"model.backbone.{k}": v for k, v in src.state_dict().items()}
    dst = UserNet()
    report = torchgraft.transfer(hf_style, dst, rules={"model.backbone.*": "*"}, strict=True)
    assert report.summary()["copied"] == len(hf_style)
    assert torch.equal(dst.mlp.weight, src.mlp.weight)
    rec = next(r for r in report.records if r.name == "mlp.weight")
    assert rec.src_name == "model.backbone.mlp.weight"

    # regex rule + a second rule applied after the first (rules chain in order)
    renamed = {k.replace("mlp.", "hidden_layer."): v for k, v in hf_style.items()}
    dst2 = UserNet()
    report = torchgraft.transfer(renamed, dst2, rules=[(r"re:model\.backbone\.(.*)", r"\1"),
                                                       ("hidden_layer.*", "mlp.*")], strict=True)
    assert report.ok and torch.equal(dst2.mlp.weight, src.mlp.weight)

    # a rule mapping to None drops tensors
    report = torchgraft.transfer(hf_style, UserNet(), rules=[("model.backbone.head.*", None),
                                                            ("model.backbone.*", "*")])
    assert report.missing == ["head.weight", "head.bias"]
    assert sorted(report.excluded) == ["model.backbone.head.bias", "model.backbone.head.weight"]


def test_rules_colliding_names_error():
    sd = {"a.weight": torch.zeros(2), "b.weight": torch.zeros(2)}
    with pytest.raises(TransferError, match="both map to"):
        torchgraft.transfer(sd, nn.Linear(2, 2), rules={"*.weight": "weight"})


def test_strict_raises_before_writing_and_names_problems():
    a = _perturb(torchgraft.build("lenet"))
    b = torchgraft.build("lenet", num_classes=5)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(TransferError) as e:
        torchgraft.transfer(a, b, strict=True)
    msg = str(e.value)
    assert "\n" not in msg and "fc2.weight (10, 1024) vs (5, 1024)" in msg and "2 mismatched" in msg
    for k, v in b.state_dict().items():  # nothing was written
        assert torch.equal(v, before[k]), k
    with pytest.raises(TransferError, match=r"1 missing \(extra.weight\)"):
        dst = nn.Module()
        dst.extra = nn.Linear(2, 2, bias=False)
        torchgraft.transfer({}, dst, strict=True)
    with pytest.raises(TransferError, match=r"unexpected \(w\)"):
        torchgraft.transfer({"w": torch.zeros(1)}, nn.Module(), strict=True)
    # the head-reset policy makes the same transfer strict-clean
    report = torchgraft.transfer(a, b, policies={"fc2.*": "reset"}, strict=True)
    assert report.reset == ["fc2.weight", "fc2.bias"] and report.ok


def test_safetensors_file_and_checkpoint_dirs(tmp_path):
    a = _perturb(torchgraft.build("lenet"))
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(f))
    b = torchgraft.build("lenet")
    assert torchgraft.transfer(f, b, strict=True).ok and torch.equal(b.fc1.weight, a.fc1.weight)

    # run dir -> newest checkpoint
    run = tmp_path / "run"
    for step, scale in ((10, 1.0), (200, 2.0)):
        d = run / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        save_file({k: (v * scale).contiguous() for k, v in a.state_dict().items()}, str(d / "model.safetensors"))
    c = torchgraft.build("lenet")
    report = torchgraft.transfer(run, c, strict=True)
    assert report.source.endswith("step_00000200")
    assert torch.equal(c.fc1.weight, a.fc1.weight * 2)  # x2 is exact in binary
    c2 = torchgraft.build("lenet")
    torchgraft.transfer(run / "checkpoints" / "step_00000010", c2, strict=True)
    assert torch.equal(c2.fc1.weight, a.fc1.weight)


def test_bad_sources_give_clear_errors(tmp_path):
    m = torchgraft.build("lenet")
    with pytest.raises(CheckpointError, match="not found"):
        torchgraft.transfer(tmp_path / "nope", m)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        torchgraft.transfer(tmp_path, m)
    pt = tmp_path / "w.pt"
    torch.save(m.state_dict(), pt)
    with pytest.raises(CheckpointError, match="never unpickles"):
        torchgraft.transfer(pt, m)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        torchgraft.transfer(bad, m)
    with pytest.raises(TransferError, match="unknown shape policy 'rest'.*did you mean 'reset'"):
        torchgraft.transfer(m, m, policies={"fc2.*": "rest"})
    with pytest.raises(TransferError, match="not a tensor"):
        torchgraft.transfer({"a": 1}, m)
    with pytest.raises(TorchgraftError, match="must be an nn.Module"):
        torchgraft.transfer(m, m.state_dict())


def test_tied_weights_count_as_filled_and_dtype_cast():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    src = {"emb.weight": torch.randn(10, 4, dtype=torch.bfloat16)}
    dst = Tied()
    report = torchgraft.transfer(src, dst, strict=True)
    assert report.ok
    rec = {r.name: r for r in report.records}
    assert rec["out.weight"].status == "copied" and "tied to emb.weight" in rec["out.weight"].note
    assert "cast bfloat16 -> float32" in rec["emb.weight"].note
    assert dst.emb.weight.dtype == torch.float32
    assert torch.equal(dst.out.weight, src["emb.weight"].float())  # a cast


def test_into_lora_wrapped_destination_matches_plain_names():
    from torchgraft import peft as tp

    src = _perturb(UserNet())
    dst = UserNet()
    tp.apply_lora(dst, ["mlp", "head"], rank=2)
    report = torchgraft.transfer(src, dst, strict=True)
    assert report.ok and "mlp.base_layer.weight" in report.copied
    assert torch.equal(dst.mlp.base_layer.weight, src.mlp.weight)
    assert len(report.reset) == 4 and not report.missing  # adapters keep their init, deliberately

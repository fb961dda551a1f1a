"""Shape policies on real zoo models: ViT at a new image size, ResNet 3 -> 1 channels, GPT with a
larger vocabulary, a head with a new class count; plus slice, 1-D positions and `auto`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchgraft
from torchgraft.errors import TransferError
from torchgraft.testing import assert_close_computed, tolerance, transformer_tol

pytestmark = pytest.mark.numeric  # float comparisons: re-run under a forced CPU capability (docs/testing.md)


def _vit(size):
    return torchgraft.build("vit-tiny", image_size=size, patch_size=8, n_layer=2, num_classes=10).eval()


def test_vit_new_image_size_bicubic_grid_keeps_cls():
    src, dst = _vit(32), _vit(48)  # 4x4 -> 6x6 patch grid
    with torch.no_grad():
        src.pos_embed.normal_()
    report = torchgraft.transfer(src, dst, policies={"pos_embed": "pos_interp"}, strict=True)
    rec = {r.name: r for r in report.records}["pos_embed"]
    assert rec.status == "adapted" and "4x4 -> 6x6" in rec.note and "1 prefix token" in rec.note
    assert dst.pos_embed.shape == (1, 37, 192)
    torch.testing.assert_close(dst.pos_embed[:, 0], src.pos_embed[:, 0], rtol=0, atol=0)  # cls kept exactly
    grid = src.pos_embed[0, 1:].reshape(1, 4, 4, 192).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, 192)
    assert_close_computed(dst.pos_embed[0, 1:], ref, tolerance(reduction=16))  # 4x4 bicubic taps
    assert torch.equal(dst.blocks[1].mlp.fc_in.weight, src.blocks[1].mlp.fc_in.weight)
    out = dst(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # same size: the grid interpolation is the identity
    same = _vit(32)
    torchgraft.transfer(src, same, default_policy="pos_interp", strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert_close_computed(same(x), src(x), transformer_tol(src.config, 17))


def test_resnet_rgb_to_grayscale_first_conv_is_exact():
    src = torchgraft.build("resnet18", num_classes=10).eval()
    dst = torchgraft.build("resnet18", num_classes=10, in_chans=1).eval()
    report = torchgraft.transfer(src, dst, policies={"conv1.weight": "conv_sum"}, strict=True)
    assert report.adapted == ["conv1.weight"] and "input channels 3 -> 1" in report.records[0].note
    gray = torch.randn(2, 1, 32, 32)
    # a gray image through the adapted model == the same image as RGB through the source
    # conv1 sums 147 terms (3 channels x 7x7) in another order; 18 layers after it
    assert_close_computed(dst(gray), src(gray.repeat(1, 3, 1, 1)), tolerance(reduction=147, depth=18))
    # mean and repeat variants: scaled versions of the same filter
    for mode, factor in (("conv_mean", 1 / 3), ("conv_repeat", 1 / 3)):
        d = torchgraft.build("resnet18", num_classes=10, in_chans=1).eval()
        torchgraft.transfer(src, d, policies={"conv1.weight": mode}, strict=True)
        assert_close_computed(d.conv1.weight, src.conv1.weight.sum(1, keepdim=True) * factor
                              if mode == "conv_mean" else src.conv1.weight[:, :1] * 3.0, tolerance(reduction=3, depth=2))


def test_gpt_larger_vocabulary_keeps_old_tokens():
    src = torchgraft.build("gpt-tiny").eval()
    dst = torchgraft.build("gpt-tiny", vocab_size=300).eval()
    report = torchgraft.transfer(src, dst, policies={"tok_emb.weight": "vocab"}, strict=True)
    rec = {r.name: r for r in report.records}["tok_emb.weight"]
    assert rec.status == "adapted" and "44 new rows = mean" in rec.note
    torch.testing.assert_close(dst.tok_emb.weight[:256], src.tok_emb.weight, rtol=0, atol=0)
    assert_close_computed(dst.tok_emb.weight[256:], src.tok_emb.weight.mean(0).expand(44, -1), tolerance(reduction=256))
    ids = torch.randint(0, 256, (2, 16))
    # old tokens: same hidden states, and the tied head gives the same logits on the old vocabulary
    assert_close_computed(dst(ids)[..., :256], src(ids), transformer_tol(src.config, 16))  # a wider head product
    # untied Llama: embedding and lm_head both resized by `auto`
    s2, d2 = torchgraft.build("llama-tiny").eval(), torchgraft.build("llama-tiny", vocab_size=320).eval()
    r2 = torchgraft.transfer(s2, d2, default_policy="auto", strict=True)
    assert sorted(r2.adapted) == ["lm_head.weight", "tok_emb.weight"]
    assert_close_computed(d2(ids)[..., :256], s2(ids), transformer_tol(s2.config, 16))


def test_head_with_new_class_count_reset_keeps_init():
    src = torchgraft.build("resnet18", num_classes=10).eval()
    dst = torchgraft.build("resnet18", num_classes=3).eval()
    head = dst.fc.weight.clone()
    report = torchgraft.transfer(src, dst, policies={"fc": "reset"}, strict=True)
    assert report.reset == ["fc.weight", "fc.bias"] and report.summary()["copied"] == len(src.state_dict()) - 2
    assert torch.equal(dst.fc.weight, head)
    # backbone features identical
    x = torch.randn(2, 3, 32, 32)
    feats = lambda m: m.fc.in_features and torch.nn.Sequential(*list(m.children())[:-1])(x)  # noqa: E731
    assert torch.equal(feats(dst), feats(src))  # the same weights and ops
    # `auto` recognises the head by name; without a policy the transfer is strict-unclean
    assert torchgraft.transfer(src, torchgraft.build("resnet18", num_classes=3), default_policy="auto").reset == \
        ["fc.weight", "fc.bias"]
    with pytest.raises(TransferError, match=r"fc.weight \(10, 512\) vs \(3, 512\)"):
        torchgraft.transfer(src, torchgraft.build("resnet18", num_classes=3), strict=True)


def test_slice_policy_and_1d_positions():
    src, dst = nn.Linear(6, 4), nn.Linear(8, 3)
    before = dst.weight.detach().clone()
    report = torchgraft.transfer(src, dst, default_policy="slice")
    assert report.adapted == ["weight", "bias"]
    assert torch.equal(dst.weight[:, :6], src.weight[:3])  # copies
    assert torch.equal(dst.weight[:, 6:], before[:, 6:])
    assert torch.equal(dst.bias, src.bias[:3])

    g_src = torchgraft.build("gpt-tiny")
    g_dst = torchgraft.build("gpt-tiny", block_size=128)
    torchgraft.transfer(g_src, g_dst, policies={"pos_emb.weight": "pos_1d"}, strict=True)
    ref = F.interpolate(g_src.pos_emb.weight.t()[None], size=128, mode="linear", align_corners=False)[0].t()
    assert_close_computed(g_dst.pos_emb.weight, ref, tolerance(reduction=2))  # 2 linear taps


def test_policy_that_does_not_fit_reports_mismatch_and_custom_callable():
    src, dst = nn.Linear(4, 4), nn.Linear(4, 5)
    report = torchgraft.transfer(src, dst, default_policy="conv_sum")
    assert report.mismatched == ["weight", "bias"] and "input-channel adaptation" in report.records[0].note

    def double(s, d, name):
        return torch.zeros_like(d) + 2.0, "filled with 2"

    report = torchgraft.transfer(src, dst, policies={"*": double})
    assert report.adapted == ["weight", "bias"] and torch.all(dst.weight == 2.0)

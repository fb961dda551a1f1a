"""Contracts every registered preset must honour (built small via overrides):
forward + backward, every parameter gets a finite non-zero gradient, safetensors state-dict round trip
reproduces outputs, meta build + materialize initialises every tensor, deterministic init under a seed.
"""
import itertools
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import torchgraft
from torchgraft.models.registry import get_preset, materialize
from torchgraft.testing import assert_close_computed, transformer_tol

# Small overrides per family, so every preset (70B included) runs in milliseconds. Shape-defining
# choices of the preset (GQA vs MHA, block type, channels, classes, task) are kept.
SMALL = {
    "gpt": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, block_size=64),
    "llama": dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=96, vocab_size=256, block_size=64),
    "bert": dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=96, vocab_size=256, block_size=64,
                 task="sequence_classification", num_labels=3),
    "vit": dict(n_layer=2, n_embd=64, n_head=4, image_size=32, patch_size=8),
    "resnet": dict(width=8),
}
# the Llama-shaped families (windows shorter than the 8-token inputs, so the KV-cache contract sees them)
_DECODER = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=256, block_size=64,
                head_dim=16)
SMALL.update({
    "qwen2": _DECODER, "qwen3": _DECODER, "olmo2": _DECODER, "smollm3": _DECODER,
    "mistral": {**_DECODER, "sliding_window": 4},
    "gemma2": {**_DECODER, "sliding_window": 4}, "gemma3": {**_DECODER, "sliding_window": 4},
    "phi3": {**_DECODER, "sliding_window": 4, "rope_scaling": {"type": "default"}},
})
BIG = 30_000_000  # presets above this many parameters need a SMALL entry for their family


pytestmark = pytest.mark.usefixtures("one_thread")



def small_overrides(name):
    preset = get_preset(name)
    ov = dict(SMALL.get(preset.family, {}))
    if preset.family == "llama" and preset.fields.get("n_kv_head"):
        ov["n_kv_head"] = 2  # keep GQA for GQA presets
    if preset.family == "vit" and preset.fields.get("num_classes", 1000) > 100:
        ov["num_classes"] = 10
    if not ov:
        meta = torchgraft.build(name, device="meta")
        if sum(p.numel() for p in meta.parameters()) > BIG:
            pytest.skip(f"no small overrides for family {preset.family!r}; add one to SMALL")
    return ov


def example_inputs(model, batch=2):
    cfg = model.config
    if hasattr(cfg, "vocab_size"):
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (batch, 8), generator=g)
        mask = torch.ones(batch, 8, dtype=torch.long)
        mask[0, -2:] = 0
        if hasattr(model, "make_kv_cache"):  # decoder LMs: left padding
            mask = mask.flip(1)
        return (ids,), {"attention_mask": mask}
    if hasattr(cfg, "obs_dim"):  # policies: a batch of observation vectors
        return (torch.randn(batch, cfg.obs_dim, generator=torch.Generator().manual_seed(1)),), {}
    side = getattr(cfg, "image_size", 32)
    chans = getattr(cfg, "in_chans", 3)
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, chans, side, side, generator=g),), {}


PRESETS = torchgraft.list_models()


def test_registry_has_the_zoo():
    for name in ["lenet", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-tiny", "llama-tiny", "llama2-7b",
                 "llama3-8b", "llama3-70b", "bert-base", "minilm-l6-h384", "bert-tiny", "vit-tiny",
                 "vit-small", "vit-base", "vit-digits", "resnet18", "resnet34"]:
        assert name in PRESETS, name


@pytest.mark.parametrize("name", PRESETS)
def test_full_size_builds_on_meta(name):
    model = torchgraft.build(name, device="meta")
    assert all(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    assert model.model_name == name and model.config is not None
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", PRESETS)
def test_forward_backward_every_param_gets_grad(name):
    model = torchgraft.build(name, **small_overrides(name))
    model.train()
    args, kwargs = example_inputs(model)
    out = model(*args, **kwargs)
    assert out.shape[0] == args[0].shape[0]
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {n} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {n} has an all-zero gradient"


@pytest.mark.parametrize("name", PRESETS)
def test_safetensors_round_trip_reproduces_outputs(name, tmp_path):
    ov = small_overrides(name)
    torch.manual_seed(0)
    a = torchgraft.build(name, **ov).eval()
    args, kwargs = example_inputs(a)
    with torch.no_grad():
        ref = a(*args, **kwargs)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    torch.manual_seed(123)
    b = torchgraft.build(name, **ov).eval()
    b.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(b(*args, **kwargs), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", PRESETS)
def test_meta_build_then_materialize_initialises_everything(name):
    ov = small_overrides(name)
    model = torchgraft.build(name, device="meta", **ov)
    original = model.to_empty

    def to_empty_with_garbage(*, device, recurse=True):
        original(device=device, recurse=recurse)
        for t in itertools.chain(model.parameters(), model.buffers()):
            t.data.fill_(math.nan if t.is_floating_point() else 12345)
        return model

    model.to_empty = to_empty_with_garbage
    materialize(model, "cpu")
    del model.to_empty
    for n, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        assert not t.is_meta, n
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{name}: {n} is not initialised by reset_parameters/init_weights"
        else:
            assert (t != 12345).all(), f"{name}: {n} is not initialised by reset_parameters/init_weights"
    args, kwargs = example_inputs(model)
    assert torch.isfinite(model.eval()(*args, **kwargs)).all()


@pytest.mark.parametrize("name", PRESETS)
def test_deterministic_init_under_seed(name):
    ov = small_overrides(name)
    torch.manual_seed(7)
    a = torchgraft.build(name, **ov)
    torch.manual_seed(7)
    b = torchgraft.materialize(torchgraft.build(name, device="meta", **ov), "cpu")
    torch.manual_seed(8)
    c = torchgraft.build(name, **ov)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=f"{name}: {k}")
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


@pytest.mark.parametrize("name", [n for n in PRESETS if get_preset(n).family in (
    "gpt", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "olmo2", "smollm3")])
def test_decoder_kv_cache_contract(name):
    model = torchgraft.build(name, **small_overrides(name)).eval()
    (ids,), kwargs = example_inputs(model)
    mask = kwargs["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos)
        cache = model.make_kv_cache(ids.shape[0], 16)
        outs = [model(ids[:, :5], attention_mask=mask[:, :5], position_ids=pos[:, :5], kv_cache=cache)]
        for t in range(5, ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                              kv_cache=cache))
    assert_close_computed(torch.cat(outs, 1), full, transformer_tol(model.config, 16))  # cache of 16 slots
    assert full.shape == (*ids.shape, model.config.vocab_size)

"""NF4 / int8 bases: codes bit for bit against bitsandbytes' CPU NF4 quantiser, double-quantised
scales and round-trip error against torchao's NF4Tensor, int8 against torchao's Int8WeightOnlyConfig,
LoRA on a quantised base (gradients only in the adapters), the converters, and the checkpoint round
trip of the subclass tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torchgraft.errors import ConfigError

torchao = pytest.importorskip("torchao")
from torchao.quantization import to_nf4  # noqa: E402

from torchgraft.quant.int8 import Int8Linear  # noqa: E402
from torchgraft.quant.nf4 import NF4Linear, nf4_codes, quantize_nf4  # noqa: E402

pytestmark = pytest.mark.numeric


def _weight(dtype=torch.float32, shape=(256, 512)):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_codes_and_absmax_match_bitsandbytes_bit_for_bit(dtype):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = _weight(dtype)
    codes, absmax = nf4_codes(w)
    ref_codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(codes, ref_codes.flatten())
    assert torch.equal(absmax, state.absmax)
    # and bitsandbytes dequantises our codes to exactly its own round trip
    ours = bnbf.dequantize_4bit(codes.view(-1, 1), state)
    assert torch.equal(ours, bnbf.dequantize_4bit(ref_codes, state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_tensor_matches_torchao_reference(dtype):
    """Same container and double quantisation as torchao's to_nf4; codes differ from torchao's only
    where a scaled value sits between torchao's 4-decimal levels and the exact ones (or, in bf16, where
    torchao scales in bf16), and the round-trip error is no larger."""
    w = _weight(dtype)
    ours, ref = quantize_nf4(w), to_nf4(w, 64, 256)
    assert (ours.block_size, ours.scaler_block_size, ours.n_blocks) == (64, 256, w.numel() // 64)
    assert torch.equal(ours.quantized_scalers, ref.quantized_scalers)          # int8 scales
    assert torch.equal(ours.quantization_factor, ref.quantization_factor)      # per 256 scales
    assert torch.equal(ours.scaler_mean, ref.scaler_mean)
    differ = (ours.quantized_data != ref.quantized_data).float().mean().item()
    assert differ < (1e-3 if dtype == torch.float32 else 2e-2)
    err_ours = (ours.get_original_weight().float() - w.float()).abs().mean()
    err_ref = (ref.get_original_weight().float() - w.float()).abs().mean()
    assert err_ours <= err_ref * (1 + 1e-3)
    # the NF4 error itself: half a level gap (<= 0.16 of absmax) on average well under 0.1 absmax
    assert err_ours < 0.1 * w.float().abs().max()


def test_nf4_odd_block_count_uses_a_smaller_scaler_block():
    w = _weight(shape=(64, 64))  # 64 blocks: fewer than one block of 256 scales
    q = quantize_nf4(w)
    assert q.scaler_block_size == 64
    torch.testing.assert_close(q.get_original_weight(), to_nf4(w, 64, 64).get_original_weight(),
                               rtol=0, atol=float(w.abs().max()) * 0.2)


def test_nf4_rejects_a_shape_it_cannot_block():
    with pytest.raises(ConfigError, match=r"'head'.*\(3, 7\).*multiple of the NF4 block of 64"):
        NF4Linear(nn.Linear(7, 3), "head")


def test_int8_matches_torchao_int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    lin = nn.Linear(128, 64)
    ours = Int8Linear(lin)
    ref = nn.Sequential(nn.Linear(128, 64))
    ref[0].load_state_dict(lin.state_dict())
    quantize_(ref, Int8WeightOnlyConfig())
    assert torch.equal(ours.weight, ref[0].weight.qdata)
    torch.testing.assert_close(ours.dequantize(), ref[0].weight.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [NF4Linear, Int8Linear])
def test_quantised_linear_forward_backward_equal_dequantised_linear(cls):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    q = cls(lin)
    ref = q.to_linear()
    x = torch.randn(3, 5, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = q(x), ref(x2)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    y.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    assert not any(p.requires_grad for p in q.parameters())


def _lm():
    import torchgraft

    torch.manual_seed(0)
    return torchgraft.build("llama-tiny", n_layer=2)


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_lora_on_a_quantised_base_trains_only_the_adapters(fmt):
    from torchgraft.peft import apply_lora, lora_layers

    model = _lm()
    apply_lora(model, ALL, rank=4, quantize_base=fmt)
    layers = lora_layers(model)
    assert len(layers) == 14 and all(l.base_layer.fmt == fmt for l in layers.values())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n for n in names)
    ids = torch.randint(0, 256, (2, 16))
    model(ids).float().square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in names)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)


def test_qlora_output_within_the_quantisation_error_of_the_float_model():
    """A fresh adapter is zero, so the QLoRA model is the dequantised float model exactly."""
    from torchgraft.peft import apply_lora
    from torchgraft.quant import dequantize_model

    model = _lm()
    ids = torch.randint(0, 256, (2, 16))
    apply_lora(model, ALL, rank=4, quantize_base="nf4")
    q_out = model(ids)
    dequantize_model(model)
    torch.testing.assert_close(model(ids), q_out, rtol=0, atol=0)


def test_qlora_errors_are_one_line():
    from torchgraft.peft import apply_lora

    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(ConfigError, match="none of the LoRA targets is an nn.Linear"):
        apply_lora(conv, ["0", "2"], rank=2, quantize_base="nf4")
    with pytest.raises(ConfigError, match="unknown base quantisation 'nf3'"):
        apply_lora(_lm(), ["q_proj"], rank=2, quantize_base="nf3")
    model = _lm()
    apply_lora(model, ["q_proj"], rank=2, quantize_base="nf4")
    from torchgraft.peft import merge

    with pytest.raises(ConfigError, match="dequantise first"):
        merge(model)


def test_converters_by_name_and_tied_weights_skipped():
    import torchgraft
    from torchgraft.tools.converters import build_converter

    torch.manual_seed(0)
    model = torchgraft.build("llama-tiny", n_layer=1)
    report = build_converter("nf4", targets=["*_proj"]).convert(model)
    assert len(report.swapped) == 7 and type(model.lm_head) is not NF4Linear
    tied = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    tied[2].weight = tied[0].weight
    report = build_converter("int8").convert(tied)
    assert report.swapped == ["1"] and report.skipped == {"0": "weight tied to another module",
                                                          "2": "weight tied to another module"}
    with pytest.raises(ConfigError, match="no nn.Linear layer to quantise"):
        build_converter("int8").convert(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_subclass_tensors_round_trip_through_a_checkpoint(tmp_path):
    """NF4 weights and torchao's 8-/4-bit optimizer states come back bit for bit from safetensors."""
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit

    from torchgraft.checkpoint.files import read_checkpoint, write_checkpoint
    from torchgraft.peft import apply_lora

    model = _lm()
    apply_lora(model, ALL, rank=4, quantize_base="nf4")
    s8 = OptimState8bit.zeros((64, 64), signed=True, block_size=256)
    s8.codes.random_(0, 255, generator=torch.Generator().manual_seed(1))
    s8.scale.uniform_()
    s4 = OptimState4bit.zeros((64, 64), signed=False, block_size=128)
    s4.codes.random_(0, 255)
    opt_state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": s8, "exp_avg_sq": s4}},
                 "param_groups": [{"lr": torch.tensor(1e-3), "betas": (0.9, 0.99), "params": [0]}]}
    write_checkpoint(tmp_path / "ck", model_state=model.state_dict(), meta={"step": 1},
                     optimizer_state=opt_state)
    ck = read_checkpoint(tmp_path / "ck")
    for k, v in model.state_dict().items():
        got = ck.model_state[k]
        assert type(got) is type(v), k
        if hasattr(v, "quantized_data"):
            for a in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"):
                assert torch.equal(getattr(got, a), getattr(v, a)), (k, a)
            assert got.shape == v.shape and got.dtype == v.dtype
        else:
            assert torch.equal(got, v), k
    st = ck.optimizer_state["state"][0]
    assert type(st["exp_avg"]) is OptimState8bit and type(st["exp_avg_sq"]) is OptimState4bit
    assert torch.equal(st["exp_avg"].codes, s8.codes) and torch.equal(st["exp_avg"].scale, s8.scale)
    assert torch.equal(st["exp_avg_sq"].codes, s4.codes) and st["exp_avg_sq"].shape == s4.shape
    assert ck.optimizer_state["param_groups"][0]["lr"] == pytest.approx(1e-3, rel=1e-7)
    fresh = _lm()
    apply_lora(fresh, ALL, rank=4, quantize_base="nf4")
    fresh.load_state_dict(ck.model_state)
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_layer_by_layer_load_equals_quantising_the_loaded_model(tmp_path, fmt):
    """`load_quantized` into a meta-built model gives bitwise the model that a full bf16 load followed
    by `quantize_linears` gives, holding at most one float layer (the largest linear) at a time."""
    import torchgraft
    from safetensors.torch import save_file

    from torchgraft.quant import load_quantized, quantize_linears

    torch.manual_seed(0)
    src = torchgraft.build("llama-tiny", n_layer=2)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    ref = torchgraft.build("llama-tiny", n_layer=2).to(torch.bfloat16)
    ref.load_state_dict(src.state_dict())
    quantize_linears(ref, fmt, ["*_proj"])
    model = torchgraft.build("llama-tiny", n_layer=2, device="meta")
    report = load_quantized(model, tmp_path / "w.safetensors", fmt, ["*_proj"], dtype=torch.bfloat16)
    assert len(report.quantized) == 14 and report.loaded_tensors == len(src.state_dict())
    assert report.high_precision_peak_bytes == 160 * 64 * 2  # one bf16 MLP projection
    ids = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)

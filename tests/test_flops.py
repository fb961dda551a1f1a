"""FLOPs measured with FlopCounterMode on meta/fake tensors, and the analytic 6N + 12LHT."""
import pytest
import torch
from torch import nn

import torchgraft
from torchgraft.tools.flops import analytic_flops_per_token, flops_report, measure_flops
from torchgraft.tools.memory import trace_activations
from torchgraft.tools.summary import inspect_model


def test_mlp_flops_by_hand():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    c = measure_flops(model, input_size=(4, 10))
    assert c.forward == 2 * 4 * (10 * 20 + 20 * 5)
    # backward: weight grads of both layers + the input grad of the second (the input needs none)
    assert c.forward_backward == c.forward + 2 * 4 * (10 * 20 + 20 * 5) + 2 * 4 * 20 * 5
    assert c.matmul_params == sum(p.numel() for p in model.parameters())
    model[2].requires_grad_(False)  # frozen layer: no weight-gradient FLOPs for it
    frozen = measure_flops(model, input_size=(4, 10))
    assert frozen.forward_backward == c.forward + 2 * 4 * 10 * 20 + 2 * 4 * 20 * 5


def test_lenet_conv_flops_by_hand():
    r = flops_report(torchgraft.build("lenet", device="meta"))
    conv1 = 2 * (20 * 28 * 28) * (1 * 5 * 5)
    conv2 = 2 * (64 * 10 * 10) * (20 * 5 * 5)
    fc = 2 * (1600 * 1024 + 1024 * 10)
    assert r.unit == "sample" and r.measured_forward == conv1 + conv2 + fc
    assert r.analytic_training is None


def test_gpt2_analytic_flops_match_nanogpt_formula():
    model = torchgraft.build("gpt2", device="meta")
    r = flops_report(model, seq_len=1024)
    n_nanogpt = 124_439_808 - 1024 * 768  # nanoGPT's get_num_params(): all but the position embedding
    nanogpt = 6 * n_nanogpt + 12 * 12 * 768 * 1024
    assert r.unit == "token" and r.seq_len == 1024
    assert r.n_params == n_nanogpt - 25 * 2 * 768  # our N also leaves out the LayerNorm scales/biases
    assert abs(r.analytic_training / nanogpt - 1) < 0.02
    assert r.analytic_training == analytic_flops_per_token(r.n_params, 12, 768, 1024)
    assert 0.98 < r.ratio < 1.02  # FlopCounterMode counts the same matmuls and attention


def test_llama_gqa_rope_measured_close_to_analytic():
    model = torchgraft.build("llama-tiny", device="meta")  # runs through the fake-tensor path
    r = flops_report(model)
    cfg = model.config
    n = sum(p.numel() for n_, p in model.named_parameters() if "norm" not in n_ and "tok_emb" not in n_)
    assert r.n_params == n  # untied lm_head counted, token lookup not
    assert 0.9 < r.ratio < 1.1
    assert r.analytic_training == 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def test_depth_extrapolation_in_inspect_is_exact():
    rep = inspect_model("gpt-tiny", {"n_layer": 5}, batch=2, seq_len=32)
    full = torchgraft.build("gpt-tiny", device="meta", n_layer=5)
    c = measure_flops(full, seq_len=32)
    assert rep.flops.count.forward_backward == c.forward_backward
    assert rep.flops.count.forward == c.forward and rep.flops.n_params == c.matmul_params
    t = trace_activations(full, batch=2, seq_len=32)
    assert rep.memory.activations == t.total + t.loss_buffers


def test_bad_input_is_a_clear_error():
    from torchgraft.errors import TorchgraftError

    with pytest.raises(TorchgraftError, match="input_size"):
        measure_flops(nn.Linear(3, 3))  # nothing says what the input is


def test_flops_per_module_add_up():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    c = measure_flops(model, input_size=(4, 10))
    assert c.by_module == {"0": 2 * 2 * 4 * 10 * 20, "2": 3 * 2 * 4 * 20 * 5}
    assert sum(c.by_module.values()) == c.forward_backward

"""estimate_memory(): arithmetic of weights/grads/optimizer/sharding, traced activations, and the
estimate against the peak measured while really training small models on CPU."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchgraft
from torchgraft.errors import TorchgraftError
from torchgraft.tools.memory import (analytic_activations, estimate_memory, measure_peak_memory,
                                     trace_activations)


def mlp():
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


N_MLP = 10 * 20 + 20 + 20 * 5 + 5


def test_weights_grads_optimizer_arithmetic():
    e = estimate_memory(mlp(), input_size=(4, 10))
    assert (e.weights, e.gradients, e.optimizer) == (4 * N_MLP, 4 * N_MLP, 8 * N_MLP)
    assert e.total == e.weights + e.gradients + e.optimizer + e.activations
    assert estimate_memory(mlp(), input_size=(4, 10), optimizer="sgd").optimizer == 4 * N_MLP
    assert estimate_memory(mlp(), input_size=(4, 10), optimizer="sgd-nomomentum").optimizer == 0
    true16 = estimate_memory(mlp(), input_size=(4, 10), precision="bf16-true")
    assert (true16.weights, true16.gradients, true16.optimizer) == (2 * N_MLP, 2 * N_MLP, 4 * N_MLP)
    mixed = estimate_memory(mlp(), input_size=(4, 10), precision="bf16")
    assert mixed.weights == 4 * N_MLP + 2 * N_MLP  # fp32 master + autocast's bf16 copies
    frozen = mlp()
    frozen[0].requires_grad_(False)
    f = estimate_memory(frozen, input_size=(4, 10))
    assert f.gradients == 4 * (20 * 5 + 5) and f.optimizer == 8 * (20 * 5 + 5)


def test_sharding_divides_state_and_adds_the_gather_buffer():
    model = torchgraft.build("gpt-tiny", device="meta")
    n = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    one = estimate_memory(model, batch=2)
    four = estimate_memory(model, batch=2, sharding=4)
    assert four.weights == 4 * n // 4 + 2 * block * 4
    assert four.gradients == one.gradients // 4 and four.optimizer == one.optimizer // 4
    assert four.activations == one.activations  # each device runs its own micro-batch


def test_traced_activations_by_hand():
    t = trace_activations(mlp(), input_size=(4, 10))
    # saved for backward: the input (for the first weight grad) and the ReLU output (ReLU's
    # backward and the second weight grad share it); the loss buffer is the output's gradient
    assert t.total == 4 * (4 * 10 + 4 * 20)
    assert t.loss_buffers == 4 * 4 * 5


def test_activation_checkpointing_keeps_block_inputs_and_one_block():
    model = torchgraft.build("gpt-tiny", device="meta", n_layer=4)
    t = trace_activations(model, batch=2)
    full = estimate_memory(model, batch=2)
    ckpt = estimate_memory(model, batch=2, activation_checkpointing=True)
    assert len(t.blocks) == 4 and len(set(t.blocks)) == 1
    assert ckpt.activations == full.activations - sum(t.blocks) + sum(t.block_inputs) + max(t.blocks)
    assert ckpt.activations < full.activations


def test_analytic_formula_matches_trace_for_gpt():
    model = torchgraft.build("gpt2", device="meta", n_layer=2)
    traced = estimate_memory(model, batch=2, seq_len=256)
    analytic = estimate_memory(model, batch=2, seq_len=256, activations="analytic")
    assert abs(analytic.activations / traced.activations - 1) < 0.02
    assert traced.activations_analytic == analytic.activations
    # fp32 -> bf16 halves the per-layer terms (the loss stays float32)
    bf16 = analytic_activations(model.config, 2, 256, 2, lm=True)
    assert bf16 < analytic.activations


def _train_peak(name, batch, precision="fp32", optimizer="adamw", steps=3, **overrides):
    """Peak bytes of live tensors while building `name` and training it `steps` steps on CPU."""
    cfg = torchgraft.get_config(name, **overrides)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    losses = []

    def run():
        model = torchgraft.build(name, **overrides)
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if optimizer == "adamw"
               else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
                logits = model(x)
            loss = F.cross_entropy(logits.float().view(-1, cfg.vocab_size), y.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())

    peak = _single_thread(measure_peak_memory, run)
    assert losses[-1] < losses[0]  # it really trained
    return peak


def _single_thread(fn, *args):
    """Run on one intra-op thread (fast on a busy 2-core CI box, and one allocation pattern)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("name,batch,precision,optimizer,overrides", [
    ("gpt-tiny", 8, "fp32", "adamw", dict(n_embd=128, n_layer=4, block_size=128)),
    ("gpt-tiny", 8, "bf16-mixed", "adamw", dict(n_embd=128, n_layer=4, block_size=128)),
    ("llama-tiny", 8, "fp32", "adamw", dict(n_embd=128, n_layer=4, intermediate_size=344)),
])
def test_estimate_within_25_percent_of_measured_training_peak(name, batch, precision, optimizer, overrides):
    measured = _train_peak(name, batch, precision, optimizer, **overrides)
    meta = torchgraft.build(name, device="meta", **overrides)
    est = estimate_memory(meta, batch=batch, precision=precision, optimizer=optimizer)
    assert 0.75 < est.total / measured < 1.25, (est.to_dict(), measured)
    analytic = estimate_memory(meta, batch=batch, precision=precision, optimizer=optimizer,
                               activations="analytic")
    assert 0.75 < analytic.total / measured < 1.25, (analytic.to_dict(), measured)


def test_cnn_estimate_within_25_percent_of_measured_peak():
    x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))

    def run():
        model = torchgraft.build("lenet")
        opt = torch.optim.AdamW(model.parameters())
        for _ in range(3):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    measured = _single_thread(measure_peak_memory, run)
    est = estimate_memory(torchgraft.build("lenet", device="meta"), input_size=(64, 1, 32, 32))
    assert 0.75 < est.total / measured < 1.25


def test_bad_settings_raise_one_line_errors():
    model = torchgraft.build("gpt-tiny", device="meta")
    with pytest.raises(TorchgraftError, match="unknown precision 'bf61'.*did you mean"):
        estimate_memory(model, precision="bf61")
    with pytest.raises(TorchgraftError, match="unknown optimizer"):
        estimate_memory(model, optimizer="lion")
    with pytest.raises(TorchgraftError, match="sharding must be >= 1"):
        estimate_memory(model, sharding=0)
    with pytest.raises(TorchgraftError, match="input_size"):
        estimate_memory(mlp())
    with pytest.raises(TorchgraftError, match="transformer config"):
        estimate_memory(mlp(), input_size=(2, 10), activations="analytic")

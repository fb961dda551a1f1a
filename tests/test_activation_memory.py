"""Memory levers measured on CPU: selective / every-k activation checkpointing keep the gradients
and lower the step's peak; the memory estimate knows chunked CE and both checkpointing kinds."""
import pytest
import torch
import torch.nn.functional as F

import torchgraft
from torchgraft.distributed import apply_activation_checkpointing
from torchgraft.testing import assert_close_computed, transformer_tol
from torchgraft.tools.memory import estimate_memory, measure_peak_memory


def _llama():
    torch.manual_seed(0)
    return torchgraft.build("llama-tiny", n_layer=4, n_embd=128, intermediate_size=512, block_size=256)


def _step(model, ids):
    def run():
        logits = model(ids)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)).backward()
    return run


@pytest.fixture(scope="module")
def measured():
    ids = torch.randint(0, 256, (4, 256))
    out = {}
    for ac in ("none", "selective", "2", "full"):
        model = _llama()
        apply_activation_checkpointing(model, ac)
        peak = measure_peak_memory(_step(model, ids))
        out[ac] = (peak, {n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def test_checkpointing_keeps_gradients_and_orders_peak_memory(measured):
    ref = measured["none"][1]
    tol = 2 * transformer_tol(_llama().config, 256)  # recomputed forward, then backward
    scale = max(g.abs().max().item() for g in ref.values())
    for ac in ("selective", "2", "full"):
        for name, g in measured[ac][1].items():
            assert_close_computed(g, ref[name], tol, scale=scale, msg=f"{ac} {name}")
    peak = {ac: v[0] for ac, v in measured.items()}
    assert peak["full"] < peak["2"] < peak["none"]
    assert peak["full"] < peak["selective"] < peak["none"]


def test_estimate_orders_like_the_measurement_and_knows_chunked_ce():
    model = _llama()
    est = {ac: estimate_memory(model, batch=4, seq_len=256, activations="analytic", activation_checkpointing=ac)
           .activations for ac in (False, "selective", 2, True)}
    assert est[True] < est[2] < est[False] and est[True] < est["selective"] < est[False]
    traced = {ac: estimate_memory(model, batch=4, seq_len=256, activation_checkpointing=ac).activations
              for ac in (False, "selective", 2, True)}
    assert traced[True] < traced[2] < traced[False] and traced[True] < traced["selective"] < traced[False]
    big = torchgraft.build("llama-tiny", vocab_size=128256, device="meta")
    plain = estimate_memory(big, batch=4, seq_len=128, activations="analytic")
    chunked = estimate_memory(big, batch=4, seq_len=128, activations="analytic", chunked_ce=128)
    traced_chunked = estimate_memory(big, batch=4, seq_len=128, chunked_ce=128)
    # the (B*T, V) float32 logits, their log-softmax and gradient dominate the plain estimate
    assert chunked.activations < 0.5 * plain.activations
    assert abs(traced_chunked.activations - chunked.activations) < 0.2 * chunked.activations


def test_inspect_cli_knows_chunked_ce_and_selective_checkpointing(capsys):
    import json

    from torchgraft.cli import main

    acts = []
    for extra in ([], ["--chunked-ce", "32"], ["--chunked-ce", "32", "--selective-checkpointing"]):
        main(["inspect", "llama-tiny", "vocab_size=128256", "--batch", "2", "--seq", "128", "--json", *extra])
        acts.append(json.loads(capsys.readouterr().out)["memory_bytes"]["activations"])
    assert acts[2] < acts[1] < 0.5 * acts[0]

"""`torchgraft inspect` runs one forward pass (on meta tensors) for its table, FLOPs and activation
memory, and imports neither torch._dynamo nor torch._inductor (issue 27 item 3: their import was
most of the command's CPU time; benchmarks/bench_inspect.py measures it)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from torchgraft.cli import main


def _inspect(capsys, *args):
    try:
        main(["inspect", *args, "--json"])
    except SystemExit as e:
        assert e.code == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("args", [("llama-tiny", "n_layer=4"), ("gpt-tiny", "n_layer=2"), ("lenet",),
                                  ("mixtral-tiny",), ("bert-tiny", "n_layer=3")])
def test_inspect_runs_one_forward_pass(capsys, monkeypatch, args):
    calls = []
    real = torch.func.functional_call

    def counting(module, *a, **kw):
        calls.append(type(module).__name__)
        return real(module, *a, **kw)

    monkeypatch.setattr(torch.func, "functional_call", counting)
    d = _inspect(capsys, *args)
    assert len(calls) == 1, calls
    assert d["flops"]["measured_training"] > d["flops"]["measured_forward"] > 0
    assert d["memory_bytes"]["activations"] > 0 and d["summary"]["modules"]


def test_deep_model_from_one_pass_equals_a_pass_through_every_layer():
    """The one pass runs a 2-layer build; FLOPs, N, saved bytes and shapes of 5 layers follow exactly."""
    import torchgraft
    from torchgraft.tools.flops import measure_flops
    from torchgraft.tools.memory import trace_activations
    from torchgraft.tools.summary import inspect_model, summary

    rep = inspect_model("llama-tiny", {"n_layer": 5}, batch=3, seq_len=16, precision="bf16")
    full = torchgraft.build("llama-tiny", device="meta", n_layer=5)
    before = {n: (id(t), t.dtype) for n, t in list(full.named_parameters()) + list(full.named_buffers())}
    c = measure_flops(full, seq_len=16)
    assert (rep.flops.count.forward, rep.flops.count.forward_backward) == (c.forward, c.forward_backward)
    assert rep.flops.count.matmul_params == c.matmul_params
    t = trace_activations(full, batch=3, seq_len=16, dtype=torch.bfloat16)
    assert rep.memory.activations == t.total + t.loss_buffers
    after = {n: (id(t), t.dtype) for n, t in list(full.named_parameters()) + list(full.named_buffers())}
    assert after == before  # the bf16 pass left the model's own (float32) weights and buffers in place
    assert rep.summary.to_dict() == summary(full, depth=2, batch=3, seq_len=16).to_dict()


def test_meta_attention_takes_the_cpu_kernel():
    """On meta, SDPA runs the CPU flash kernel: no (T, T) score matrix is saved (a real CPU run's
    saved bytes), and the FLOPs are the model FLOPs of the math path (backward = 2 x forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from torchgraft.tools.flops import _flop_counter
    from torchgraft.tools.meta import CpuAttentionOnMeta

    q, k, v = (torch.empty(1, 2, 64, 8, device="meta", requires_grad=True) for _ in range(3))
    saved = []
    with CpuAttentionOnMeta(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                         lambda t: t):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == (1, 2, 64, 8)
    assert not any(t.shape[-2:] == (64, 64) for t in saved)  # the math path keeps (T, T) weights
    counts = []
    for mode, counter in ((CpuAttentionOnMeta(), _flop_counter()), (None, FlopCounterMode(display=False))):
        with counter:
            if mode is not None:
                with mode:
                    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            fwd = counter.get_total_flops()
            torch.autograd.grad(y.sum(), (q, k, v))
            counts.append((fwd, counter.get_total_flops()))
    products = 2 * (2 * 1 * 2 * 64 * 64 * 8)  # q @ k^T and p @ v
    assert counts[0] == counts[1] == (products, 3 * products)


def test_inspect_leaves_dynamo_unimported_and_compile_working_after(tmp_path):
    """In a fresh process: building on meta and inspecting import neither torch._dynamo nor
    torch._inductor; afterwards torch.compile still works (the stand-in is gone)."""
    code = (
        "import sys, torch\n"
        "from torchgraft.models.registry import list_models\n"
        "from torchgraft.tools.summary import inspect_model\n"
        "for name in ['llama-tiny', 'gpt-tiny', 'lenet', 'resnet18', 'vit-tiny', 'bert-tiny', 'mixtral-tiny']:\n"
        "    inspect_model(name)\n"
        "print('dynamo' if 'torch._dynamo' in sys.modules else 'no-dynamo',\n"
        "      'inductor' if 'torch._inductor' in sys.modules else 'no-inductor')\n"
        "f = torch.compile(lambda x: torch.sin(x) * 2, backend='eager')\n"
        "x = torch.randn(5)\n"
        "assert torch.equal(f(x), torch.sin(x) * 2)\n"
        "import torch._dynamo\n"
        "assert hasattr(torch._dynamo, 'optimize') and torch._dynamo.__file__\n"
        "print('compiled')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["no-dynamo", "no-inductor", "compiled"]


def test_meta_build_skips_initialisers_but_materialize_runs_them():
    import torchgraft

    m = torchgraft.build("gpt-tiny")  # built on meta (initialisers skipped), then materialized
    w = next(p for n, p in m.named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert w.device.type == "cpu" and 0.005 < w.std().item() < 0.1

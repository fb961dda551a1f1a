"""Chunked cross-entropy equals the plain projection + cross-entropy (loss and gradients)."""
import pytest
import torch
import torch.nn.functional as F

from torchgraft.nn.losses import chunked_cross_entropy
from torchgraft.testing import assert_close_computed, tolerance, transformer_tol
from conftest import InitialWeights, assert_same_run

pytestmark = pytest.mark.numeric  # float comparisons: re-run under a forced CPU capability (docs/testing.md)


def _plain(h, w, y, reduction):
    return F.cross_entropy(F.linear(h, w).float().reshape(-1, w.shape[0]), y.reshape(-1),
                           ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_ce_equals_plain_loss_and_grads(reduction, chunk):
    torch.manual_seed(0)
    b, t, c, v = 3, 17, 16, 97
    h0 = torch.randn(b, t, c)
    w0 = torch.randn(v, c) * 0.2
    y = torch.randint(0, v, (b, t))
    y[0, :5] = -100  # ignored targets
    y[2, -1] = -100
    results = []
    for fn in (_plain, lambda h, w, y, r: chunked_cross_entropy(h, w, y, chunk_size=chunk, reduction=r)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w, y, reduction)
        (loss * 1.7).backward()  # a non-unit upstream gradient
        results.append((loss.detach(), h.grad, w.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = results
    # projection (c terms), log-sum-exp (v), sum over the b*t rows; gradients run back through them
    tol = tolerance(reduction=max(c, v, b * t), depth=3)
    assert_close_computed(l2, l1, tol)
    assert_close_computed(gh2, gh1, 2 * tol)
    assert_close_computed(gw2, gw1, 2 * tol)


def test_chunked_ce_tied_weight_and_no_grad():
    """A weight that is also used elsewhere (tied embedding) accumulates both gradients; under
    no_grad the loss is still computed and no gradient buffers are made."""
    torch.manual_seed(1)
    emb = torch.nn.Embedding(50, 8)
    ids = torch.randint(0, 50, (2, 9))
    y = torch.randint(0, 50, (2, 9))
    grads = []
    for chunked in (False, True):
        emb.zero_grad()
        h = torch.tanh(emb(ids))
        loss = (chunked_cross_entropy(h, emb.weight, y, chunk_size=4) if chunked
                else _plain(h, emb.weight, y, "sum"))
        loss.backward()
        grads.append(emb.weight.grad.clone())
    tol = tolerance(reduction=50, depth=3)  # 50 classes, 18 rows, 8 features
    assert_close_computed(grads[1], grads[0], 2 * tol)
    with torch.no_grad():
        h = emb(ids)
        assert_close_computed(chunked_cross_entropy(h, emb.weight, y, chunk_size=5),
                              _plain(h, emb.weight, y, "sum"), tol)


def test_chunked_ce_under_bf16_autocast_matches_plain():
    """Under autocast the chunk projection runs in bf16 like the plain F.linear would."""
    torch.manual_seed(2)
    h0, w0 = torch.randn(40, 32), torch.randn(300, 32) * 0.1
    y = torch.randint(0, 300, (40,))
    out = []
    for fn in (lambda h, w: _plain(h, w, y, "sum"), lambda h, w: chunked_cross_entropy(h, w, y, chunk_size=16)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w)
        loss.backward()
        out.append((loss.detach(), h.grad, w.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = out
    tol = tolerance(reduction=300, depth=3, dtype=torch.bfloat16)  # bf16 products, fp32 sums
    assert_close_computed(l2, l1, tol)
    assert_close_computed(gh2, gh1, 2 * tol)
    assert_close_computed(gw2, gw1, 2 * tol)


def test_chunked_ce_rejects_bad_arguments():
    h, w, y = torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="rows"):
        chunked_cross_entropy(h, w, y[:3])


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])  # tied and untied heads
def test_lm_task_chunked_ce_equals_plain_loss_grads_and_eval(name):
    import torchgraft
    from torchgraft.train.tasks import build_task

    torch.manual_seed(0)
    model = torchgraft.build(name)
    ids = torch.randint(0, 256, (3, 20))
    labels = torch.randint(0, 256, (3, 20))
    labels[1, :6] = -100
    batch = {"input_ids": ids, "labels": labels}
    out = []
    for spec in ("lm", {"name": "lm", "chunked_ce": 16}):
        task = build_task(spec)
        model.zero_grad()
        loss = task.loss_sum(model, batch) / task.count(batch)  # as the trainer normalises it
        loss.backward()
        with torch.no_grad():
            sums = task.eval_sums(model, batch)
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sums))
    (l1, g1, s1), (l2, g2, s2) = out
    tol = transformer_tol(model.config, 20)
    assert_close_computed(l2, l1, tol)
    grad_scale = max(float(g.abs().max()) for g in g1.values())  # what the summed terms are made of
    for n in g1:
        assert_close_computed(g2[n], g1[n], 2 * tol, scale=grad_scale, msg=n)  # forward and backward
    assert int(s1["count"]) == int(s2["count"]) and int(s1["correct"]) == int(s2["correct"])
    assert_close_computed(s2["loss"], s1["loss"], tol)


def test_lm_task_chunked_ce_rejects_bad_values_and_models():
    from torchgraft.errors import ConfigError
    from torchgraft.train.tasks import build_task

    for bad in (0, -3, 1.5, True, "big"):
        with pytest.raises(ConfigError, match="chunked_ce"):
            build_task({"name": "lm", "chunked_ce": bad})
    task = build_task({"name": "lm", "chunked_ce": 8})
    plain = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.zeros(1, 3, dtype=torch.long)}
    with pytest.raises(ConfigError, match="output_embedding"):
        task.loss_sum(plain, batch)


def test_training_with_chunked_ce_follows_the_plain_run(tmp_path):
    """`task: {name: lm, chunked_ce: N}` through the engine: same losses step by step and the same
    final validation metrics as the plain LM task (same seed, same data)."""
    from torchgraft.train import run_training

    def cfg(task):
        return {"model": {"name": "gpt-tiny", "block_size": 32},
                "data": {"name": "text", "source": "builtin", "tokenizer": "char", "seq_len": 32,
                         "max_tokens": 20000},
                "task": task, "optim": {"name": "sgd", "lr": 0.3},  # SGD: see assert_same_run
                "trainer": {"max_steps": 6, "batch_size": 4, "seed": 0},
                "eval": {"max_batches": 2, "batch_size": 8},
                "logging": {"progress": False, "tensorboard": False, "every": 1, "measure_flops": False}}

    start = InitialWeights()
    plain = run_training(cfg("lm"), tmp_path / "plain", callbacks=[start])
    chunked = run_training(cfg({"name": "lm", "chunked_ce": 24}), tmp_path / "chunked")
    tol = 2 * transformer_tol(plain.model.config, 32)  # forward and backward of the same steps
    assert_close_computed(torch.tensor(chunked.metrics["val_loss"]), torch.tensor(plain.metrics["val_loss"]), tol)
    assert abs(chunked.metrics["val_accuracy"] - plain.metrics["val_accuracy"]) <= 1 / (2 * 8 * 32)  # one token
    assert_same_run(chunked.model.state_dict(), plain.model.state_dict(), start.state, tol)

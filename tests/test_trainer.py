"""The training engine on real data with small models: learning, determinism, accumulation, guards."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import torchgraft
from torchgraft.data.loader import DictTensorDataset
from torchgraft.data.registry import DataBundle
from torchgraft.errors import ConfigError
from torchgraft.testing import assert_close_computed, model_tol, tolerance, transformer_tol
from conftest import InitialWeights, assert_same_run
from torchgraft.train import Callback, NonFiniteError, run_training
from torchgraft.train.config import MOVED_KEYS, OptimConfig, ScheduleConfig, load_run_config
from torchgraft.train.mfu import count_flops, peak_flops
from torchgraft.train.optim import build_optimizer
from torchgraft.train.schedule import LRSchedule

SMALL_LENET = {"name": "lenet", "conv_channels": [4, 8], "hidden": 32}


def cfg(**options):
    """A small digits run; each option goes to its section (`eval_every` -> eval.every, ...)."""
    tree = {"model": dict(SMALL_LENET), "data": {"name": "digits"}, "optim": {"name": "adamw", "lr": 3e-3},
            "trainer": {"max_steps": 10, "batch_size": 32},
            "logging": {"progress": False, "tensorboard": False, "every": 1, "measure_flops": False}}
    for key, value in options.items():
        section, _, name = MOVED_KEYS.get(key, f"trainer.{key}").partition(".")
        tree.setdefault(section, {})[name] = value
    return tree


def test_lenet_learns_digits_and_writes_run_dir(tmp_path):
    c = cfg(max_steps=60, eval_every=30, checkpoint_every=30, tensorboard=True, measure_flops=True)
    res = run_training(c, tmp_path)
    assert res.metrics["val_accuracy"] > 0.8
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 61))
    assert all("loss" in r for r in recs) and recs[-1]["loss"] < recs[0]["loss"]
    assert recs[5]["flops_per_s"] > 0
    resolved = torchgraft.config.load_yaml(tmp_path / "config.yaml")
    assert resolved["trainer"]["max_steps"] == 60 and resolved["optim"]["lr"] == 3e-3
    ck = tmp_path / "checkpoints" / "step_00000060"
    sd = load_file(ck / "model.safetensors")
    assert set(sd) == set(res.model.state_dict())
    assert json.loads((ck / "meta.json").read_text())["model"]["family"] == "lenet"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_same_seed_same_weights_different_seed_differs(tmp_path):
    a = run_training(cfg(seed=3), tmp_path / "a").model.state_dict()
    b = run_training(cfg(seed=3), tmp_path / "b").model.state_dict()
    c = run_training(cfg(seed=4), tmp_path / "c").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc2.weight"], c["fc2.weight"])


class TinyLM(nn.Module):
    """Embedding -> causal running mean -> linear head: small, no dropout, uses every position."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)  # (B, T, C)
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)
        return self.head(torch.tanh(self.proj(h)))  # (B, T, V)


def variable_length_lm_data(n=16, t=12, vocab=11):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = ids.roll(-1, 1)
    lengths = torch.randint(2, t + 1, (n,), generator=g)  # 2..12 real tokens per row
    labels[torch.arange(t)[None, :] >= lengths[:, None]] = -100
    ds = DictTensorDataset(input_ids=ids, labels=labels)
    return DataBundle(train=ds, val=ds, task="lm")


def test_grad_accumulation_equals_full_batch_with_variable_lengths(tmp_path):
    data = variable_length_lm_data()
    torch.manual_seed(0)
    init = TinyLM().state_dict()
    out = {}
    for accum in (1, 4):
        model = TinyLM()
        model.load_state_dict(init)
        c = {"model": {}, "data": {}, "optim": {"name": "sgd", "lr": 0.5},
             "trainer": {"max_steps": 3, "batch_size": 16, "grad_accum_steps": accum},
             "logging": {"progress": False, "tensorboard": False, "measure_flops": False}}
        out[accum] = run_training(c, tmp_path / str(accum), model=model, data=data).model.state_dict()
    # gradients summed in 4 parts instead of one (192 token terms, 3 layers, forward and backward):
    # the runs differ by that relative error of how far the weights moved
    moved = max((out[1][k] - init[k]).abs().max().item() for k in init)
    for k in init:
        assert_close_computed(out[4][k], out[1][k], 2 * tolerance(reduction=192, depth=3), scale=moved, msg=k)
    assert not torch.allclose(out[1]["head.weight"], init["head.weight"])
    # the naive per-micro-batch mean is a different update, so the check above can fail
    model = TinyLM()
    model.load_state_dict(init)
    batch = data.train.get_batch(torch.arange(16))
    naive = 0
    for ids, lab in zip(batch["input_ids"].chunk(4), batch["labels"].chunk(4)):
        logits = model(ids)
        naive = naive + nn.functional.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=-100) / 4
    full = nn.functional.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten(),
                                       ignore_index=-100)
    assert abs(naive.item() - full.item()) > 1e-3


def test_weight_decay_groups_skip_norms_biases_embeddings():
    model = torchgraft.build("gpt-tiny")
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "tok_emb.weight" in plain and "blocks.0.attn_norm.weight" in plain
    assert "blocks.0.attn.q_proj.bias" in plain and "blocks.0.attn.q_proj.weight" in decayed
    opt2 = build_optimizer(model, OptimConfig(weight_decay=0.1, decay_embeddings=True, decay_norm_and_bias=True))
    assert len(opt2.param_groups) == 1
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())


def test_schedules():
    s = LRSchedule(ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1), 110)
    assert s.factor(0) == pytest.approx(0.1) and s.factor(9) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.55) and s.factor(110) == pytest.approx(0.1)
    lin = LRSchedule(ScheduleConfig(name="linear"), 100)
    assert lin.factor(50) == pytest.approx(0.5)
    wsd = LRSchedule(ScheduleConfig(name="wsd", warmup_steps=5, decay_fraction=0.2), 100)
    assert wsd.factor(50) == 1.0 and wsd.factor(79) == 1.0 and wsd.factor(90) == pytest.approx(0.5)
    assert LRSchedule(ScheduleConfig(), 100).factor(99) == 1.0


def test_frozen_params_and_param_groups_fn(tmp_path):
    model = torchgraft.build("lenet", num_classes=10, conv_channels=(4, 8), hidden=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in list(model.conv1.parameters()) + list(model.conv2.parameters()):
        p.requires_grad_(False)
    seen = {}

    def groups(m):
        return [{"params": list(m.fc1.parameters()), "lr": 1e-3},
                {"params": list(m.fc2.parameters()) + list(m.conv1.parameters()), "lr": 1e-2}]

    class Spy(Callback):
        def on_train_start(self, trainer):
            seen["lrs"] = [g["peak_lr"] for g in trainer.optimizer.param_groups]
            seen["n"] = sum(len(g["params"]) for g in trainer.optimizer.param_groups)

    res = run_training(cfg(max_steps=5), tmp_path, model=model, param_groups_fn=groups, callbacks=[Spy()])
    after = res.model.state_dict()
    assert torch.equal(after["conv1.weight"], before["conv1.weight"])
    assert not torch.equal(after["fc1.weight"], before["fc1.weight"])
    assert seen == {"lrs": [1e-3, 1e-2], "n": 4}


class NaNAfter(nn.Module):
    """Wraps a model; its output becomes NaN while `bad` is set."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.bad = inner, False

    def forward(self, x):
        y = self.inner(x)
        return y * float("nan") if self.bad else y


def test_nan_guard_skips_and_counts_then_stops(tmp_path):
    model = NaNAfter(torchgraft.build("lenet", conv_channels=(4, 8), hidden=32))
    state = {}

    class Toggle(Callback):
        def on_step_end(self, trainer, record):
            step = trainer.state.step
            model.bad = step == 3 or step >= 8  # one transient bad step, then a run of them
            if step == 8:
                state["w"] = model.inner.fc2.weight.detach().clone()

    with pytest.raises(NonFiniteError, match=r"stopped at step 11: 3 consecutive steps.*step_00000005"):
        run_training(cfg(max_steps=50, max_bad_steps=3, checkpoint_every=5), tmp_path, model=model,
                     callbacks=[Toggle()])
    assert torch.equal(model.inner.fc2.weight, state["w"])  # bad steps changed nothing
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[3]["skipped_steps"] == 1 and recs[-1]["skipped_steps"] == 4
    assert (tmp_path / "checkpoints" / "step_00000005" / "model.safetensors").exists()
    assert not (tmp_path / "checkpoints" / "step_00000010").exists()


def test_early_stopping_and_best_checkpoint(tmp_path):
    c = cfg(max_steps=200, eval_every=2, early_stopping_patience=2, early_stopping_min_delta=10.0,
            keep_last=1)
    res = run_training(c, tmp_path)
    assert res.step == 6 and "early stopping" in res.stop_reason
    assert res.best["step"] == 2 and res.best_checkpoint.name == "step_00000002"
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000002", "step_00000006"]


def test_callback_can_stop_and_all_hooks_run(tmp_path):
    calls = []

    class Stop(Callback):
        def on_train_start(self, t): calls.append("start")
        def on_eval_end(self, t, m): calls.append("eval")
        def on_checkpoint(self, t, p): calls.append("ckpt")
        def on_train_end(self, t, r): calls.append("end")

        def on_step_end(self, t, record):
            if t.state.step == 4:
                t.state.should_stop, t.state.stop_reason = True, "enough"

    res = run_training(cfg(max_steps=100), tmp_path, callbacks=[Stop()])
    assert res.step == 4 and res.stop_reason == "enough"
    assert calls == ["start", "ckpt", "eval", "end"] and "val_accuracy" in res.metrics


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_precisions_on_cpu(tmp_path, precision, dtype):
    model = torchgraft.build("lenet", conv_channels=(4, 8), hidden=32)
    seen = set()
    model.fc1.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    res = run_training(cfg(max_steps=30, precision=precision), tmp_path, model=model)
    assert dtype in seen
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(res.metrics["val_loss"]) and recs[-1]["loss"] < recs[0]["loss"]


def test_gpt_tiny_on_chars_loss_goes_down(tmp_path):
    c = {"model": {"name": "gpt-tiny"},
         "data": {"name": "text", "tokenizer": "char", "seq_len": 64, "cache_dir": str(tmp_path / "cache"),
                  "progress": False},
         "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
         "trainer": {"max_steps": 40, "batch_size": 16, "grad_accum_steps": 2, "grad_clip": 1.0},
         "eval": {"every": 40, "max_batches": 4},
         "logging": {"progress": False, "tensorboard": False, "every": 1}}
    res = run_training(c, tmp_path)
    assert res.model.config.vocab_size == 106  # filled from the data (3 specials + 103 characters)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["loss"] > 4.0 and res.metrics["val_loss"] < 3.0 and recs[-1]["tokens_per_s"] > 0


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="multiple of"):
        load_run_config(cfg(batch_size=10, grad_accum_steps=3))
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        load_run_config(cfg(max_step=3))
    with pytest.raises(ConfigError, match="must be one of"):
        load_run_config(cfg(precision="fp8"))
    bad = cfg()
    bad["model"]["num_classes"] = 7
    with pytest.raises(ConfigError, match="num_classes=7 does not fit the data"):
        run_training(bad, tmp_path)
    with pytest.raises(ConfigError, match="best_metric"):
        run_training(cfg(max_steps=2, best_metric="val_f1"), tmp_path / "x")


def test_mfu_peaks_and_flop_count():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(19.5e12)
    assert peak_flops("Some Unknown GPU", "bf16") is None
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)  # backward: grads of input and weight
    assert count_flops(lambda: lin(x)) == 2 * 8 * 64 * 32
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 8 * 64 * 32


@pytest.mark.slow
def test_compile_matches_eager(tmp_path):
    sgd = {"name": "sgd", "lr": 0.1}  # plain SGD: weights move by lr * gradient (assert_same_run)
    start = InitialWeights()
    res = run_training({**cfg(max_steps=3), "optim": sgd}, tmp_path / "e", callbacks=[start])
    compiled = run_training({**cfg(max_steps=3, compile=True), "optim": sgd}, tmp_path / "c").model.state_dict()
    assert_same_run(compiled, res.model.state_dict(), start.state, 2 * model_tol(res.model))


def test_resume_without_checkpoints_warns_and_starts_fresh(tmp_path):
    with pytest.warns(UserWarning, match="no checkpoint .* to resume from"):
        res = run_training(cfg(max_steps=2), tmp_path / "run", resume=True)
    assert res.step == 2


@pytest.mark.slow
def test_compiled_lm_loss_matches_eager(tmp_path):
    """`trainer.compile` compiles the model and the LM task's loss as one graph; the run must train
    the same weights as eager."""
    tree = {"model": {"name": "gpt-tiny", "n_layer": 1, "n_embd": 32, "block_size": 32},
            "data": {"name": "text", "source": "builtin", "tokenizer": "char", "seq_len": 32},
            "optim": {"name": "sgd", "lr": 0.1}, "trainer": {"max_steps": 3, "batch_size": 4},
            "eval": {"every": 0}, "checkpoint": {"every": 0, "save_best": False},
            "logging": {"progress": False, "tensorboard": False, "measure_flops": False}}
    start = InitialWeights()
    eager = run_training(tree, tmp_path / "e", callbacks=[start])
    tree["trainer"]["compile"] = True
    compiled = run_training(tree, tmp_path / "c")
    assert_same_run(compiled.model.state_dict(), eager.model.state_dict(), start.state,
              2 * transformer_tol(eager.model.config, 32))

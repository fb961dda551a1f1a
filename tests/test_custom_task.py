"""A new task and dataset defined in this file alone train through `run_training` (no edit of the loop):
a regression task (mean squared error, one loss unit per sample) on a toy linear dataset."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from torchgraft.data.loader import DictTensorDataset
from torchgraft.data.registry import DataBundle, register_dataset
from torchgraft.errors import ConfigError
from torchgraft.train import Task, register_task, run_training


class RegressionTask(Task):
    """{"inputs": (B, D), "targets": (B, K)} -> predictions (B, K); loss: squared error summed per sample."""

    name = "regression"
    unit = "samples"

    def count(self, batch):
        return torch.tensor(len(batch["targets"]), device=batch["targets"].device)

    def loss_sum(self, model, batch):
        err = model(batch["inputs"]).float() - batch["targets"]  # (B, K)
        return err.pow(2).sum(-1).sum()

    def eval_sums(self, model, batch):
        err = model(batch["inputs"]).float() - batch["targets"]
        return {"sq": err.pow(2).sum(-1).sum(), "abs": err.abs().sum(-1).sum(),
                "n": torch.tensor(len(err), dtype=torch.float64)}

    def metrics(self, sums):
        n = max(1.0, sums["n"])
        return {"val_loss": sums["sq"] / n, "val_mae": sums["abs"] / n}


def toy_linear(options, seed):
    """y = x @ W + 0.01 noise, D=8 -> K=2, 512 train / 128 val samples."""
    g = torch.Generator().manual_seed(int(options.get("data_seed", 0)))
    w = torch.randn(8, 2, generator=g)
    x = torch.randn(640, 8, generator=g)
    y = x @ w + 0.01 * torch.randn(640, 2, generator=g)
    return DataBundle(train=DictTensorDataset(inputs=x[:512], targets=y[:512]),
                      val=DictTensorDataset(inputs=x[512:], targets=y[512:]), task="regression")


register_task("regression", RegressionTask)
register_dataset("toy-linear", toy_linear)


def test_a_regression_task_from_a_test_file_trains(tmp_path):
    cfg = {"data": {"name": "toy-linear"}, "optim": {"name": "adamw", "lr": 0.05},
           "trainer": {"max_steps": 60, "batch_size": 32, "grad_accum_steps": 2},
           "eval": {"every": 20, "best_metric": "val_mae"},
           "logging": {"every": 1, "progress": False, "tensorboard": False, "measure_flops": False}}
    res = run_training(cfg, tmp_path, model=nn.Linear(8, 2))
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "val_loss" in r]
    assert len(evals) == 3 and evals[-1]["val_loss"] < 0.05 * evals[0]["val_loss"] + 1e-3
    assert recs[0]["loss"] > 10 * recs[-1]["loss"]
    assert res.metrics["val_mae"] < 0.2 and "tokens_per_s" not in recs[-1]  # unit: samples
    # "mae" is not in Task.higher_is_better's words: lower is better, the best is the last evaluation
    assert res.best == {"metric": "val_mae", "value": res.metrics["val_mae"], "step": 60}
    meta = json.loads((res.last_checkpoint / "meta.json").read_text())
    assert meta["task"] == "regression"


def test_config_task_overrides_the_data_task(tmp_path):
    cfg = {"data": {"name": "toy-linear"}, "task": "classification", "trainer": {"max_steps": 1, "batch_size": 8},
           "logging": {"progress": False, "tensorboard": False, "measure_flops": False}}
    with pytest.raises(KeyError):  # the classification task reads batch["labels"]: the override took effect
        run_training(cfg, tmp_path, model=nn.Linear(8, 2))
    with pytest.raises(ConfigError, match="unknown task 'regresion'.*regression"):
        run_training({**cfg, "task": "regresion"}, tmp_path / "b", model=nn.Linear(8, 2))

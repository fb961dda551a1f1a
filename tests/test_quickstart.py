"""The quickstart recipe: pretrain on digits 0-4, transfer all but the head, fine-tune vs scratch on 5-9."""
import json

import pytest
import torch

from torchgraft.recipes.quickstart import run_quickstart
from torchgraft.train import load_checkpoint


def _check_outputs(out, report):
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["pretrain"]["val_accuracy"] == report["pretrain"]["val_accuracy"]
    for stage in ("pretrain", "finetune", "scratch"):
        assert 0.0 <= on_disk[stage]["val_accuracy"] <= 1.0
        assert (out / stage / "checkpoints").is_dir()
    t = on_disk["finetune"]["transfer"]
    assert t["summary"]["copied"] == 6 and t["summary"]["excluded"] == 2
    assert (out / "curves.png").stat().st_size > 10_000
    pre, _ = load_checkpoint(out / "pretrain")
    ft, _ = load_checkpoint(out / "finetune")
    assert torch.equal(pre["conv2.weight"], ft["conv2.weight"])  # transferred, then frozen
    assert not torch.equal(pre["fc1.weight"], ft["fc1.weight"])  # transferred, then fine-tuned
    assert pre["fc2.weight"].shape == ft["fc2.weight"].shape == (5, 1024)


def test_quickstart_reduced(tmp_path):
    plan = {"pretrain": (40, 20), "finetune": (10, 5), "scratch": (10, 5)}
    report = run_quickstart(tmp_path, plan=plan, progress=False, echo=False)
    _check_outputs(tmp_path, report)
    assert report["pretrain"]["val_accuracy"] > 0.9


@pytest.mark.slow
def test_quickstart_fast_meets_acceptance(tmp_path):
    report = run_quickstart(tmp_path, fast=True, progress=False, echo=False)
    _check_outputs(tmp_path, report)
    assert report["pretrain"]["val_accuracy"] >= 0.95
    assert report["finetune"]["val_accuracy"] > report["scratch"]["val_accuracy"]

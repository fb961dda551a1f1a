"""The one CheckpointManager: each stateful part owns its entry, the manager owns cadence and rotation,
the engine only the layout; checkpoints written in the existing on-disk format keep resuming."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml

from torchgraft.checkpoint.files import checkpoint_files, list_checkpoints, write_checkpoint_dir
from torchgraft.checkpoint.manager import CheckpointManager, RNGState
from torchgraft.errors import CheckpointError
from torchgraft.train import run_training

SMALL = {"model": {"name": "lenet", "conv_channels": [4, 8], "hidden": 16}, "data": {"name": "digits"},
         "optim": {"name": "adamw", "lr": 3e-3}, "trainer": {"max_steps": 6, "batch_size": 16},
         "checkpoint": {"every": 3, "keep_last": 2},
         "logging": {"progress": False, "tensorboard": False, "measure_flops": False}}


class Counter:
    """A stateful part with a JSON value and a tensor."""

    def __init__(self):
        self.n, self.t = 0, torch.zeros(3)

    def state_dict(self):
        return {"n": self.n, "t": self.t.clone()}

    def load_state_dict(self, state):
        self.n, self.t = state["n"], state["t"].clone()


def _parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_each_part_owns_its_entry_and_rng_tensors_are_not_json(tmp_path):
    model, opt = _parts()
    counter = Counter()
    counter.n, counter.t = 7, torch.tensor([1.0, 2.0, 3.0])
    mgr = CheckpointManager(tmp_path, {"model": model, "optimizer": opt, "counter": counter, "rng": RNGState()},
                            meta=lambda: {"note": "x"})
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    path = mgr.save(5, last=True)
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())  # what the generators give next
    files = sorted(p.name for p in path.iterdir())
    assert files == ["counter.safetensors", "manifest.json", "meta.json", "model.safetensors",
                     "optimizer.json", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]
    ts = json.loads((path / "trainer_state.json").read_text())
    assert set(ts) == {"counter", "rng"} and ts["counter"] == {"n": 7}
    assert set(ts["rng"]) == {"python", "numpy"}  # the torch generator state is a tensor file of its own
    assert json.loads((path / "meta.json").read_text()) == {"note": "x", "step": 5}

    model2, opt2 = _parts()
    with torch.no_grad():
        model2.weight.zero_()
    counter2 = Counter()
    again = CheckpointManager(tmp_path, {"model": model2, "optimizer": opt2, "counter": counter2, "rng": RNGState()})
    random.seed(0)
    torch.manual_seed(0)
    ck = again.load()
    assert ck.path == path and again.last_saved == 5
    assert torch.equal(model2.weight, model.weight) and counter2.n == 7 and torch.equal(counter2.t, counter.t)
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


def test_cadence_rotation_and_best(tmp_path):
    model, _ = _parts()
    mgr = CheckpointManager(tmp_path, {"model": model}, every=2, keep_last=1, save_best=True)
    assert mgr.save(1) is None  # not due
    assert mgr.save(2).name == "step_00000002"
    assert mgr.save(3, best=("val_loss", 0.1)) is not None  # a new best is saved off-cadence
    mgr.save(4)
    mgr.save(5, last=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000005"]  # last 1 + best
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 3
    off = CheckpointManager(tmp_path / "b", {"model": model}, every=0)
    assert off.save(3, best=("val_loss", 0.1)) is None  # save_best off: a best alone does not save


def test_load_of_a_given_step_and_a_weights_only_checkpoint(tmp_path):
    model, opt = _parts()
    counter = Counter()
    mgr = CheckpointManager(tmp_path, {"model": model, "optimizer": opt, "counter": counter}, every=1, keep_last=3)
    for step in (1, 2):
        counter.n = step * 10
        mgr.save(step)
    again = Counter()
    m2, o2 = _parts()
    assert CheckpointManager(tmp_path, {"model": m2, "optimizer": o2, "counter": again}).load(step=1) is not None
    assert again.n == 10
    weights = CheckpointManager(tmp_path / "w", {"model": model})
    weights.save(1, last=True)
    with pytest.raises(CheckpointError, match="holds weights only; it cannot resume a run"):
        CheckpointManager(tmp_path / "w", {"model": m2, "optimizer": o2, "counter": Counter()}).load()
    with pytest.raises(CheckpointError, match="holds no other state; it cannot resume"):
        CheckpointManager(tmp_path, {"model": m2, "optimizer": o2, "counter": Counter(), "other": Counter()}).load()


def test_a_checkpoint_in_the_existing_format_resumes_a_run(tmp_path):
    """Written file by file as earlier torchgraft wrote them (engine keys at the top of
    trainer_state.json, RNG tensors in rng.safetensors): the manager resumes it and training goes on
    exactly as from its own checkpoint."""
    ref = run_training(SMALL, tmp_path / "ref")
    own = list_checkpoints(tmp_path / "ref" / "checkpoints")[0]  # step 3, written by the manager
    from torchgraft.checkpoint.files import read_checkpoint

    ck = read_checkpoint(own)
    ts = dict(ck.trainer_state)
    legacy_ts = {"state": ts["state"], "loader": ts["loader"], "rng": ts["rng"], "scaler": None}
    meta = {k: v for k, v in ck.meta.items() if k != "engine"}
    old = tmp_path / "old" / "checkpoints" / own.name
    write_checkpoint_dir(old, checkpoint_files(model_state=ck.model_state, meta=meta,
                                               optimizer_state=ck.optimizer_state, trainer_state=legacy_ts,
                                               rng_tensors=ck.rng_tensors))
    resumed = run_training(SMALL, tmp_path / "old", resume=True)
    assert resumed.step == 6
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_resume_with_nothing_left_keeps_config_yaml(tmp_path):
    run_training(SMALL, tmp_path)
    before = (tmp_path / "config.yaml").read_text()
    more_logging = {**SMALL, "logging": {**SMALL["logging"], "every": 7}}
    with pytest.warns(UserWarning, match="already trained to the end of its budget .*config.yaml is left"):
        res = run_training(more_logging, tmp_path, resume=True)
    assert res.step == 6 and (tmp_path / "config.yaml").read_text() == before
    longer = {**SMALL, "trainer": {**SMALL["trainer"], "max_steps": 9}}
    assert run_training(longer, tmp_path, resume=True).step == 9
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]["max_steps"] == 9

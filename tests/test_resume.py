"""Exact, O(1) resume: an interrupted run (exception or SIGKILL) continues to bitwise-equal weights."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from torchgraft.data import build_data
from torchgraft.train import Callback, run_training
from torchgraft.checkpoint.files import list_checkpoints

CFG = {"model": {}, "data": {"name": "digits"},
       "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.01},
       "schedule": {"name": "cosine", "warmup_steps": 5},
       "trainer": {"max_steps": 40, "batch_size": 32, "grad_clip": 1.0},
       "eval": {"every": 10}, "checkpoint": {"every": 4, "keep_last": 2},
       "logging": {"progress": False, "tensorboard": False, "measure_flops": False, "every": 1}}


def dropout_mlp():
    torch.manual_seed(0)  # dropout makes the result depend on the restored RNG state
    return nn.Sequential(nn.Flatten(), nn.Linear(1024, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))


class Boom(Exception):
    pass


class CountingData:
    """Wraps the digits bundle so we can count how many batches are gathered."""

    def __init__(self):
        self.bundle = build_data({"name": "digits"})
        self.calls = 0
        orig = self.bundle.train.get_batch

        def counted(idx):
            self.calls += 1
            return orig(idx)
        self.bundle.train.get_batch = counted


def test_resume_after_crash_is_exact_and_o1(tmp_path):
    ref = run_training(CFG, tmp_path / "ref", model=dropout_mlp()).model.state_dict()

    class CrashAt(Callback):
        def on_step_end(self, trainer, record):
            if trainer.state.step == 27:
                raise Boom()

    try:
        run_training(CFG, tmp_path / "run", model=dropout_mlp(), callbacks=[CrashAt()])
    except Boom:
        pass
    assert list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "step_00000024"
    data = CountingData()
    res = run_training(CFG, tmp_path / "run", model=dropout_mlp(), data=data.bundle, resume=True)
    assert data.calls == 40 - 24  # jumped to the saved position, no replay of consumed batches
    out = res.model.state_dict()
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # records of steps 25..27 from the crashed run were dropped
    # resuming a finished run is a no-op that keeps the weights
    again = run_training(CFG, tmp_path / "run", model=dropout_mlp(), resume=True)
    assert again.step == 40 and torch.equal(again.model.state_dict()["1.weight"], ref["1.weight"])


SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from torch import nn
    torch.set_num_threads(1)
    from torchgraft.train import Callback, run_training
    sys.path.insert(0, {tests!r})
    from test_resume import CFG, dropout_mlp

    out, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])

    class Slow(Callback):
        def on_step_end(self, trainer, record):
            time.sleep(delay)

    run_training(CFG, out, model=dropout_mlp(), resume=resume, callbacks=[Slow()])
""")


def _run(script, out, resume, delay):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(out), "1" if resume else "0", str(delay)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _final_weights(run):
    return load_file(list_checkpoints(run / "checkpoints")[-1] / "model.safetensors")


def test_sigkill_mid_run_then_resume_gives_bitwise_equal_weights(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    ref = _run(script, tmp_path / "ref", False, 0.0)  # uninterrupted, in its own process as well
    victim = _run(script, tmp_path / "run", False, 0.05)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(ckpts)) < 2 and victim.poll() is None:
        time.sleep(0.01)
    time.sleep(0.07)  # land somewhere after step ~12: mid-step or mid-checkpoint write
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    killed_at = list_checkpoints(ckpts)[-1].name
    assert killed_at < "step_00000040"  # it really was interrupted
    resumed = _run(script, tmp_path / "run", True, 0.0)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    a = _final_weights(tmp_path / "ref")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    b = _final_weights(tmp_path / "run")
    assert list_checkpoints(ckpts)[-1].name == "step_00000040"
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

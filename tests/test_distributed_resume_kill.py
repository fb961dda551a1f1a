"""SIGKILL a 2-process run (DDP, FSDP2) mid-way, resume it on 2 processes: the final weights are
bitwise equal to an uninterrupted 2-process run (same engine, same world size)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

CONFIG = """\
model: {family: gpt, n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, dropout: 0.1}
data: {name: text, source: builtin, tokenizer: char, seq_len: 32, val_fraction: 0.1, progress: false}
optim: {name: adamw, lr: 2.0e-3, weight_decay: 0.1}
trainer: {max_steps: 120, batch_size: 8, seed: 0}
eval: {every: 40, max_batches: 2, batch_size: 16}
checkpoint: {every: 2, keep_last: 2}
logging: {every: 1, progress: false, tensorboard: false, measure_flops: false}
"""


def _cmd(cfg, out, strategy, *extra):
    return [sys.executable, "-m", "torchgraft", "train", str(cfg), "--out", str(out), "--nproc", "2",
            f"distributed.strategy={strategy}", f"data.cache_dir={out.parent / 'cache'}", *extra]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigkill_two_processes_then_resume_is_bitwise_equal(tmp_path, strategy):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG)
    ref = subprocess.run(_cmd(cfg, tmp_path / "ref", strategy), capture_output=True, text=True, env=_env(),
                         timeout=400)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(cfg, run, strategy), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env(), start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_00000010").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    assert not (run / "checkpoints" / "step_00000120").exists()
    res = subprocess.run(_cmd(cfg, run, strategy, "--resume"), capture_output=True, text=True, env=_env(),
                         timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done: step 120" in res.stdout
    a = load_file(str(tmp_path / "ref" / "checkpoints" / "step_00000120" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step_00000120" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k

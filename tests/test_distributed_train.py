"""`torchgraft train CONFIG --nproc 2 distributed.strategy=fsdp`: runs under torchrun, resumes with
another number of processes, equals the uninterrupted run, and every rank's error reaches the user.

A one-process FSDP run (in this process) is the reference: its meta-device init equals a plain
build, so the 2-process continuation must reproduce its weights to float tolerance.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from torchgraft.config import load_yaml
from torchgraft.distributed import cleanup
from torchgraft.errors import ConfigError
from torchgraft.recipes.training import run_training
from torchgraft.testing import assert_close_computed, transformer_tol
from torchgraft.checkpoint.files import CheckpointFallbackWarning
from torchgraft.checkpoint.manager import CheckpointManager
from torchgraft.train.config import load_run_config
from conftest import InitialWeights, assert_same_run

CONFIG = """\
model: {family: gpt, n_layer: 2, n_head: 2, n_embd: 32, block_size: 32}
data: {name: text, source: builtin, tokenizer: char, seq_len: 32, val_fraction: 0.1}
optim: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.1}
trainer: {max_steps: 6, batch_size: 8, seed: 0}
eval: {every: 3, max_batches: 2, batch_size: 16}
checkpoint: {every: 2}
logging: {every: 1, progress: false, tensorboard: false}
"""


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "torchgraft", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _weights(run, step):
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def test_cli_fsdp_two_processes_resumes_across_world_sizes(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG)
    tree = {**load_yaml(cfg), "distributed": {"strategy": "fsdp"}}
    try:
        # reference: 6 uninterrupted steps, one FSDP process (sharded checkpoints with DCP)
        start = InitialWeights()
        ref = run_training(load_run_config(tree), tmp_path / "ref", callbacks=[start])
        # the same run stopped after 2 steps ...
        run = tmp_path / "run"
        run_training(load_run_config(tree, {"trainer.max_steps": 2}), run)
    finally:
        cleanup()
    assert (run / "checkpoints" / "step_00000002" / "dcp" / ".metadata").is_file()

    # ... resumed on 2 processes (1 -> 2) up to step 4 through the CLI (--nproc re-launches torchrun) ...
    shutil.rmtree(run / "tokenizer")  # rank 0 of the resumed run writes the data's tokenizer again
    r = _cli("train", str(cfg), "--out", str(run), "--nproc", "2", "--resume",
             "distributed.strategy=fsdp", "trainer.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: step 4") == 1, r.stdout          # only rank 0 reports
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps                              # one writer: rank 0
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    shards = sorted(p.name for p in (run / "checkpoints" / "step_00000004" / "dcp").glob("*.distcp"))
    assert len(shards) == 2, shards                               # written by 2 ranks

    # ... and finished in one plain process (2 -> 1, strategy none: reads the DCP shards)
    res = run_training(load_run_config(load_yaml(cfg)), run, resume=True)
    assert res.step == 6
    ref_w, got = _weights(tmp_path / "ref", 6), _weights(run, 6)
    assert set(ref_w) == set(got)
    tol = 2 * transformer_tol(res.model.config, 32)  # 2 ranks sum the gradients in another order
    assert_same_run(got, ref_w, start.state, tol)
    assert abs(res.metrics["val_loss"] - ref.metrics["val_loss"]) <= tol * ref.metrics["val_loss"]

    # a single-file checkpoint of a plain run seeds an FSDP run (full weights cut into shards)
    plain = tmp_path / "plain"
    try:
        run_training(load_run_config(load_yaml(cfg), {"trainer.max_steps": 2}), plain)
        run_training(load_run_config(tree, {"trainer.max_steps": 4}), plain, resume=True)
    finally:
        cleanup()
    assert not (plain / "checkpoints" / "step_00000002" / "dcp").exists()
    assert (plain / "checkpoints" / "step_00000004" / "dcp").is_dir()
    ref_w, got = _weights(tmp_path / "ref", 4), _weights(plain, 4)
    assert_same_run(got, ref_w, start.state, tol)

    # a damaged shard fails the newest sharded checkpoint's manifest: resume falls back to the previous one
    shard = next((tmp_path / "ref" / "checkpoints" / "step_00000006" / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(CheckpointFallbackWarning, match="corrupted"):
        assert CheckpointManager(tmp_path / "ref" / "checkpoints").newest_verified().name == "step_00000004"


def test_cli_errors_of_every_rank_reach_the_user(tmp_path, capsys):
    from torchgraft.cli import main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG)
    # caught before launching anything: one line, exit 2
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(cfg), "--nproc", "2", "distributed.strategy=fsdpp"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "did you mean 'fsdp'" in err and "Traceback" not in err, err
    # raised on every rank: each rank's line is shown, then the launcher's summary
    r = _cli("train", str(cfg), "--out", str(tmp_path / "bad"), "--nproc", "2",
             "distributed.strategy=ddp", "trainer.batch_size=7")
    assert r.returncode != 0
    for rank in (0, 1):
        assert f"error: [rank {rank}] trainer.batch_size=7" in r.stderr, r.stderr[-2000:]
    assert "2-process run failed" in r.stderr


@pytest.mark.parametrize("bad, match", [({"activation_checkpointing": "sometimes"}, "activation_checkpointing"),
                                        ({"mixed_precision": "int3"}, "mixed_precision")])
def test_bad_distributed_options_fail_with_one_line(tmp_path, bad, match):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG)
    tree = {**load_yaml(cfg), "distributed": {"strategy": "fsdp", **bad}}
    try:
        with pytest.raises(ConfigError, match=match):
            run_training(load_run_config(tree), tmp_path / "r")
    finally:
        cleanup()


def test_lora_finetune_under_fsdp_equals_one_process_and_writes_adapters(tmp_path):
    """A model handed to the engine (the finetune recipe) and trained with FSDP comes back
    unsharded: the recipe saves PEFT adapters equal to those of a plain run."""
    from torchgraft.recipes.finetune import run_finetune

    llama = {"family": "llama", "n_layer": 2, "n_head": 2, "n_kv_head": 1, "n_embd": 32,
             "intermediate_size": 64, "block_size": 32}
    base = {**load_yaml_text(CONFIG), "model": llama}
    run_training(load_run_config(base, {"trainer.max_steps": 1}), tmp_path / "src")
    ft = {**base, "finetune": {"source": str(tmp_path / "src"), "method": "lora",
                               "lora": {"targets": ["q_proj", "v_proj"], "rank": 4, "alpha": 8}}}
    run_finetune(ft, tmp_path / "plain", ["trainer.max_steps=3"])
    try:
        run_finetune(ft, tmp_path / "fsdp", ["trainer.max_steps=3", "distributed.strategy=fsdp"])
    finally:
        cleanup()
    a = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and len(a) == 8
    # SGD runs (conftest.assert_same_run); the largest adapter value bounds how far any adapter moved
    # in 3 steps (B starts at zero, A moves far less than its init)
    moved = max(v.abs().max().item() for v in a.values())
    for k in a:
        assert_close_computed(b[k], a[k], 2 * transformer_tol(SimpleNamespace(**llama), 32), scale=moved, msg=k)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)   # the adapters did train


def load_yaml_text(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)

"""The fuzz table of issue 15: every bad input gets exit code 2, exactly one `error:` line on stderr,
no traceback, within a time bound, and leaves the existing run directories untouched.

Cases run in-process through `torchgraft.cli.main` (start-up is measured by benchmarks/bench_startup.py
and test_startup_is_fast below); the lock, disk-full and SIGKILL cases check the behaviour of issue
items 3-4 instead of a plain error line.
"""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from torchgraft.cli import main
from conftest import invoke_cli

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.measure_flops=false"]
LENET = ["configs/lenet-digits.yaml", "trainer.max_steps=2", "trainer.batch_size=16", "eval.every=0",
         "schedule.warmup_steps=0", "checkpoint.every=0",  # a warm-up and cadences that fit 2 steps
         "eval.max_batches=1", "model.conv_channels=[4,8]", "model.hidden=16", *QUIET]
GPT = ["configs/gpt-char.yaml", "trainer.max_steps=2", "trainer.batch_size=4", "eval.max_batches=1", "eval.every=0",
       "schedule.warmup_steps=0", "checkpoint.every=0",
       "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=32", "model.block_size=32", *QUIET]
TIME_BOUND_S = 60  # generous on 2 busy cores; a hang (issue: 60-150 s) still fails


run = invoke_cli  # (exit code, stdout, stderr, seconds) of one in-process CLI call


def snapshot(*dirs: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for d in dirs for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny lenet run, a tiny char-GPT run, a Hugging Face copy of the GPT, and scratch files."""
    base = tmp_path_factory.mktemp("fuzz")
    for name, argv in (("lenet", LENET), ("lm", GPT)):
        main(["train", *argv, "--out", str(base / name)])
    main(["convert", str(base / "lm"), str(base / "hf")])
    (base / "afile").write_text("x")
    (base / "foreign").mkdir()
    (base / "foreign" / "precious.txt").write_text("keep me")
    (base / "foreign" / "sub").mkdir()
    (base / "empty.yaml").write_text("")
    (base / "list.yaml").write_text("- 1\n- 2\n")
    (base / "garbage.yaml").write_bytes(bytes(range(256)) * 8)
    bomb = "model: {name: lenet}\ndata:\n  name: digits\n  labels: " + _bomb() + "\n"
    (base / "bomb.yaml").write_text(bomb)
    for key, value in (("n_layer", 100000), ("n_embd", 10**9), ("vocab_size", 10**12), ("n_positions", -5)):
        d = base / f"hf_{key}"
        d.mkdir()
        for f in (base / "hf").iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    extra = base / "hf_extra"  # a tensor with no torchgraft name: strict convert names --no-strict
    extra.mkdir()
    for f in (base / "hf").iterdir():
        (extra / f.name).write_bytes(f.read_bytes())
    state = load_file(str(extra / "model.safetensors"))
    state["transformer.h.0.attn.unknown.weight"] = next(iter(state.values())).clone()
    save_file(state, str(extra / "model.safetensors"), metadata={"format": "pt"})
    return base


def _bomb() -> str:
    """"Billion laughs": 9 levels of a list holding one anchored list and 8 aliases of it (9^9 values)."""
    text = '["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    for a in "abcdefgh":
        text = f"[&{a} {text}" + f",*{a}" * 8 + "]"
    return text


B = "{base}"  # placeholder replaced by the fixture's directory
CASES = [
    # (id, argv, message fragment)
    ("lr-nan", ["train", *LENET, "optim.lr=.nan", "--out", f"{B}/new"], "optim.lr=nan"),
    ("lr-inf", ["train", *LENET, "optim.lr=.inf", "--out", f"{B}/new"], "optim.lr=inf"),
    ("lr-zero", ["train", *LENET, "optim.lr=0", "--out", f"{B}/new"], "optim.lr must be > 0"),
    ("betas", ["train", *LENET, "optim.betas=[0.9,1.5]", "--out", f"{B}/new"], "optim.betas"),
    ("weight-decay", ["train", *LENET, "optim.weight_decay=-1", "--out", f"{B}/new"], "optim.weight_decay=-1"),
    ("eval-batch-0", ["train", *LENET, "eval.batch_size=0", "--out", f"{B}/new"], "eval.batch_size=0"),
    ("old-eval-key", ["train", *LENET, "trainer.eval_batch_size=0", "--out", f"{B}/new"], "eval.batch_size"),
    ("device-garbage", ["train", *LENET, "trainer.device=garbage", "--out", f"{B}/new"], "trainer.device='garbage'"),
    ("device-cuda7", ["train", *LENET, "trainer.device=cuda:7", "--out", f"{B}/new"], "trainer.device='cuda:7'"),
    ("grad-clip", ["train", *LENET, "trainer.grad_clip=-1", "--out", f"{B}/new"], "trainer.grad_clip=-1"),
    ("max-steps-huge", ["train", *LENET, "trainer.max_steps=1000000000000000000000000000000", "--out", f"{B}/new"],
     "trainer.max_steps"),
    ("max-steps-0", ["train", *LENET, "trainer.max_steps=0", "--out", f"{B}/new"], "trainer.max_steps"),
    ("batch-0", ["train", *LENET, "trainer.batch_size=0", "--out", f"{B}/new"], "trainer.batch_size"),
    ("seq-gt-block", ["train", *GPT, "data.seq_len=64", "--out", f"{B}/new"], "data.seq_len=64 is larger than "
                                                                            "model.block_size=32"),
    ("image-size", ["train", *LENET, "model.image_size=28", "--out", f"{B}/new"], "model.image_size=28"),
    ("n-layer-0", ["train", *GPT, "model.n_layer=0", "--out", f"{B}/new"], "model.n_layer must be >= 1"),
    ("out-is-file", ["train", *LENET, "--out", f"{B}/afile"], "is an existing file"),
    ("out-under-file", ["train", *LENET, "--out", f"{B}/afile/run"], "which is a file"),
    ("out-foreign", ["train", *LENET, "--out", f"{B}/foreign"], "not a torchgraft run directory"),
    ("empty-yaml", ["train", f"{B}/empty.yaml", "--out", f"{B}/new"], "is empty"),
    ("list-yaml", ["train", f"{B}/list.yaml", "--out", f"{B}/new"], "must hold a mapping"),
    ("garbage-yaml", ["train", f"{B}/garbage.yaml", "--out", f"{B}/new"], "not a text YAML file"),
    ("alias-bomb", ["train", f"{B}/bomb.yaml", "--out", f"{B}/new"], "expands to more than"),
    ("missing-yaml", ["train", f"{B}/nope.yaml", "--out", f"{B}/new"], "config file not found"),
    ("bad-override", ["train", *LENET, "optim.lr", "--out", f"{B}/new"], "must look like key=value"),
    ("generate-cuda", ["generate", f"{B}/lm", "--device", "cuda", "-n", "2"], "--device='cuda'"),
    ("generate-cuda7", ["generate", f"{B}/lm", "--device", "cuda:7", "-n", "2"], "--device='cuda:7'"),
    ("generate-t-nan", ["generate", f"{B}/lm", "-t", "nan", "-n", "2"], "--temperature"),
    ("generate-n-0", ["generate", f"{B}/lm", "-n", "0"], "--max-new-tokens"),
    ("generate-lenet", ["generate", f"{B}/lenet", "-n", "2"], "not a language model"),
    ("generate-missing", ["generate", f"{B}/nope", "-n", "2"], "model path not found"),
    ("eval-batch-0", ["eval", f"{B}/lm", "--batch-size", "0"], "--batch-size"),
    ("eval-max-batches-0", ["eval", f"{B}/lm", "--max-batches", "0"], "--max-batches"),
    ("eval-lenet", ["eval", f"{B}/lenet"], "not a language model"),
    ("plot-bad-ext", ["plot", f"{B}/lenet", "--out", f"{B}/x.bad-extension"], "unsupported image type"),
    ("plot-not-run", ["plot", f"{B}/foreign"], "has no metrics.jsonl"),
    ("tokenizer-out-file", ["tokenizer", "train", "README.md", "--vocab-size", "300", "--out", f"{B}/afile"],
     "is an existing file"),
    ("tokenizer-out-foreign", ["tokenizer", "train", "README.md", "--vocab-size", "300", "--out", f"{B}/foreign"],
     "is not empty"),
    ("inspect-deep", ["inspect", "gpt2", "n_layer=10000"], "model.n_layer=10000 is more blocks"),
    ("inspect-deeper", ["inspect", "gpt2", "n_layer=100000"], "model.n_layer=100000 is more blocks"),
    ("inspect-indivisible", ["inspect", "gpt2", "n_layer=6", "n_embd=512"], "divisible"),
    ("hf-deep", ["convert", f"{B}/hf_n_layer", f"{B}/new"], "more blocks"),
    ("hf-wide", ["convert", f"{B}/hf_n_embd", f"{B}/new"], "cannot be built"),
    ("hf-vocab", ["generate", f"{B}/hf_vocab_size", "-n", "2"], "shape mismatch"),
    ("hf-negative", ["convert", f"{B}/hf_n_positions", f"{B}/new"], "model.block_size must be >= 1, got -5"),
    ("hf-strict", ["convert", f"{B}/hf_extra", f"{B}/new"], "pass --no-strict"),
    ("convert-foreign", ["convert", f"{B}/hf", f"{B}/foreign"], "is not empty"),
    ("convert-into-run", ["convert", f"{B}/hf", f"{B}/lenet"], "is not empty"),
    ("convert-to-file", ["convert", f"{B}/hf", f"{B}/afile"], "is an existing file"),
    ("resume-optim-name", ["train", *LENET, "optim.name=sgd", "--out", f"{B}/lenet", "--resume"],
     "optim.name='sgd'"),
    ("resume-model-change", ["train", *LENET, "model.hidden=24", "--out", f"{B}/lenet", "--resume"],
     "model.hidden (16 -> 24)"),
    ("resume-split-change", ["train", *LENET, "data.val_fraction=0.3", "--out", f"{B}/lenet", "--resume"],
     "data.val_fraction (0.2 -> 0.3)"),
    ("fresh-over-run", ["train", *LENET, "--out", f"{B}/lenet"], "already holds checkpoints"),
]


@pytest.mark.parametrize("argv,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(runs, capsys, one_thread, argv, message):
    argv = [a.replace(B, str(runs)) for a in argv]
    before = snapshot(runs / "lenet", runs / "lm", runs / "hf", runs / "foreign")
    code, _, err, seconds = run(argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    assert seconds < TIME_BOUND_S
    assert snapshot(runs / "lenet", runs / "lm", runs / "hf", runs / "foreign") == before  # untouched
    assert not (runs / "new").exists()  # a refused run leaves nothing behind
    assert (runs / "foreign" / "precious.txt").read_text() == "keep me"


def test_non_finite_from_the_start_stops_with_exit_2(tmp_path, capsys, one_thread):
    code, out, err, _ = run(["train", *LENET, "optim.lr=1e30", "trainer.grad_clip=0", "trainer.max_bad_steps=2",
                             "trainer.max_steps=6", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "done" not in out
    assert "non-finite" in err and err.count("\n") == 1


def test_second_writer_is_refused_and_a_stale_lock_taken_over(runs, tmp_path, capsys, one_thread):
    from torchgraft.train.lock import LOCK_NAME, RunLock

    with RunLock(runs / "lenet"):  # another process training there (flock held)
        before = snapshot(runs / "lenet")
        code, _, err, _ = run(["train", *LENET, "trainer.max_steps=3", "--out", runs / "lenet", "--resume"], capsys)
        assert code == 2 and f"pid {os.getpid()}" in err and "in use" in err and err.count("\n") == 1
        assert snapshot(runs / "lenet") == {**before, **{k: v for k, v in snapshot(runs / "lenet").items()
                                                         if k.endswith(LOCK_NAME)}}
    # a lock file left by a killed process: no flock held, dead pid inside -> taken over with a warning
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 7, "host": "somewhere", "started": 0}))
    with pytest.warns(UserWarning, match="stale lock"):
        code, out, err, _ = run(["train", *LENET, "--out", run_dir], capsys)
    assert code == 0 and "done: step 2" in out and not (run_dir / LOCK_NAME).exists()


def test_resume_applies_changed_optimizer_settings(tmp_path, capsys, one_thread):
    from torchgraft.checkpoint.files import load_latest

    out = tmp_path / "r"
    assert run(["train", *LENET, "checkpoint.every=2", "--out", out], capsys)[0] == 0
    with pytest.warns(UserWarning, match="changed config") as rec:
        code, stdout, err, _ = run(["train", *LENET, "trainer.max_steps=4", "optim.lr=5e-3",
                                    "optim.weight_decay=0.2", "optim.betas=[0.8,0.95]", "--out", out, "--resume"],
                                   capsys)
    assert code == 0, err
    logged = " ".join(str(w.message) for w in rec)
    assert "optim.lr (0.001 -> 0.005)" in logged and "param groups: betas" in logged
    ck = load_latest(out)
    groups = ck.optimizer_state["param_groups"]
    assert all(g["peak_lr"] == pytest.approx(5e-3) for g in groups)
    assert {tuple(g["betas"]) for g in groups} == {(0.8, 0.95)}
    assert max(g["weight_decay"] for g in groups) == pytest.approx(0.2)
    assert ck.meta["run_config"]["optim"]["lr"] == pytest.approx(5e-3)  # meta.json records what ran


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, capsys, monkeypatch, one_thread):
    import torchgraft.checkpoint.files as ckmod
    from torchgraft.checkpoint.files import load_latest

    out = tmp_path / "r"
    assert run(["train", *LENET, "checkpoint.every=2", "--out", out], capsys)[0] == 0
    good = load_latest(out)
    real = ckmod.write_synced

    def full(path, data):
        if Path(path).name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(ckmod, "write_synced", full)
    code, out_text, err, _ = run(["train", *LENET, "trainer.max_steps=4", "checkpoint.every=2", "--out", out,
                                  "--resume"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # (plus the resume warning)
    assert code == 2 and len(errors) == 1 and "disk full" in errors[0] and "Traceback" not in err
    monkeypatch.setattr(ckmod, "write_synced", real)
    again = load_latest(out)
    assert again.path == good.path and not list(out.glob("checkpoints/.tmp-*"))


_KILL_IN_ROTATION = """
import os, signal, sys
import torchgraft.checkpoint.manager as ck  # where rotation deletes
real = ck.remove_dir
def kill(path):
    if "step_" in str(path):  # renamed aside, not yet deleted: die here
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path)
ck.remove_dir = kill
from torchgraft.cli import main
main(sys.argv[1:])
"""


def test_sigkill_during_rotation_of_old_checkpoints_resumes(tmp_path, capsys, one_thread):
    from torchgraft.checkpoint.files import list_checkpoints, load_latest

    out = tmp_path / "r"
    argv = [*LENET, "trainer.max_steps=6", "checkpoint.every=1", "checkpoint.keep_last=1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_ROTATION, "train", *argv], cwd=ROOT, env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert load_latest(out).meta["step"] >= 1  # a good checkpoint survived the kill
    code, stdout, err, _ = run(["train", *argv, "--resume"], capsys)
    assert code == 0 and "done: step 6" in stdout, err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000006"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith((".trash", ".tmp"))]


def test_convert_into_non_empty_dir_only_with_overwrite(runs, tmp_path, capsys):
    dst = tmp_path / "v"
    (dst / "sub").mkdir(parents=True)
    (dst / "precious.txt").write_text("x")
    before = snapshot(dst)
    code, _, err, _ = run(["convert", runs / "hf", dst], capsys)
    assert code == 2 and "--overwrite" in err and snapshot(dst) == before
    code, _, err, _ = run(["convert", runs / "hf", dst, "--overwrite"], capsys)
    assert code == 0, err
    assert (dst / "manifest.json").is_file() and not (dst / "precious.txt").exists()  # replaced, not mixed


def test_corrupted_source_is_detected_by_transfer_and_finetune(runs, tmp_path, capsys):
    import shutil

    import torchgraft
    from torchgraft.errors import CheckpointError

    run_dir = tmp_path / "lenet"
    shutil.copytree(runs / "lenet", run_dir)
    for ck in (run_dir / "checkpoints").glob("step_*"):
        f = ck / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF  # one flipped byte in the weights
        f.write_bytes(bytes(data))
    model = torchgraft.build("lenet", num_classes=5, conv_channels=[4, 8], hidden=16)
    with pytest.raises(CheckpointError, match="sha256 mismatch"), pytest.warns(UserWarning):
        torchgraft.transfer(run_dir, model)
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"finetune: {{source: {run_dir}, exclude: ['fc2.*']}}\n"
                   "model: {name: lenet, conv_channels: [4, 8], hidden: 16}\n"
                   "data: {name: digits, labels: [5, 6, 7, 8, 9], per_class: 4}\n"
                   "trainer: {max_steps: 1, batch_size: 8}\n"
                   "logging: {progress: false, tensorboard: false, measure_flops: false}\n")
    code, _, err, _ = run(["finetune", cfg, "--out", tmp_path / "ft"], capsys)
    assert code == 2 and "sha256 mismatch" in err and "Traceback" not in err


def test_startup_is_fast():
    """`torchgraft --help` and a config error import neither torch nor the zoo."""
    code = ("import sys; from torchgraft.cli import main\n"
            "for argv in (['--help'], ['train', 'configs/lenet-digits.yaml', 'trainer.max_step=1']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "did you mean 'max_steps'" in proc.stderr

"""`torchgraft train / plot / quickstart` command line: success paths and one-line errors (exit 2)."""
import json

import pytest

from torchgraft.cli import main

FAST = ["trainer.max_steps=4", "schedule.warmup_steps=0", "logging.progress=false", "logging.tensorboard=false",
        "eval.every=2", "checkpoint.every=2", "model.conv_channels=[4,8]", "model.hidden=16"]


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_train_then_resume_then_plot(tmp_path, capsys):
    main(["train", "configs/lenet-digits.yaml", "--out", str(tmp_path / "r"), *FAST])
    out = capsys.readouterr().out
    assert "done: step 4" in out
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 4 and "val_accuracy" in recs[-1]
    main(["train", "configs/lenet-digits.yaml", "--out", str(tmp_path / "r"), *FAST, "trainer.max_steps=6",
          "--resume"])
    assert "done: step 6" in capsys.readouterr().out
    main(["plot", str(tmp_path / "r"), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 5_000


@pytest.mark.parametrize("argv,message", [
    (["train", "configs/lenet-digits.yaml", "trainer.max_step=3"], "did you mean 'max_steps'"),
    (["train", "configs/lenet-digits.yaml", "model.name=lenett"], "unknown model 'lenett' (did you mean 'lenet'"),
    (["train", "configs/nope.yaml"], "config file not found"),
    (["train", "configs/lenet-digits.yaml", "trainer.init_from=/no/such/run"], "checkpoint not found"),
    (["train", "configs/lenet-digits.yaml", "trainer.precision=fp8"], "must be one of"),
    (["plot", "/no/such/run"], "has no metrics.jsonl"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    code, _, err = run(argv + (["--out", str(tmp_path / "x")] if argv[0] == "train" else []), capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_resume_with_only_corrupted_checkpoints_is_an_error(tmp_path, capsys):
    main(["train", "configs/lenet-digits.yaml", "--out", str(tmp_path / "r"), *FAST])
    capsys.readouterr()
    for ck in (tmp_path / "r" / "checkpoints").glob("step_*"):
        (ck / "model.safetensors").write_bytes(b"garbage")
    code, _, err = run(["train", "configs/lenet-digits.yaml", "--out", str(tmp_path / "r"), *FAST, "--resume"],
                       capsys)
    assert code == 2 and "no good checkpoint" in err


@pytest.mark.parametrize("config", ["configs/lenet-digits.yaml", "configs/vit-digits.yaml", "configs/gpt-char.yaml"])
def test_shipped_configs_run(tmp_path, config):
    from torchgraft.train import load_run_config, run_training

    cfg = load_run_config(config, ["trainer.max_steps=2", "schedule.warmup_steps=0", "trainer.batch_size=8", "eval.max_batches=1",
                                   "logging.progress=false", "logging.tensorboard=false",
                                   "logging.measure_flops=false"])
    res = run_training(cfg, tmp_path)
    assert res.step == 2 and res.metrics["val_loss"] > 0

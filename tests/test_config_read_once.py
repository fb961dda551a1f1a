"""The run config is read once: `torchgraft train CONFIG k=v` reads the YAML, parses the overrides,
builds the RunConfig and checks it exactly once, and the trainer, the engine choice and the run
files all get that one typed object. One `run_training` behind both public names."""
from __future__ import annotations

import subprocess
import sys

import pytest

import torchgraft.config
import torchgraft.train.config as train_config
from torchgraft.cli import main
from torchgraft.errors import ConfigError

FAST = ["trainer.max_steps=2", "schedule.warmup_steps=0", "logging.progress=false", "logging.tensorboard=false",
        "logging.measure_flops=false", "eval.max_batches=1", "model.conv_channels=[4,8]", "model.hidden=16"]


def _count(monkeypatch, module, name, counts, only=None):
    real = getattr(module, name)

    def counted(*args, **kwargs):
        if only is None or only(*args):
            counts[name] = counts.get(name, 0) + 1
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)


def test_train_config_with_overrides_is_parsed_and_checked_once(tmp_path, monkeypatch, capsys):
    counts: dict[str, int] = {}
    _count(monkeypatch, train_config, "load_yaml", counts)
    _count(monkeypatch, torchgraft.config, "load_yaml", counts)  # a reader that imports it at call time
    _count(monkeypatch, torchgraft.config, "parse_overrides", counts)
    _count(monkeypatch, train_config, "from_dict", counts, only=lambda cls, *a: cls is train_config.RunConfig)
    _count(monkeypatch, train_config, "check_run_config", counts)
    seen = []
    from torchgraft.train.trainer import Trainer

    real_init = Trainer.__init__

    def init(self, cfg, *args, **kwargs):
        seen.append(cfg)
        real_init(self, cfg, *args, **kwargs)
    monkeypatch.setattr(Trainer, "__init__", init)

    main(["train", "configs/lenet-digits.yaml", "--out", str(tmp_path / "r"), *FAST, "trainer.seed=3"])
    assert "done: step 2" in capsys.readouterr().out
    assert counts == {"load_yaml": 1, "parse_overrides": 1, "from_dict": 1, "check_run_config": 1}
    assert len(seen) == 1 and isinstance(seen[0], train_config.RunConfig)  # the typed config, not a path
    assert seen[0].trainer.seed == 3 and seen[0].model["hidden"] == 16


def test_a_parsed_config_is_not_parsed_again():
    cfg = train_config.load_run_config("configs/lenet-digits.yaml", ["trainer.seed=3"])
    assert train_config.load_run_config(cfg) is cfg
    again = train_config.load_run_config(cfg, ["trainer.seed=4"])
    assert (again.trainer.seed, cfg.trainer.seed) == (4, 3)


def test_one_run_training_behind_both_public_names():
    import torchgraft
    import torchgraft.train
    from torchgraft.recipes.training import run_training

    assert torchgraft.run_training is run_training and torchgraft.train.run_training is run_training
    import torchgraft.train.trainer

    assert not hasattr(torchgraft.train.trainer, "run_training")


@pytest.mark.parametrize("override, message", [
    ("distributed.activation_checkpointing=sometimes", "distributed.activation_checkpointing='sometimes' is not valid"),
    ("distributed.mixed_precision=int3", "distributed.mixed_precision='int3' is not a precision"),
    ("distributed.mixed_precision=bf16-true", "would store the weights in 16 bits"),
    ("distributed.strategy=zero3", "distributed.strategy: must be one of"),
])
def test_the_distributed_section_is_checked_with_the_rest(override, message):
    with pytest.raises(ConfigError, match=message):
        train_config.load_run_config("configs/lenet-digits.yaml", [override])


def test_config_errors_import_no_torch():
    """The whole check (distributed modes and precision names included) runs without torch, for a run
    config and for a fine-tune config."""
    code = ("import sys\nfrom torchgraft.train.config import load_run_config\nfrom torchgraft.errors import ConfigError\n"
            "from torchgraft.recipes.finetune import load_finetune_config\n"
            "for load, path in ((load_run_config, 'configs/lenet-digits.yaml'),\n"
            "                   (load_finetune_config, 'configs/finetune-lenet.yaml')):\n"
            "    try:\n        load(path, ['distributed.mixed_precision=bf61'])\n"
            "    except ConfigError as e:\n        print(e)\nprint('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 3 and all("did you mean 'bf16'" in line for line in lines[:2]), out
    assert lines[-1] == "False"

"""The run config's sections (trainer / eval / checkpoint / logging / task / distributed)."""
from __future__ import annotations

import pytest

from torchgraft.errors import ConfigError
from torchgraft.train.config import MOVED_KEYS, DistributedConfig, load_run_config


@pytest.mark.parametrize("old,new", sorted(MOVED_KEYS.items()))
def test_an_old_trainer_key_names_its_new_key(old, new):
    with pytest.raises(ConfigError) as e:
        load_run_config({"trainer": {old: 1}})
    assert str(e.value) == f"trainer.{old} moved: use {new}"
    section, key = new.split(".")
    cfg = load_run_config({section: {key: getattr(getattr(load_run_config({}), section), key)}})
    assert hasattr(getattr(cfg, section), key)


def test_overrides_and_sections():
    cfg = load_run_config({}, ["eval.every=5", "checkpoint.keep_last=1", "logging.every=2", "task=lm",
                               "distributed.strategy=ddp"])
    assert (cfg.eval.every, cfg.checkpoint.keep_last, cfg.logging.every, cfg.task) == (5, 1, 2, "lm")
    assert cfg.distributed == DistributedConfig(strategy="ddp")  # typed and checked with the rest, no torch
    with pytest.raises(ConfigError, match="eval.every must be >= 0"):
        load_run_config({"eval": {"every": -1}})
    with pytest.raises(ConfigError, match="unknown config key 'eval.evry'"):
        load_run_config({"eval": {"evry": 1}})


def test_the_distributed_section_is_validated_by_its_engine():
    from torchgraft.distributed.config import distributed_config

    assert distributed_config({"strategy": "fsdp"}).strategy == "fsdp"
    with pytest.raises(ConfigError, match="distributed.strategy"):
        distributed_config({"strategy": "zero3"})

"""`Run`: what every training loop of torchgraft shares around its algorithm.

The supervised `Trainer` and `torchgraft.rl.ppo.PPOTrainer` differ in what one step does; what a
run directory gets does not differ, so it lives here once:
- the directory is checked (`check_run_dir`) and held by one writer (`RunLock`, main process);
  a run refused by its config before it wrote a checkpoint leaves no empty directory behind;
- a fresh run never trains over a run's checkpoints; `--resume` first compares the newest
  checkpoint's `run_config` with the current one (`check_resumable`: what defines the run is fixed,
  cadence / budget / hyper-parameters are applied and reported), then the `CheckpointManager` loads
  every stateful part, and the current config's optimizer settings go back into the param groups;
- `config.yaml` (atomic) records what runs: it is written when the run trains, and left as it was
  when a resume has nothing left to do, so it never names settings that never ran;
- the metrics logger (metrics.jsonl + TensorBoard, main process), `result.json` (atomic),
  cadence warnings and the callbacks.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from torchgraft.checkpoint.files import LoadedCheckpoint, list_checkpoints
from torchgraft.checkpoint.manager import CheckpointManager
from torchgraft.errors import ConfigError
from torchgraft.io import atomic_write_text
from torchgraft.train.callbacks import Callback, CallbackList
from torchgraft.train.lock import RunLock, check_run_dir
from torchgraft.train.logging import MetricsLogger
from torchgraft.train.resume import (FIXED_KEYS, FIXED_PREFIXES, apply_hyperparameters, check_resumable,
                                     fresh_hyperparameters)


@dataclass(frozen=True)
class ResumeRules:
    """What a resume may not change (keys under `fixed_prefixes` and the `fixed_keys`), and the option
    that starts a new run from this one's weights (named in the refusal)."""

    fixed_prefixes: tuple[str, ...] = FIXED_PREFIXES
    fixed_keys: tuple[str, ...] = FIXED_KEYS
    init_key: str = "trainer.init_from"


class Run:
    """The run directory `run_dir` of a loop whose config is `config` (a plain mapping)."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], checkpoints: CheckpointManager, *,
                 rules: ResumeRules = ResumeRules(), is_main: bool = True, callbacks: Sequence[Callback] = ()):
        self.dir = Path(run_dir)
        self.config, self.checkpoints, self.rules, self.is_main = config, checkpoints, rules, is_main
        self.callbacks = CallbackList(callbacks)
        self.logger: MetricsLogger | None = None
        self.resumed: LoadedCheckpoint | None = None
        self.resume_changes: list[str] = []

    @contextlib.contextmanager
    def hold(self) -> Iterator[Run]:
        """Check and lock the directory for the run's duration (released on errors too)."""
        check_run_dir(self.dir)
        created = not self.dir.exists()
        try:
            with RunLock(self.dir) if self.is_main else contextlib.nullcontext():
                yield self
        except ConfigError:  # refused by the config (e.g. the first forward): leave no empty run behind
            if created and self.is_main and not list_checkpoints(self.checkpoints.root):
                shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def restore(self, resume: bool) -> bool:
        """Continue the run in the directory (`resume`), or refuse to start over its checkpoints.
        True when a checkpoint was loaded into every stateful part."""
        root = self.checkpoints.root
        if not resume:
            if list_checkpoints(root):
                raise ConfigError(f"{self.dir} already holds checkpoints of a run; pass --resume (resume=True) "
                                  "to continue it, or choose another output directory")
            return False
        old = (self.checkpoints.peek("meta.json") or {}).get("run_config")
        r = self.rules
        applied = check_resumable(old, self.config, self.dir, fixed_prefixes=r.fixed_prefixes,
                                  fixed_keys=r.fixed_keys, init_key=r.init_key)
        optimizer = self.checkpoints.states.get("optimizer")
        fresh = fresh_hyperparameters(optimizer) if optimizer is not None else []
        self.resumed = self.checkpoints.load()
        if self.resumed is None:
            if self.is_main:
                warnings.warn(f"no checkpoint in {root} to resume from: starting a new run", stacklevel=3)
            return False
        groups = apply_hyperparameters(optimizer, fresh) if optimizer is not None else []
        self.resume_changes = applied + [f"param groups: {c}" for c in groups]
        return True

    def start(self, work_left: bool, cadence_notes: Sequence[str] = (), *, tensorboard: bool = True,
              resume_step: int | None = None) -> bool:
        """Say what the resume applied, write config.yaml and open the metrics logger; when a resumed
        run has no `work_left`, say so and leave config.yaml as it was. Returns `work_left`."""
        if self.is_main:
            if self.resumed is not None and not work_left:
                warnings.warn(f"{self.dir} is already trained to the end of its budget (step "
                              f"{self.resumed.meta.get('step')}): nothing to do; raise the budget to train on "
                              "(config.yaml is left as it was)", stacklevel=3)
            else:
                if self.resume_changes:  # logged whatever logging.progress says
                    warnings.warn("resuming with a changed config, applied: " + ", ".join(self.resume_changes),
                                  stacklevel=3)
                for note in cadence_notes:
                    warnings.warn(note, stacklevel=3)
                self.dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
        self.logger = MetricsLogger(self.dir, tensorboard=tensorboard, enabled=self.is_main,
                                    resume_step=resume_step if self.resumed is not None else None)
        return work_left

    def write_result(self, result: dict[str, Any]) -> None:
        """result.json (atomic, main process)."""
        if self.is_main:
            atomic_write_text(self.dir / "result.json", json.dumps(result, indent=1))

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()

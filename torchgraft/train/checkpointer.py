"""`Checkpointer`: decides when the loop saves, and writes / reads the run's checkpoints in the
engine's layout (single file, or DCP shards plus the same metadata files) with the one writer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgraft.train.cadence import TrainState, every
from torchgraft.checkpoint.files import CheckpointManager, checkpoint_files, write_checkpoint_dir
from torchgraft.train.config import CheckpointConfig
from torchgraft.train.engine import LocalEngine


class Checkpointer:
    """Saves every `checkpoint.every` steps, at the end or a stop, and on a new best (`save_best`),
    never inside a streak of non-finite steps; keeps the last K plus the best."""

    def __init__(self, root: Path, cfg: CheckpointConfig, eval_every: int, engine: LocalEngine):
        self.cfg, self.eval_every, self.engine = cfg, eval_every, engine
        self.manager = CheckpointManager(root, keep_last=cfg.keep_last)
        self.last_saved = -1

    @property
    def root(self) -> Path:
        return self.manager.root

    def due(self, state: TrainState, final: bool, improved: bool) -> bool:
        if state.consecutive_bad:
            return False
        save_best = improved and self.cfg.save_best and self.eval_every > 0
        return every(self.cfg.every, state.step) or final or state.should_stop or save_best

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any] | None, meta: dict[str, Any] | None,
             best: tuple[str, float] | None = None) -> Path:
        """Write step `step` (every process calls it; `trainer_state` / `meta` matter on the main one).
        `best=(metric, value)` also marks it as the best checkpoint."""
        engine, main = self.engine, self.engine.is_main
        path = self.manager.path_for(step)
        model_state, optim_state, write_shards = engine.checkpoint_parts(model, optimizer)
        files: dict[str, bytes] = {}
        if main:
            self.manager.clean_temp()
            rng_tensors = trainer_state.pop("rng_tensors")
            if write_shards is not None:
                meta = {**meta, "sharded": True}
            files = checkpoint_files(model_state=model_state, meta=meta, optimizer_state=optim_state,
                                     trainer_state=trainer_state, rng_tensors=rng_tensors)
        write_checkpoint_dir(path, files, write_shards=write_shards, main=main, barrier=engine.barrier)
        if main:
            if best is not None:
                self.manager.mark_best(step, *best)
            self.manager.prune()
        engine.barrier()
        self.last_saved = step
        return path

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Load the newest good checkpoint into model and optimizer; return the trainer state saved
        with it (with its `rng_tensors`), or None when there is none."""
        if self.engine.is_main:
            self.manager.clean_temp()
        self.engine.barrier()
        chosen = self.engine.broadcast(str(self.manager.newest_verified() or "") if self.engine.is_main else None)
        if not chosen:
            return None
        trainer_state, rng_tensors = self.engine.load_checkpoint(Path(chosen), model, optimizer)
        return {**trainer_state, "rng_tensors": rng_tensors}

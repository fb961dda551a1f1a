"""Checkpoint layouts: how the model and optimizer entries of a checkpoint are stored.

The `CheckpointManager` writes every other entry (counters, data position, RNG, ...) itself; the
layout, supplied by the engine, owns the two entries whose storage depends on how the model is
spread over processes:
- `SingleFileLayout` (here): `model.safetensors` + `optimizer.safetensors` / `optimizer.json`,
  written by the main process (one process, or DDP whose ranks hold the same state);
- `torchgraft.distributed.checkpoint.DistributedLayout`: DCP shards written by every rank under
  `dcp/`, plus the full `model.safetensors` gathered on rank 0 (FSDP2).

A layout also carries the collectives the manager needs (`is_main`, `barrier`, `broadcast`), so
the manager itself knows nothing of process groups.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from torchgraft.checkpoint.files import LoadedCheckpoint, load_optimizer_state, model_files
from torchgraft.errors import CheckpointError

WriteShards = Callable[[Path], None]  # the temporary checkpoint folder -> writes this rank's shards


class Collectives(Protocol):
    """What a layout needs from the processes of a run (an engine provides it)."""

    is_main: bool

    def barrier(self) -> None: ...

    def broadcast(self, obj: Any) -> Any: ...


class OneProcess:
    """The collectives of a single process: it is the main one, barriers and broadcasts are no-ops."""

    is_main = True

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: Any) -> Any:
        return obj


class Layout(Protocol):
    comm: Collectives

    def files(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None
              ) -> tuple[dict[str, bytes], WriteShards | None]: ...

    def load(self, ck: LoadedCheckpoint, model: nn.Module | None,
             optimizer: torch.optim.Optimizer | None) -> None: ...


def load_resume_weights(model: nn.Module, ck: LoadedCheckpoint) -> None:
    """Strictly load a checkpoint's weights into the model a run resumes (one line if they do not fit)."""
    try:
        model.load_state_dict(ck.model_state)
    except RuntimeError as e:
        raise CheckpointError(f"cannot resume from {ck.path}: its weights do not fit this model "
                              f"({str(e).splitlines()[0]}); resume with the run's own config") from None


def require_optimizer(ck: LoadedCheckpoint) -> dict[str, Any]:
    if ck.optimizer_state is None:
        raise CheckpointError(f"{ck.path} holds weights only; it cannot resume a run")
    return ck.optimizer_state


class SingleFileLayout:
    """Full model and optimizer state in single files, written by the main process only."""

    def __init__(self, comm: Collectives | None = None):
        self.comm = comm if comm is not None else OneProcess()

    def files(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None
              ) -> tuple[dict[str, bytes], WriteShards | None]:
        """The layout's files of this process (nothing on non-main processes) and no shard writer."""
        if not self.comm.is_main:
            return {}, None
        return model_files(model.state_dict() if model is not None else None,
                           optimizer.state_dict() if optimizer is not None else None), None

    def load(self, ck: LoadedCheckpoint, model: nn.Module | None,
             optimizer: torch.optim.Optimizer | None) -> None:
        if model is not None:
            load_resume_weights(model, ck)
        if optimizer is not None:
            load_optimizer_state(optimizer, require_optimizer(ck))

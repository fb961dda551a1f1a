"""torchgraft.train: the training engine (config -> run directory with metrics and checkpoints).

`run_training` here trains in one process; `torchgraft.recipes.training.run_training` (used by the
CLI) also picks the distributed engine when the config or launcher asks for it.
"""
from torchgraft.train.callbacks import Callback
from torchgraft.train.checkpoint import CheckpointFallbackWarning, load_checkpoint, load_model
from torchgraft.train.config import (CheckpointConfig, EvalConfig, LoggingConfig, OptimConfig, RunConfig,
                                     ScheduleConfig, TrainerConfig, load_run_config)
from torchgraft.train.engine import LocalEngine
from torchgraft.train.tasks import Task, build_task, register_task
from torchgraft.train.trainer import NonFiniteError, Trainer, TrainResult, run_training

__all__ = ["Callback", "CheckpointConfig", "CheckpointFallbackWarning", "EvalConfig", "LocalEngine",
           "LoggingConfig", "NonFiniteError", "OptimConfig", "RunConfig", "ScheduleConfig", "Task",
           "TrainResult", "Trainer", "TrainerConfig", "build_task", "load_checkpoint", "load_model",
           "load_run_config", "register_task", "run_training"]

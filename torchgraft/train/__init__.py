"""torchgraft.train: the training engine (config -> run directory with metrics and checkpoints)."""
from torchgraft.train.callbacks import Callback
from torchgraft.train.checkpoint import CheckpointFallbackWarning, load_checkpoint, load_model
from torchgraft.train.config import (OptimConfig, RunConfig, ScheduleConfig, TrainerConfig,
                                     load_run_config)
from torchgraft.train.trainer import NonFiniteError, Trainer, TrainResult, run_training

__all__ = ["Callback", "CheckpointFallbackWarning", "NonFiniteError", "OptimConfig", "RunConfig",
           "ScheduleConfig", "TrainResult", "Trainer", "TrainerConfig", "load_checkpoint", "load_model",
           "load_run_config", "run_training"]

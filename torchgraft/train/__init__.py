"""torchgraft.train: the training engine (config -> run directory with metrics and checkpoints).

`run_training` is the one entry point, `torchgraft.recipes.training.run_training` (it picks the
engine, so it lives above this package and `torchgraft.distributed`); it is re-exported here, on first use.
"""
# Public names, imported on first use (PEP 562): `import torchgraft.train.config` (config checks in the
# CLI) must not import torch, so that a config error costs well under a second.
_LAZY: dict[str, str] = {
    "Callback": "callbacks", "CheckpointFallbackWarning": "torchgraft.checkpoint.files",
    "load_checkpoint": "torchgraft.checkpoint.files", "CheckpointConfig": "config", "EvalConfig": "config", "LoggingConfig": "config",
    "OptimConfig": "config", "RunConfig": "config", "ScheduleConfig": "config", "TrainerConfig": "config",
    "load_run_config": "config", "LocalEngine": "engine", "Task": "tasks", "build_task": "tasks",
    "register_task": "tasks", "NonFiniteError": "trainer", "Trainer": "trainer", "TrainResult": "trainer",
    "run_training": "torchgraft.recipes.training",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = _LAZY[name] if _LAZY[name].startswith("torchgraft.") else f"torchgraft.train.{_LAZY[name]}"
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torchgraft.train' has no attribute {name!r}")


__all__ = ["Callback", "CheckpointConfig", "CheckpointFallbackWarning", "EvalConfig", "LocalEngine",
           "LoggingConfig", "NonFiniteError", "OptimConfig", "RunConfig", "ScheduleConfig", "Task",
           "TrainResult", "Trainer", "TrainerConfig", "build_task", "load_checkpoint",
           "load_run_config", "register_task", "run_training"]

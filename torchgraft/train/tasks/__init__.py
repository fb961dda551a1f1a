"""Tasks: what differs between kinds of training (batch keys, model call, loss, metrics).

The protocol and registry are in `base`; importing this package registers the built-in tasks
(`classification`, `lm`). A new task is a new module: subclass `Task`, call `register_task`.
"""
from torchgraft.train.tasks.base import IGNORE_INDEX, Task, Unit, build_task, list_tasks, register_task
from torchgraft.train.tasks import causal_lm as _causal_lm  # noqa: F401,E402  (registers "lm")
from torchgraft.train.tasks import classification as _classification  # noqa: F401,E402  (registers "classification")

__all__ = ["IGNORE_INDEX", "Task", "Unit", "build_task", "list_tasks", "register_task"]

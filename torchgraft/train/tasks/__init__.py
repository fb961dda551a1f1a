"""Tasks: what differs between kinds of training (batch keys, model call, loss, metrics).

The protocol and registry are in `base`; importing this package registers the built-in tasks
(`classification`, `lm`, `image_classification`, `sequence_classification`). A new task is a new module: subclass `Task`, call `register_task`.
"""
from torchgraft.train.tasks.base import IGNORE_INDEX, Task, Unit, build_task, list_tasks, register_task
from torchgraft.train.tasks import causal_lm as _causal_lm  # noqa: F401,E402  (registers "lm")
from torchgraft.train.tasks import classification as _classification  # noqa: F401,E402  (registers "classification")
from torchgraft.train.tasks import image_classification as _image  # noqa: F401,E402  (registers "image_classification")
from torchgraft.train.tasks import sequence_classification as _seq  # noqa: F401,E402  (registers "sequence_classification")
from torchgraft.train.tasks import distill as _distill  # noqa: F401,E402  (registers "distill")

__all__ = ["IGNORE_INDEX", "Task", "Unit", "build_task", "list_tasks", "register_task"]
from torchgraft.train.tasks import dpo as _dpo  # noqa: F401,E402  (registers "dpo")
from torchgraft.train.tasks import simpo as _simpo  # noqa: F401,E402  (registers "simpo")
from torchgraft.train.tasks import orpo as _orpo  # noqa: F401,E402  (registers "orpo")
from torchgraft.train.tasks import reward_model as _reward_model  # noqa: F401,E402  (registers "reward_model")

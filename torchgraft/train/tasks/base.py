"""The Task protocol and its registry: what differs between kinds of training (the batch keys, the model call, the loss, the metrics).

A `Task` is all the trainer knows about a kind of problem. The loop asks it for
- `count(batch)`: how many loss units (samples or target tokens) a batch holds, so the loss of an
  optimizer step is normalised over all its micro-batches and ranks;
- `loss_sum(model, batch)`: the loss summed over those units (float32 scalar);
- `eval_sums(model, batch)`: additive statistics (sums over units) that `metrics` turns into numbers
  after they were summed over batches (and ranks);
- `extra_metrics(model)`: metrics that do not come from batches (e.g. a policy's return in its
  environment); `{}` by default;
- `higher_is_better(metric)`: what "better" means for each metric it reports.

Adding a task is a new module with a `Task` subclass and `register_task(name, cls)`; the data
builder names the task it feeds (`DataBundle.task`), and a run config may override it (`task:`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from torchgraft.errors import ConfigError, did_you_mean

IGNORE_INDEX = -100
Unit = Literal["samples", "tokens"]


class Task:
    """Base class of every task. Subclasses set `name` and `unit` and implement `count`,
    `loss_sum`, `eval_sums` and `metrics`; the rest has defaults."""

    name: ClassVar[str] = ""
    unit: ClassVar[Unit] = "samples"
    default_metric: ClassVar[str] = "val_loss"  # the metric that picks the best checkpoint by default

    def __init__(self, **options: Any):
        if options:
            raise ConfigError(f"task {self.name!r} takes no options, got {', '.join(sorted(options))}")

    # ---- training
    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        """Number of loss units in `batch` (a long scalar tensor on the batch's device)."""
        raise NotImplementedError

    def loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss summed over the batch's units (a float32 scalar)."""
        raise NotImplementedError

    # ---- evaluation
    def eval_sums(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Additive statistics of one evaluation batch (summed over batches and ranks by the caller)."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Evaluation metrics (keys start with `val_`) from the summed statistics."""
        raise NotImplementedError

    def eval_files(self, sums: dict[str, Any]) -> dict[str, bytes]:
        """Files (name -> bytes) the run writes into its run directory after an evaluation, from the
        same summed statistics (e.g. a confusion-matrix PNG); `{}` by default."""
        return {}

    def extra_metrics(self, model: nn.Module) -> dict[str, float]:
        """Metrics that need more than the validation batches (computed on the main process)."""
        return {}

    def higher_is_better(self, metric: str) -> bool:
        """True for metrics where larger is better (accuracy, F1, return); loss-like ones are False."""
        return any(word in metric for word in ("acc", "f1", "return", "reward"))

    def num_samples(self, batch: dict[str, Any]) -> int:
        """Examples in a batch (for samples/s); the length of its first tensor by default."""
        first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
        return int(first.shape[0])


_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make `name` usable as `DataBundle.task` or a config's `task:`."""
    _TASKS[name] = factory


def build_task(spec: str | dict[str, Any] | Task) -> Task:
    """A Task from a name, a mapping `{name: ..., **options}` or an instance."""
    if isinstance(spec, Task):
        return spec
    opts = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = opts.pop("name", None)
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}" + did_you_mean(str(name), _TASKS)
                          + f"; known: {', '.join(sorted(_TASKS))}")
    factory = _TASKS[name]
    _check_options(name, factory, opts)
    return factory(**opts)


_SCALARS = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}


def _check_options(name: str, factory: Callable[..., Task], opts: dict[str, Any]) -> None:
    """One-line errors for a `task:` option the task does not take (a typo) or whose value is not
    the number / string / bool it declares, before the task's own code sees it."""
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C factory: nothing to check against
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key, value in opts.items():
        if key not in known:
            raise ConfigError(f"task {name!r} has no option task.{key}" + did_you_mean(key, known)
                              + f"; its options: {', '.join(known) or '(none)'}")
        ann = params[key].annotation
        ann = ann if isinstance(ann, str) else getattr(ann, "__name__", "")
        base, _, rest = ann.partition(" | ")
        allowed = _SCALARS.get(base)
        if allowed is None or rest not in ("", "None") or (value is None and rest == "None"):
            continue
        ok = isinstance(value, allowed) and (base == "bool" or not isinstance(value, bool))
        if not ok:
            what = "a number" if base in ("float", "int") else f"a {base}"
            raise ConfigError(f"task.{key} must be {what}" + (" (or null)" if rest == "None" else "")
                              + f", got {value!r}")


def list_tasks() -> list[str]:
    return sorted(_TASKS)

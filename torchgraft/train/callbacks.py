"""Hooks for recipes: subclass `Callback` and override what you need.

Every hook gets the `Trainer` (its `.state`, `.model`, `.optimizer`, `.run_dir`); setting
`trainer.state.should_stop = True` (and `stop_reason`) ends the run after the current step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class Callback:
    def on_train_start(self, trainer: Any) -> None: ...
    def on_step_end(self, trainer: Any, record: dict[str, Any]) -> None: ...
    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, trainer: Any, path: Path) -> None: ...
    def on_train_end(self, trainer: Any, result: Any) -> None: ...


class CallbackList:
    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def __getattr__(self, hook: str):
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        bound = [getattr(cb, hook) for cb in self.callbacks]

        def call(*args: Any) -> None:
            for fn in bound:
                fn(*args)
        setattr(self, hook, call)  # cached: later calls skip __getattr__
        return call

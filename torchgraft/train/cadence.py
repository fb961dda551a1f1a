"""When the loop does its periodic work, each in one small object: validate (with best metric and
early stopping), log (with throughput); saving is `torchgraft.checkpoint.manager.CheckpointManager`.
The `Trainer` calls them in order after each step."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from torchgraft.errors import ConfigError
from torchgraft.train.config import EvalConfig, LoggingConfig


def every(n: int, step: int) -> bool:
    """True on every n-th step (never when n is 0)."""
    return bool(n) and step % n == 0


@dataclass
class TrainState:
    """The loop's counters (saved in trainer_state.json under "state")."""

    step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    consecutive_bad: int = 0
    skipped_steps: int = 0
    samples_seen: int = 0
    targets_seen: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    should_stop: bool = False
    stop_reason: str = ""

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the saved counters in place (a resumed run does not inherit the old run's stop)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, state.get(f.name, f.default if f.default is not dataclasses.MISSING
                                            else f.default_factory()))
        self.should_stop, self.stop_reason = False, ""


class Validator:
    """Decides when to evaluate, keeps the best metric and stops early after `patience` evaluations
    without improvement."""

    def __init__(self, cfg: EvalConfig, metric: str, higher_is_better: bool):
        self.cfg, self.metric = cfg, metric
        self.mode = cfg.best_mode if cfg.best_mode != "auto" else ("max" if higher_is_better else "min")
        self.last_step = -1

    def due(self, step: int, final: bool) -> bool:
        return every(self.cfg.every, step) or final

    def update(self, state: TrainState, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True when it is a new best."""
        self.last_step = state.step
        state.last_eval = metrics
        if self.metric not in metrics:
            raise ConfigError(f"eval.best_metric={self.metric!r} is not an evaluation metric "
                              f"(have: {', '.join(metrics)})")
        value = metrics[self.metric]
        sign = 1.0 if self.mode == "max" else -1.0
        improved = state.best_value is None or sign * (value - state.best_value) > self.cfg.early_stopping_min_delta
        if improved:
            state.best_value, state.best_step, state.evals_without_improvement = value, state.step, 0
            return True
        state.evals_without_improvement += 1
        patience = self.cfg.early_stopping_patience
        if patience and state.evals_without_improvement >= patience:
            state.should_stop = True
            state.stop_reason = (f"early stopping: {self.metric} did not improve for "
                                 f"{state.evals_without_improvement} evaluations")
        return False


class Throughput:
    """Samples/s, tokens/s, FLOP/s and MFU between two logged steps."""

    def __init__(self, state: TrainState, unit: str, flops_per_step: int | None, peak_flops: float | None):
        self.unit, self.flops_per_step, self.peak_flops = unit, flops_per_step, peak_flops
        self.start = time.perf_counter()
        self._mark(state, self.start)

    def _mark(self, state: TrainState, now: float) -> None:
        self.t, self.step, self.targets, self.samples = now, state.step, state.targets_seen, state.samples_seen

    def record(self, state: TrainState) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self.t, 1e-9)
        out = {"samples_per_s": (state.samples_seen - self.samples) / dt}
        if self.unit == "tokens":
            out["tokens_per_s"] = (state.targets_seen - self.targets) / dt
        if self.flops_per_step:
            out["flops_per_s"] = self.flops_per_step * (state.step - self.step) / dt
            if self.peak_flops:
                out["mfu"] = out["flops_per_s"] / self.peak_flops
        self._mark(state, now)
        return out

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class LogCadence:
    """Decides when to write a metrics record: every `every` steps and at every evaluation."""

    def __init__(self, cfg: LoggingConfig):
        self.cfg = cfg

    def due(self, step: int, evaluated: bool) -> bool:
        return evaluated or every(self.cfg.every, step)


def eval_line(step: int, record: dict[str, Any]) -> str:
    """The progress line printed after an evaluation."""
    return f"step {step}: " + "  ".join(f"{k} {record[k]:.4f}" for k in ("loss", "val_loss", "val_accuracy")
                                        if k in record)

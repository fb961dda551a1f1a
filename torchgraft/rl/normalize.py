"""Running observation normalisation (mean/variance over everything seen), kept with the checkpoint.

`(obs - mean) / sqrt(var + eps)`, clipped to +-clip, as SB3's VecNormalize. Statistics are float64
and saved as JSON numbers (a float64 round-trips exactly through `json`), so a resumed run
normalises bit-for-bit like the uninterrupted one and `eval` sees what training saw.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from torchgraft.errors import CheckpointError


class RunningNorm:
    """Observation normaliser; `update(batch)` during training, `freeze` for evaluation."""

    def __init__(self, size: int, clip: float = 10.0, eps: float = 1e-8):
        self.size, self.clip, self.eps = size, clip, eps
        self.mean = np.zeros(size, dtype=np.float64)
        self.var = np.ones(size, dtype=np.float64)
        self.count = eps  # as VecNormalize: the prior (mean 0, var 1) weighs almost nothing

    def update(self, batch: np.ndarray) -> None:
        """Merge a batch (N, size) into the statistics (parallel Welford / Chan et al.)."""
        batch = np.asarray(batch, dtype=np.float64).reshape(-1, self.size)
        b_mean, b_var, n = batch.mean(0), batch.var(0), batch.shape[0]
        delta, total = b_mean - self.mean, self.count + n
        m2 = self.var * self.count + b_var * n + delta ** 2 * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.var, self.count = m2 / total, total

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        out = (np.asarray(obs, dtype=np.float64) - self.mean) / np.sqrt(self.var + self.eps)
        return np.clip(out, -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": float(self.count),
                "clip": self.clip, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean = np.asarray(state["mean"], dtype=np.float64)
        if mean.shape != (self.size,):
            raise CheckpointError(f"saved observation normaliser has size {mean.size}, this environment's "
                                  f"observations have {self.size}")
        self.mean, self.var = mean, np.asarray(state["var"], dtype=np.float64)
        self.count, self.clip, self.eps = float(state["count"]), float(state["clip"]), float(state["eps"])

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunningNorm:
        norm = cls(len(state["mean"]))
        norm.load_state_dict(state)
        return norm


class Identity:
    """The no-op normaliser (normalize_obs: false)."""

    def update(self, batch: np.ndarray) -> None:
        pass

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return np.asarray(obs, dtype=np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise CheckpointError("the checkpoint has observation-normaliser statistics but this run does not "
                                  "normalise observations; resume with ppo.normalize_obs=true")


def normalizer_from_state(state: dict[str, Any] | None) -> RunningNorm | Identity:
    """The normaliser a checkpoint saved (`None` or empty means none was used)."""
    return Identity() if not state else RunningNorm.from_state(state)

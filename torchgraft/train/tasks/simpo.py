"""SimPO (Meng et al. 2024): a reference-free preference loss on length-normalised log-probs.

    task: {name: simpo, beta: 2.0, gamma: 0.5, label_smoothing: 0.0}

With the per-token average completion log-probs `c` (chosen) and `r` (rejected) and the target
margin `gamma`, the loss is `-(1 - ls) * logsigmoid(beta * (c - r) - gamma) - ls * logsigmoid(-(beta *
(c - r) - gamma))` and the rewards are `beta * c`, `beta * r`: TRL 1.16's `CPOTrainer` with
`loss_type="simpo"`, `simpo_gamma=gamma` and `cpo_alpha=0` (no extra NLL term), checked against it
in tests/test_dpo_trl_parity.py. No reference model.
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.train.tasks.base import register_task
from torchgraft.train.tasks.pairwise import PairOutputs, PairwiseTask, SideLogps, pair_logps


class SimPOTask(PairwiseTask):
    name = "simpo"

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
        super().__init__()
        if not beta > 0:
            raise ConfigError(f"task.beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ConfigError(f"task.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.gamma, self.label_smoothing = float(beta), float(gamma), float(label_smoothing)

    def pair_losses(self, chosen: SideLogps, rejected: SideLogps) -> PairOutputs:
        c, r = chosen.mean, rejected.mean  # (B,) per-token averages
        z = self.beta * (c - r) - self.gamma
        ls = self.label_smoothing
        losses = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
        return PairOutputs(losses, self.beta * c.detach(), self.beta * r.detach())

    def pair_outputs(self, model: nn.Module, batch: dict[str, Any]) -> PairOutputs:
        return self.pair_losses(*pair_logps(model, batch))


register_task("simpo", SimPOTask)

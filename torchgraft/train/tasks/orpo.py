"""ORPO (Hong et al. 2024): supervised loss on the chosen answer plus an odds-ratio preference term; no reference.

    task: {name: orpo, beta: 0.1}

With the per-token average completion log-probs `c`, `r` (so `exp(c)` is the geometric-mean token
probability), `log_odds = (c - r) - (log(1 - exp(c)) - log(1 - exp(r)))` and the loss per pair is
`nll - beta * logsigmoid(log_odds)`, where `nll = -c` is the chosen completion's mean token
negative log-likelihood. Rewards are `beta * c`, `beta * r`; also logged: `val_nll_loss`,
`val_log_odds_ratio` (mean logsigmoid(log_odds)) and `val_log_odds_chosen` (mean log_odds).

The odds-ratio term, rewards and logged statistics are TRL 1.16's (`ORPOTrainer.odds_ratio_loss`,
checked in tests/test_dpo_trl_parity.py). One difference, stated: TRL averages the NLL over all
chosen tokens of a batch; here it is averaged per pair and then over pairs (the paper's per-example
loss), so that every pair is one loss unit and gradient accumulation gives the full batch's gradient.
The two agree when the chosen completions of a batch have equal lengths.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.train.tasks.base import register_task
from torchgraft.train.tasks.pairwise import PairOutputs, PairwiseTask, SideLogps, pair_logps


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -log 2, Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPOTask(PairwiseTask):
    name = "orpo"

    def __init__(self, beta: float = 0.1):
        super().__init__()
        if not beta > 0:
            raise ConfigError(f"task.beta must be > 0, got {beta}")
        self.beta = float(beta)

    def pair_losses(self, chosen: SideLogps, rejected: SideLogps) -> PairOutputs:
        c, r = chosen.mean, rejected.mean  # (B,)
        log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
        ratio = F.logsigmoid(log_odds)
        nll = -c
        return PairOutputs(nll - self.beta * ratio, self.beta * c.detach(), self.beta * r.detach(),
                           extra={"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach(),
                                  "log_odds_chosen": log_odds.detach()})

    def pair_outputs(self, model: nn.Module, batch: dict[str, Any]) -> PairOutputs:
        return self.pair_losses(*pair_logps(model, batch))


register_task("orpo", ORPOTask)

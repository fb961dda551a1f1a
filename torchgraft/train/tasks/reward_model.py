"""Reward-model training on preference pairs: the Bradley-Terry loss on a scalar score.

    task: {name: reward_model, center_rewards_coefficient: null}

The model scores each whole sequence (prompt + completion), e.g. the "reward" family (a decoder
with a last-token `ScoreHead`, torchgraft.models.reward): `model(input_ids (2B, T), attention_mask)
-> (2B, 1)`. The loss per pair is `-logsigmoid(r_chosen - r_rejected)`, plus
`center_rewards_coefficient * (r_chosen + r_rejected)^2` when set (keeps the scores centred on 0),
as TRL 1.16's `RewardTrainer.compute_loss`. Metrics, as TRL logs them: `val_loss`,
`val_accuracy` (fraction of pairs scored chosen > rejected), `val_margin` (mean r_chosen -
r_rejected) and `val_mean_reward`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.train.tasks.base import register_task
from torchgraft.train.tasks.classification import logits_of
from torchgraft.train.tasks.pairwise import PairOutputs, PairwiseTask, stacked


class RewardModelTask(PairwiseTask):
    name = "reward_model"
    default_metric = "val_accuracy"

    def __init__(self, center_rewards_coefficient: float | None = None):
        super().__init__()
        if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
            raise ConfigError(f"task.center_rewards_coefficient must be >= 0 or null, got {center_rewards_coefficient}")
        self.center = center_rewards_coefficient

    def scores(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores (B,) from one forward over both sides."""
        out = logits_of(model(stacked(batch, "input_ids"), attention_mask=stacked(batch, "attention_mask")))
        if out.dim() != 2 or out.shape[-1] != 1:
            raise ConfigError(f"task reward_model needs a model that gives one score per sequence (2B, 1), got "
                              f"{tuple(out.shape)}; use model.family=reward (a decoder with a score head)")
        scores = out.squeeze(-1).float()  # (2B,)
        b = batch["chosen_input_ids"].shape[0]
        return scores[:b], scores[b:]

    def pair_outputs(self, model: nn.Module, batch: dict[str, Any]) -> PairOutputs:
        c, r = self.scores(model, batch)
        losses = -F.logsigmoid(c - r)
        if self.center:
            losses = losses + self.center * (c + r) ** 2
        return PairOutputs(losses, c.detach(), r.detach())

    def eval_sums(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.pair_outputs(model, batch)
        c, r = out.chosen_rewards.double(), out.rejected_rewards.double()
        return {"loss": out.losses.double().sum(), "count": self.count(batch).double(),
                "accuracy": (c > r).double().sum(), "margin": (c - r).sum(), "mean_reward": (c + r).sum() / 2}


register_task("reward_model", RewardModelTask)

"""What every preference task shares: the completion log-probs of a pair, and its reward metrics.

Batches come from the "preference" dataset (`torchgraft.data.preference`): chosen_* and rejected_*
(B, T) input ids / shifted labels (-100 outside the completion) / padding masks, and pair_id (B,).

- `sequence_logps(logits, labels)`: per row, the summed log-probability of the labelled tokens and
  their count (`SideLogps`; `.mean` is the per-token average SimPO and ORPO use). The one helper
  for sequence log-probs: `dpo`, `simpo`, `orpo` and the tests call it.
- `pair_logps(model, batch)`: one forward over the 2B rows [chosen; rejected] (as TRL's
  `concatenated_forward`), split back into the two sides.
- `PairwiseTask`: one loss unit per pair; a subclass gives `pair_outputs(model, batch)` (per-pair
  losses and rewards), and gets `loss_sum`, `eval_sums` and the metrics TRL logs:
  `val_rewards/chosen`, `val_rewards/rejected`, `val_rewards/margins` (means over pairs) and
  `val_rewards/accuracies` (the fraction of pairs whose chosen reward is larger), plus `val_loss`
  and any extra per-pair statistic the subclass returns (e.g. ORPO's `val_log_odds_ratio`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.train.tasks.base import IGNORE_INDEX, Task
from torchgraft.train.tasks.classification import logits_of

SIDES = ("chosen", "rejected")


@dataclass
class SideLogps:
    """Log-probs of one side's completions: `sum` (N,) over the labelled tokens, `count` (N,) tokens."""
    sum: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """Per-token average log-prob (N,) (SimPO's and ORPO's length-normalised score)."""
        return self.sum / self.count.clamp(min=1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> SideLogps:
    """Summed log p(label) over the tokens whose label is not -100, per row: (N, T, V), (N, T) -> (N,).
    Labels are already shifted (labels[t] is the token after input t), as the preference batches hold."""
    n, t, v = logits.shape
    nll = F.cross_entropy(logits.reshape(n * t, v).float(), labels.reshape(n * t), ignore_index=IGNORE_INDEX,
                          reduction="none").view(n, t)  # (N, T), 0 where ignored
    return SideLogps(-nll.sum(-1), (labels != IGNORE_INDEX).sum(-1))


def stacked(batch: dict[str, Any], key: str) -> torch.Tensor:
    """chosen_<key> and rejected_<key> stacked as (2B, ...) rows [chosen; rejected]."""
    return torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])


def pair_logps(model: nn.Module, batch: dict[str, Any]) -> tuple[SideLogps, SideLogps]:
    """(chosen, rejected) completion log-probs of `model` from one forward over both sides."""
    logits = logits_of(model(stacked(batch, "input_ids"), attention_mask=stacked(batch, "attention_mask")))
    both = sequence_logps(logits, stacked(batch, "labels"))  # (2B,)
    b = batch["chosen_input_ids"].shape[0]
    return SideLogps(both.sum[:b], both.count[:b]), SideLogps(both.sum[b:], both.count[b:])


@dataclass
class PairOutputs:
    """Per-pair results (B,) of a preference task: its loss and the implicit rewards of both sides."""
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # more per-pair statistics (means logged)


class PairwiseTask(Task):
    """Base of the preference tasks: one loss unit per pair, TRL's reward metrics."""

    unit = "samples"

    def pair_outputs(self, model: nn.Module, batch: dict[str, Any]) -> PairOutputs:
        raise NotImplementedError

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        ids = batch["chosen_input_ids"]
        return torch.tensor(ids.shape[0], device=ids.device)

    def loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.pair_outputs(model, batch).losses.sum()

    def eval_sums(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.pair_outputs(model, batch)
        c, r = out.chosen_rewards.double(), out.rejected_rewards.double()
        sums = {"loss": out.losses.double().sum(), "count": self.count(batch).double(),
                "rewards/chosen": c.sum(), "rewards/rejected": r.sum(), "rewards/margins": (c - r).sum(),
                "rewards/accuracies": (c > r).double().sum()}
        sums.update({k: v.double().sum() for k, v in out.extra.items()})
        return sums

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums["count"])
        return {f"val_{k}": v / n for k, v in sums.items() if k != "count"}

    def higher_is_better(self, metric: str) -> bool:
        return any(w in metric for w in ("accuracies", "margins", "rewards/chosen", "accuracy"))

    def num_samples(self, batch: dict[str, Any]) -> int:
        return int(batch["chosen_input_ids"].shape[0])

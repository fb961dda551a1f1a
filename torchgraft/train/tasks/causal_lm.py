"""Causal language modelling: `{"input_ids": (B, T), "labels": (B, T)}` (labels -100 are ignored;
optional `attention_mask` and `position_ids` are passed to the model). One loss unit per target token."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.train.tasks.base import IGNORE_INDEX, Task, register_task
from torchgraft.train.tasks.classification import logits_of

MODEL_KWARGS = ("attention_mask", "position_ids")


class CausalLMTask(Task):
    """Next-token cross-entropy summed over target tokens; metrics val_loss, val_accuracy, val_ppl."""

    name = "lm"
    unit = "tokens"

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        kwargs = {k: batch[k] for k in MODEL_KWARGS if batch.get(k) is not None}
        return logits_of(model(batch["input_ids"], **kwargs))  # (B, T, V)

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    def _flat(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.forward(model, batch)
        return logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1)  # (N, V), (N,)

    def loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        logits, labels = self._flat(model, batch)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")

    def eval_sums(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits, labels = self._flat(model, batch)
        valid = labels != IGNORE_INDEX
        return {"loss": F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").double(),
                "count": valid.sum(), "correct": ((logits.argmax(-1) == labels) & valid).sum()}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums["count"])
        loss = sums["loss"] / n
        return {"val_loss": loss, "val_accuracy": sums["correct"] / n, "val_ppl": math.exp(min(loss, 50.0))}


register_task("lm", CausalLMTask)

"""Classification of whole examples: `{"inputs": (B, ...), "labels": (B,)}` -> logits (B, K)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.train.tasks.base import Task, register_task


def logits_of(out: Any) -> torch.Tensor:
    """Logits from a model output (a tensor, or an object with `.logits` such as HF outputs)."""
    return out.logits if hasattr(out, "logits") else out


class ClassificationTask(Task):
    """Cross-entropy over classes; one loss unit per example; metrics val_loss and val_accuracy."""

    name = "classification"
    unit = "samples"

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return logits_of(model(batch["inputs"]))  # (B, K)

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(len(batch["labels"]), device=batch["labels"].device)

    def loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        logits = self.forward(model, batch).float()
        return F.cross_entropy(logits, batch["labels"], reduction="sum")

    def eval_sums(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.forward(model, batch).float()
        labels = batch["labels"]
        return {"loss": F.cross_entropy(logits, labels, reduction="sum").double(),
                "count": torch.tensor(len(labels), device=labels.device),
                "correct": (logits.argmax(-1) == labels).sum()}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums["count"])
        return {"val_loss": sums["loss"] / n, "val_accuracy": sums["correct"] / n}


register_task("classification", ClassificationTask)

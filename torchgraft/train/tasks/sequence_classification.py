"""Sequence (text) classification: `{"input_ids": (B, T), "attention_mask": (B, T), "labels": (B,)}`
(+ `token_type_ids` (B, T) for text pairs) -> logits (B, K). The model is called as
`model(input_ids, attention_mask=..., token_type_ids=...)` (the keys the batch has), so a BERT
with `task: sequence_classification` or any `TaskModel` with a sequence head fits. Metrics
val_loss, val_accuracy, val_macro_f1, and a confusion-matrix PNG in the run directory."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torchgraft.train.tasks.base import register_task
from torchgraft.train.tasks.classification import ClassificationTask, logits_of
from torchgraft.train.tasks.metrics import ConfusionReport

MODEL_KWARGS = ("attention_mask", "token_type_ids")


class SequenceClassificationTask(ConfusionReport, ClassificationTask):
    name = "sequence_classification"
    default_metric = "val_accuracy"

    def __init__(self, label_names: Sequence[str] | None = None):
        ConfusionReport.__init__(self, label_names)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        kwargs = {k: batch[k] for k in MODEL_KWARGS if batch.get(k) is not None}
        return logits_of(model(batch["input_ids"], **kwargs))  # (B, K)


register_task("sequence_classification", SequenceClassificationTask)

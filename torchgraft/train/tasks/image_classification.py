"""Image classification with a full report: `{"inputs": (B, C, H, W), "labels": (B,)}` -> logits (B, K);
metrics val_loss, val_accuracy, val_macro_f1, and a confusion-matrix PNG in the run directory.
The "images" dataset feeds it (with the class names as `label_names`)."""
from __future__ import annotations

from collections.abc import Sequence

from torchgraft.train.tasks.base import register_task
from torchgraft.train.tasks.classification import ClassificationTask
from torchgraft.train.tasks.metrics import ConfusionReport


class ImageClassificationTask(ConfusionReport, ClassificationTask):
    name = "image_classification"
    default_metric = "val_accuracy"

    def __init__(self, label_names: Sequence[str] | None = None):
        ConfusionReport.__init__(self, label_names)


register_task("image_classification", ImageClassificationTask)

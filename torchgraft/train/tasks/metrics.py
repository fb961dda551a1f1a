"""Classification metrics from additive statistics: a confusion matrix, macro-F1, and its PNG.

`ConfusionReport` adds them to a classification task: `eval_sums` also returns the (K, K) confusion
counts (rows = true class, columns = predicted; additive over batches and ranks), `metrics` adds
`val_macro_f1`, and `eval_files` renders `confusion_matrix.png` (+ `confusion_matrix.json`) for
the run directory.
"""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) long counts: entry [t, p] = examples of true class t predicted as p."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean per-class F1 over the classes that occur as a label or a prediction (scikit-learn's
    `f1_score(average="macro")` on the same predictions)."""
    cm = confusion.double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    if not present.any():
        return 0.0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return float(f1[present].mean())


def confusion_png(confusion: torch.Tensor, names: Sequence[str] | None = None, title: str = "") -> bytes:
    """A heat-map of the confusion counts (true rows, predicted columns) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion.cpu().numpy()
    k = cm.shape[0]
    names = list(names) if names is not None and len(names) == k else [str(i) for i in range(k)]
    side = min(12.0, 2.5 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if k <= 30:
        top = cm.max() if cm.size else 0
        for t in range(k):
            for p in range(k):
                ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=8,
                        color="white" if top and cm[t, p] > top / 2 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


class ConfusionReport:
    """Mixin for a classification `Task` whose `forward(model, batch)` gives logits (B, K):
    confusion counts in `eval_sums`, `val_macro_f1` in `metrics`, the PNG in `eval_files`.
    Option `label_names` (the data builder passes the class names) labels the PNG's axes."""

    def __init__(self, label_names: Sequence[str] | None = None):
        self.label_names = list(label_names) if label_names is not None else None

    def eval_sums(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.forward(model, batch).float()  # (B, K)
        labels = batch["labels"]
        sums = {"loss": F.cross_entropy(logits, labels, reduction="sum").double(),
                "count": torch.tensor(len(labels), device=labels.device),
                "correct": (logits.argmax(-1) == labels).sum()}
        sums["confusion"] = confusion_matrix(logits.argmax(-1), labels, logits.shape[-1])  # (K, K)
        return sums

    @staticmethod
    def _confusion(sums: dict[str, Any]) -> torch.Tensor:
        return torch.as_tensor(sums["confusion"]).long()

    def metrics(self, sums: dict[str, Any]) -> dict[str, float]:
        out = super().metrics({k: v for k, v in sums.items() if k != "confusion"})
        if "confusion" in sums:
            out["val_macro_f1"] = macro_f1(self._confusion(sums))
        return out

    def eval_files(self, sums: dict[str, Any]) -> dict[str, bytes]:
        if "confusion" not in sums:
            return {}
        cm = self._confusion(sums)
        names = self.label_names if self.label_names and len(self.label_names) == cm.shape[0] else None
        acc = float(cm.diag().sum()) / max(1, int(cm.sum()))
        png = confusion_png(cm, names, title=f"accuracy {acc:.3f}, macro-F1 {macro_f1(cm):.3f}")
        table = {"labels": names or list(range(cm.shape[0])), "rows": "true", "columns": "predicted",
                 "counts": cm.tolist()}
        return {"confusion_matrix.png": png, "confusion_matrix.json": (json.dumps(table) + "\n").encode()}

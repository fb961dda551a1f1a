"""`torchgraft predict RUN_DIR INPUT...`: class labels and probabilities from a classification run.

The run directory says everything: the model (checkpoint meta.json; the best checkpoint when one
is marked, else the newest), the class names (`labels.json`), how raw inputs become a batch (the
run's `data:` section, through the dataset's registered encoder: image paths for `images`, strings
for `textclass`, with the run's saved tokenizer), and the task that runs the model. LoRA / DoRA
fine-tunes are rebuilt with their adapters (`finetune.json`) before the weights load.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgraft.errors import CheckpointError, ConfigError


@dataclass
class Classifier:
    model: nn.Module
    labels: list[str]
    encode: Any        # list[str] -> batch
    task: Any          # a Task with forward(model, batch) -> logits
    checkpoint: Path

    @torch.inference_mode()
    def predict(self, inputs: Sequence[str], top_k: int = 5, batch_size: int = 32) -> list[dict[str, Any]]:
        """One `{"input", "label", "probabilities": {label: p, ...}}` per input (top-k, most likely first)."""
        if top_k < 1:
            raise ConfigError(f"--top-k must be >= 1, got {top_k}")
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(inputs), batch_size):
            chunk = list(inputs[start:start + batch_size])
            batch = {k: v.to(device) for k, v in self.encode(chunk).items()}
            probs = self.task.forward(self.model, batch).float().softmax(-1).cpu()  # (N, K)
            k = min(top_k, probs.shape[-1])
            values, idx = probs.topk(k, dim=-1)
            for s, v, i in zip(chunk, values.tolist(), idx.tolist()):
                out.append({"input": s, "label": self.labels[i[0]],
                            "probabilities": {self.labels[j]: round(p, 6) for j, p in zip(i, v)}})
        return out


def _checkpoint_dir(run_dir: Path) -> Path:
    """The best checkpoint when the run marked one, else the run directory (newest checkpoint)."""
    best = run_dir / "checkpoints" / "best.json"
    if best.is_file():
        try:
            cand = run_dir / "checkpoints" / json.loads(best.read_text())["name"]
        except (ValueError, KeyError):
            cand = None
        if cand is not None and cand.is_dir():
            return cand
    return run_dir


def load_classifier(run_dir: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """Model, class names, input encoder and task of a classification run directory."""
    from torchgraft.data.registry import build_encoder, read_labels
    from torchgraft.checkpoint.artifact import read_artifact_checkpoint, resolve
    from torchgraft.train.tasks import build_task

    a = resolve(run_dir)  # what the path is, as for every command
    run = a.run_dir
    if not a.is_checkpoint or run is None or a.labels_file is None:
        raise CheckpointError(f"{a.what} without labels.json (the class names a classification run saves); "
                              "predict needs the run directory of a classification run on images or "
                              "textclass data")
    labels = read_labels(run)
    target = resolve(_checkpoint_dir(run)) if a.kind == "run" else a  # a run: its best checkpoint
    ck = read_artifact_checkpoint(target)
    from torchgraft.checkpoint.model import model_from_checkpoint

    model = model_from_checkpoint(ck, "cpu")  # a LoRA/DoRA fine-tune: adapters rebuilt and merged
    data = (ck.meta.get("run_config") or a.run_config or {}).get("data")
    if not isinstance(data, dict):
        raise ConfigError(f"{run} has no run config with a data: section (config.yaml)")
    encode, task_name = build_encoder(data, run)
    classes = _num_classes(model)
    if classes is not None and classes != len(labels):
        raise ConfigError(f"{run / 'labels.json'} names {len(labels)} classes but the model predicts {classes}; "
                          "restore the labels.json the run wrote (one name per class, in training order)")
    task = build_task({"name": task_name, "label_names": labels})
    return Classifier(model.to(device).eval(), labels, encode, task, Path(ck.path))


def _num_classes(model: nn.Module) -> int | None:
    """The classes a classifier predicts (its config's num_classes / num_labels), None if unknown."""
    cfg = getattr(model, "config", None)
    for key in ("num_classes", "num_labels"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def read_inputs(inputs: Sequence[str], file: str | Path | None) -> list[str]:
    """The inputs given on the command line plus one per non-empty line of `file`."""
    items = list(inputs)
    if file is not None:
        from torchgraft.outputs import check_input_file

        p = check_input_file(Path(file).expanduser(), "--file", "one input per line")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"--file {p} is not UTF-8 text; give a text file with one input per line") from None
        items += [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    if not items:
        raise ConfigError("nothing to predict: give inputs (image paths or texts) or --file with one per line")
    return items


def format_prediction(p: dict[str, Any]) -> str:
    """One human-readable line: input, label, and the top-k probabilities."""
    probs = ", ".join(f"{k} {v:.3f}" for k, v in p["probabilities"].items())
    return f"{p['input']}\t{p['label']}\t({probs})"

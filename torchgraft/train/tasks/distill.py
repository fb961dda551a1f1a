"""Knowledge distillation of a causal LM: the student (the run's model) learns the frozen teacher's
next-token distributions, mixed with the hard labels (`torchgraft.nn.kd_loss` states the loss).

    task: {name: distill, teacher: runs/llama-char, loss: forward_kl, temperature: 2.0, alpha: 0.5,
           chunked_ce: 1024}

Batches are the `lm` task's (`input_ids`, `labels`, optional `attention_mask` / `position_ids`); one
loss unit per target token. `teacher` is any artifact: a run directory, a checkpoint folder (a LoRA
run's adapters merged in) or a Hugging Face model directory; it is loaded once, frozen, kept in eval
mode, runs under `torch.no_grad()` and is never part of the student's checkpoints. It must share the
student's vocabulary (same tokenizer).

`chunked_ce: N` (the `lm` task's option) computes student and teacher logits N token rows at a time
from the final hidden states (`chunked_distill_loss`), so neither (B, T, V) logits tensor exists
(needs the zoo's decoder LMs, which have `output_embedding()`; not with FSDP sharding). Without it
both full logits are built.

Validation metrics: `val_loss` (the student's hard-label cross-entropy, comparable with an `lm` run),
`val_ppl`, `val_kl` (the divergence per token at the temperature, without T^2) and
`val_distill_loss` (the training objective per token).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgraft.errors import CheckpointError, ConfigError
from torchgraft.nn.kd_loss import DIVERGENCES, DistillLoss, chunked_distill_loss, distill_loss
from torchgraft.train.tasks.base import register_task
from torchgraft.train.tasks.causal_lm import MODEL_KWARGS, CausalLMTask


def load_teacher(path: str | Path) -> nn.Module:
    """A frozen, eval-mode decoder LM from a run dir, checkpoint folder or Hugging Face directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"task.teacher: {p} not found (give a run directory, a checkpoint folder or a "
                          "Hugging Face model directory)")
    from torchgraft.interop.artifacts import load_model  # deferred: any artifact kind, HF included

    try:
        model = load_model(p)
    except CheckpointError as e:
        raise ConfigError(f"task.teacher: {e}") from None
    if not hasattr(getattr(model, "config", None), "vocab_size"):
        raise ConfigError(f"task.teacher: {p} holds a {type(model).__name__}, not a decoder language model")
    return model.requires_grad_(False).eval()


class DistillTask(CausalLMTask):
    """Student cross-entropy mixed with a divergence from a frozen teacher, summed over target tokens."""

    name = "distill"

    def __init__(self, teacher: str | nn.Module, loss: str = "forward_kl", temperature: float = 1.0,
                 alpha: float = 0.5, chunked_ce: int | None = None):
        super().__init__(chunked_ce=chunked_ce)
        if loss not in DIVERGENCES:
            raise ConfigError(f"task.loss must be one of {', '.join(DIVERGENCES)}, got {loss!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ConfigError(f"task.temperature must be a positive number (e.g. 2.0), got {temperature!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"task.alpha (the weight of the distillation term) must be in [0, 1], got {alpha!r}")
        if isinstance(teacher, (str, Path)):
            teacher = load_teacher(teacher)
        self.teacher: nn.Module = teacher.eval().requires_grad_(False)
        self.loss, self.temperature, self.alpha = loss, float(temperature), float(alpha)

    def _teacher_on(self, device: torch.device) -> nn.Module:
        """The teacher on the batch's device (moved once), in eval mode whatever the trainer toggles."""
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        return self.teacher.eval()

    def distill(self, model: nn.Module, batch: dict[str, Any]) -> DistillLoss:
        """The loss sums of one batch (differentiable `loss`, plus `kd`, `ce` and `count`)."""
        teacher = self._teacher_on(batch["input_ids"].device)
        kwargs = {k: batch[k] for k in MODEL_KWARGS if batch.get(k) is not None}
        opts = dict(kind=self.loss, temperature=self.temperature, alpha=self.alpha)
        if self.chunked_ce:
            hidden, weight = self._hidden_and_head(model, batch)  # (B, T, C), (V, C)
            with torch.no_grad():
                t_hidden, t_weight = self._hidden_and_head(teacher, batch)  # (B, T, Ct), (V, Ct)
            self._check_vocab(weight.shape[0], t_weight.shape[0])
            return chunked_distill_loss(hidden, weight, t_hidden, t_weight, batch["labels"],
                                        self.chunked_ce, **opts)
        logits = self.forward(model, batch)  # (B, T, V)
        with torch.no_grad():
            t_logits = self.forward(teacher, batch)  # (B, T, V)
        self._check_vocab(logits.shape[-1], t_logits.shape[-1])
        return distill_loss(logits, t_logits, batch["labels"], **opts)

    @staticmethod
    def _check_vocab(student: int, teacher: int) -> None:
        if student != teacher:
            raise ConfigError(f"task.teacher has a {teacher}-token vocabulary but the student {student}; "
                              "teacher and student must share the tokenizer")

    def loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.distill(model, batch).loss

    def eval_sums(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.distill(model, batch)
        return {"loss": out.ce.double(), "count": out.count, "kd": out.kd.double(),
                "distill": out.loss.detach().double()}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums["count"])
        loss = sums["loss"] / n
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_kl": sums["kd"] / n,
                "val_distill_loss": sums["distill"] / n}


register_task("distill", DistillTask)

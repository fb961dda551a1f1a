"""Direct Preference Optimisation (Rafailov et al. 2023) and its pairwise relatives, on "preference" batches.

    task: {name: dpo, beta: 0.1, loss_type: sigmoid, label_smoothing: 0.0}

With the policy's and the reference's summed completion log-probs, the log-ratios are
`chosen_logratio = logp(chosen) - ref_logp(chosen)` (same for rejected) and `d = chosen - rejected`:
- `sigmoid` (DPO): `-(1 - ls) * logsigmoid(beta * d) - ls * logsigmoid(-beta * d)`; `ls` =
  `label_smoothing` (conservative DPO, the preference label is flipped with probability ls);
- `hinge`, and its other name `rso` (SLiC / RSO): `relu(1 - beta * d)`;
- `ipo` (Azar et al.): `(d_avg - 1 / (2 * beta))^2`, with each log-ratio divided by its completion's
  token count (TRL's normalisation, confirmed by the IPO authors);
- `robust` (rDPO, Chowdhury et al.): the unbiased loss under label noise `ls` (< 0.5).
Option `sft_weight` (RPO, Pang et al. 2024; TRL's `loss_type=[..., "sft"]`) adds that weight times the
chosen completion's mean token negative log-likelihood, which keeps the preferred answers likely
(plain DPO may lower both sides, and with them the tokens the two answers share).
Rewards (the logged `val_rewards/*`) are `beta * logratio`. These are TRL 1.16's formulas
(`DPOTrainer._compute_loss`), checked against it in tests/test_dpo_trl_parity.py.

The reference (`reference:`):
- unset, with LoRA/DoRA adapters on the model: the same model with its adapters disabled
  (`torchgraft.peft.disabled`), so there is no second copy of the weights;
- a checkpoint (run directory or checkpoint folder; usually the SFT run that `finetune.source`
  names): loaded once, frozen, on the model's device; needed for full fine-tuning, where the model's
  own weights move away from the reference;
- batches that carry `ref_chosen_logps` / `ref_rejected_logps` (B,) use those (precomputed elsewhere).
With `precompute_reference: true` the reference's log-probs of each pair are computed the first time
the pair is seen and cached by `pair_id` (the reference is frozen, so later epochs and evaluations
need no reference forward); without it they are computed on the fly, in the same step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.errors import ConfigError, did_you_mean
from torchgraft.train.tasks.base import register_task
from torchgraft.train.tasks.pairwise import PairOutputs, PairwiseTask, SideLogps, pair_logps

# (chosen logratio (B,), rejected logratio (B,), chosen tokens (B,), rejected tokens (B,), beta, ls) -> (B,)
DPOLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def sigmoid_loss(c, r, nc, nr, beta, ls):
    d = c - r
    return -(1 - ls) * F.logsigmoid(beta * d) - ls * F.logsigmoid(-beta * d)


def hinge_loss(c, r, nc, nr, beta, ls):
    return torch.relu(1 - beta * (c - r))


def ipo_loss(c, r, nc, nr, beta, ls):
    d = c / nc.clamp(min=1) - r / nr.clamp(min=1)
    return (d - 1 / (2 * beta)) ** 2


def robust_loss(c, r, nc, nr, beta, ls):
    d = c - r
    return (-(1 - ls) * F.logsigmoid(beta * d) + ls * F.logsigmoid(-beta * d)) / (1 - 2 * ls)


LOSSES: dict[str, DPOLoss] = {"sigmoid": sigmoid_loss, "hinge": hinge_loss, "rso": hinge_loss, "ipo": ipo_loss,
                              "robust": robust_loss}


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside torch.compile / DDP wrappers."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner)


class DPOTask(PairwiseTask):
    """DPO-family loss against a frozen reference (see the module docstring)."""

    name = "dpo"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reference: str | None = None, precompute_reference: bool = False, sft_weight: float = 0.0):
        super().__init__()
        if loss_type not in LOSSES:
            raise ConfigError(f"task.loss_type {loss_type!r} is not a DPO loss" + did_you_mean(loss_type, LOSSES)
                              + f"; use one of {', '.join(LOSSES)}")
        if not beta > 0:
            raise ConfigError(f"task.beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ConfigError(f"task.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.loss_type, self.label_smoothing = float(beta), loss_type, float(label_smoothing)
        self.loss_fn = LOSSES[loss_type]
        if sft_weight < 0:
            raise ConfigError(f"task.sft_weight must be >= 0, got {sft_weight}")
        self.sft_weight = float(sft_weight)
        self.reference_path = reference
        self.precompute_reference = precompute_reference
        self._reference: nn.Module | None = None
        self._cache: dict[int, tuple[float, float]] = {}

    # ---- the reference
    def _reference_context(self, model: nn.Module) -> tuple[nn.Module, contextlib.AbstractContextManager]:
        """(the module that gives reference log-probs, the context to call it in)."""
        if self.reference_path is not None:
            if self._reference is None:
                from torchgraft.interop.artifacts import load_model  # deferred: any artifact kind

                param = next(unwrapped(model).parameters())
                ref = load_model(self.reference_path, param.device).eval()
                self._reference = ref.requires_grad_(False)
            return self._reference, contextlib.nullcontext()
        from torchgraft.peft import disabled, lora_layers

        if not lora_layers(unwrapped(model)):
            raise ConfigError("task dpo: the model has no LoRA adapters to disable, so it cannot be its own "
                              "reference; set task.reference to the SFT checkpoint (usually finetune.source) "
                              "or fine-tune with finetune.method=lora")
        return model, disabled(unwrapped(model))

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) summed completion log-probs (B,) under the reference."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        ids = batch["pair_id"].tolist() if self.precompute_reference else None
        if ids is not None and all(i in self._cache for i in ids):
            cached = torch.tensor([self._cache[i] for i in ids], device=batch["pair_id"].device)  # (B, 2)
            return cached[:, 0], cached[:, 1]
        ref, context = self._reference_context(model)
        with context:
            chosen, rejected = pair_logps(ref, batch)
        if ids is not None:
            self._cache.update(zip(ids, zip(chosen.sum.tolist(), rejected.sum.tolist())))
        return chosen.sum, rejected.sum

    # ---- the loss
    def pair_losses(self, chosen: SideLogps, rejected: SideLogps, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor) -> PairOutputs:
        """Per-pair loss and rewards from policy and reference log-probs (B,)."""
        c = chosen.sum - ref_chosen.to(chosen.sum.dtype)
        r = rejected.sum - ref_rejected.to(rejected.sum.dtype)
        losses = self.loss_fn(c, r, chosen.count, rejected.count, self.beta, self.label_smoothing)
        if self.sft_weight:
            losses = losses - self.sft_weight * chosen.mean
        return PairOutputs(losses, self.beta * c.detach(), self.beta * r.detach())

    def pair_outputs(self, model: nn.Module, batch: dict[str, Any]) -> PairOutputs:
        ref_chosen, ref_rejected = self.reference_logps(model, batch)
        chosen, rejected = pair_logps(model, batch)
        return self.pair_losses(chosen, rejected, ref_chosen, ref_rejected)


register_task("dpo", DPOTask)

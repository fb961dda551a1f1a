"""Causal language modelling: `{"input_ids": (B, T), "labels": (B, T)}` (labels -100 are ignored;
optional `attention_mask` and `position_ids` are passed to the model). One loss unit per target token.

Option `chunked_ce: N` (`task: {name: lm, chunked_ce: 1024}`): the loss is computed N token rows at a
time from the final hidden states and the output embedding (`torchgraft.nn.losses`), so the full
(B, T, V) float32 logits never exist (large vocabularies: 2 x 6 GiB at V = 128k, 12 x 1024 tokens).
Needs a decoder LM with `forward(..., return_hidden=True)` and `output_embedding()` (the zoo's
gpt / llama families); not with FSDP sharding (the head weight is sharded outside the forward).

Option `router_aux_coef: c` (`task: {name: lm, router_aux_coef: 0.01}`, mixture-of-experts models):
adds `c * load_balancing_loss` (transformers' `load_balancing_loss_func` over every MoE block's router
logits of this forward, padding excluded) per target token, so the normalised loss is
`cross-entropy + c * aux` as in transformers' `...ForCausalLM` with `output_router_logits`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.nn.losses import chunked_cross_entropy, chunked_cross_entropy_stats
from torchgraft.nn.moe import load_balancing_loss, moe_blocks, router_logits_of
from torchgraft.train.tasks.base import IGNORE_INDEX, Task, register_task
from torchgraft.train.tasks.classification import logits_of

MODEL_KWARGS = ("attention_mask", "position_ids")


class CausalLMTask(Task):
    """Next-token cross-entropy summed over target tokens; metrics val_loss, val_accuracy, val_ppl."""

    name = "lm"
    unit = "tokens"

    def __init__(self, chunked_ce: int | None = None, router_aux_coef: float = 0.0):
        super().__init__()
        if isinstance(router_aux_coef, bool) or not isinstance(router_aux_coef, (int, float)) or router_aux_coef < 0:
            raise ConfigError(f"task.router_aux_coef must be a number >= 0 (e.g. 0.01), got {router_aux_coef!r}")
        self.router_aux_coef = float(router_aux_coef)
        if chunked_ce is not None and (isinstance(chunked_ce, bool) or not isinstance(chunked_ce, int)
                                       or chunked_ce < 1):
            raise ConfigError(f"task.chunked_ce must be a positive number of token rows per chunk "
                              f"(e.g. 1024) or null, got {chunked_ce!r}")
        self.chunked_ce = chunked_ce

    def _hidden_and_head(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (B, T, C) through the model's forward, and its (V, C) output embedding."""
        inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        inner = getattr(inner, "module", inner)  # DDP's wrapper
        if not hasattr(inner, "output_embedding"):
            raise ConfigError(f"task.chunked_ce needs a decoder LM with output_embedding() and "
                              f"forward(..., return_hidden=True) (the gpt / llama families); "
                              f"{type(inner).__name__} has none: remove task.chunked_ce")
        if getattr(inner, "logit_softcap", None) is not None:
            raise ConfigError(f"task.chunked_ce computes logits as hidden @ head, but {type(inner).__name__} "
                              "soft-caps its logits (Gemma 2): remove task.chunked_ce")
        weight = inner.output_embedding()
        if hasattr(weight, "full_tensor"):
            raise ConfigError("task.chunked_ce does not work with FSDP sharding (the head weight is "
                              "sharded outside the forward); use distributed.strategy=ddp or remove it")
        kwargs = {k: batch[k] for k in MODEL_KWARGS if batch.get(k) is not None}
        return model(batch["input_ids"], **kwargs, return_hidden=True), weight

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        kwargs = {k: batch[k] for k in MODEL_KWARGS if batch.get(k) is not None}
        return logits_of(model(batch["input_ids"], **kwargs))  # (B, T, V)

    def count(self, batch: dict[str, Any]) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    def _flat(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.forward(model, batch)
        return logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1)  # (N, V), (N,)

    def loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        if self.chunked_ce:
            hidden, weight = self._hidden_and_head(model, batch)
            loss = chunked_cross_entropy(hidden, weight, batch["labels"], self.chunked_ce, IGNORE_INDEX)
        else:
            logits, labels = self._flat(model, batch)
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        if self.router_aux_coef:
            loss = loss + self.router_aux_coef * self._router_aux(model, batch) * self.count(batch)
        return loss

    def _router_aux(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The load-balancing loss of the forward just run (its MoE blocks kept their router logits)."""
        blocks = moe_blocks(model)
        if not blocks:
            raise ConfigError(f"task.router_aux_coef needs a mixture-of-experts model (mixtral, qwen3_moe, qwen2_moe); "
                              f"{type(model).__name__} has no MoE block: remove task.router_aux_coef")
        return load_balancing_loss(router_logits_of(model), blocks[0].top_k, batch.get("attention_mask"))

    def eval_sums(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.chunked_ce:
            hidden, weight = self._hidden_and_head(model, batch)
            loss, count, correct = chunked_cross_entropy_stats(hidden, weight, batch["labels"], self.chunked_ce,
                                                               IGNORE_INDEX)
            return {"loss": loss, "count": count, "correct": correct}
        logits, labels = self._flat(model, batch)
        valid = labels != IGNORE_INDEX
        return {"loss": F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").double(),
                "count": valid.sum(), "correct": ((logits.argmax(-1) == labels) & valid).sum()}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums["count"])
        loss = sums["loss"] / n
        return {"val_loss": loss, "val_accuracy": sums["correct"] / n, "val_ppl": math.exp(min(loss, 50.0))}


register_task("lm", CausalLMTask)

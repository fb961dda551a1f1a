"""Reward models: any decoder LM with a scalar score read at the last real token.

    model: {family: reward, backbone: {family: llama, n_layer: 4, n_embd: 128, ...}}

`ScoreHead(dim)` is Hugging Face's `*ForSequenceClassification` head with one label: a bias-free
`Linear(dim, 1)` applied to the hidden state of each row's last real token (found from the
attention mask, so right or left padding both work). `reward_model(config)` puts it on the backbone
that `config.backbone` names (any registered decoder: a model section with `name:` or `family:`),
as a `TaskModel`: `forward(input_ids (B, T), attention_mask=None) -> scores (B, 1)`; state-dict
names `backbone.*` (the decoder's own names under that prefix, so `finetune.rules: {"*": "backbone.*"}`
moves an SFT run's weights in) and `head.score.weight`. The decoder's LM head stays unused.
The `reward_model` task (torchgraft.train.tasks.reward_model) trains it on preference pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchgraft.models.heads import TaskModel, feature_dim, pool_tokens
from torchgraft.models.registry import family_of_config, register_family, resolve_config


class ScoreHead(nn.Module):
    """(B, T, C) hidden states -> (B, 1) scores of the last real token (bias-free, as HF's `score`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        last = pool_tokens(hidden, "last", attention_mask)  # (B, C)
        return self.score(last)  # (B, 1)


@dataclass
class RewardModelConfig:
    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "llama-tiny"})  # any decoder's model section
    vocab_size: int | None = None  # set (e.g. from the data): replaces the backbone's vocab_size


def reward_model(config: RewardModelConfig) -> TaskModel:
    """Builder of the "reward" family: the backbone decoder + a `ScoreHead`."""
    spec = dict(config.backbone)
    if config.vocab_size is not None:
        spec["vocab_size"] = config.vocab_size
    name, bcfg = resolve_config(spec)
    backbone = family_of_config(bcfg).builder(bcfg)
    backbone.config, backbone.model_name = bcfg, name
    return TaskModel(backbone, ScoreHead(feature_dim(backbone)))


register_family("reward", RewardModelConfig, reward_model)

"""BERT family: post-norm bidirectional encoder (exact GELU, LayerNorm eps 1e-12), optional tanh pooler,
and sequence/token classification variants selected by `task`.

State-dict names: `embeddings.{tok_emb,pos_emb,type_emb,norm}`, `blocks.{i}.attn.{q,k,v,o}_proj`,
`blocks.{i}.attn_norm`, `blocks.{i}.mlp.{fc_in,fc_out}`, `blocks.{i}.mlp_norm`, `pooler.dense`,
`classifier` (task variants only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.models.heads import pool_tokens
from torchgraft.models.parts import ModelParts, token_inputs
from torchgraft.models.registry import register_family, register_preset
from torchgraft.nn.attention import Attention, make_attention_mask
from torchgraft.nn.embedding import TokenPositionEmbedding
from torchgraft.nn.init import normal_init_
from torchgraft.nn.mlp import MLP
from torchgraft.nn.norm import LayerNorm
from torchgraft.nn.transformer import PostNormBlock

BertTask = Literal["none", "sequence_classification", "token_classification"]


@dataclass
class BertConfig:
    vocab_size: int = 30522
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int = 3072
    block_size: int = 512  # max positions
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    bias: bool = True
    dropout: float = 0.1  # hidden and attention-probability dropout (BERT's 0.1)
    activation: str = "gelu"  # exact erf GELU
    pooler: bool = True
    # sequence_classification pools with: "pooler" (the tanh pooler on [CLS]; [CLS] when pooler=false),
    # "cls" (the [CLS] hidden state) or "mean" (mean over real tokens, as sentence-transformers do)
    pooling: Literal["pooler", "cls", "mean"] = "pooler"
    task: BertTask = "none"
    num_labels: int = 2
    classifier_dropout: float | None = None  # None = dropout
    init_std: float = 0.02

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.task != "none" and self.num_labels < 1:
            raise ConfigError("model.num_labels must be >= 1 for a classification task")


class BertPooler(nn.Module):
    """tanh(dense(hidden[:, 0])) (state-dict name `pooler.dense`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


def hidden_states(model: "Bert", hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Task "none": the last hidden state (B, T, C) as it is."""
    return hidden


def sequence_logits(model: "Bert", hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Task "sequence_classification": (B, T, C) -> pooled (B, C) -> (B, num_labels)."""
    return model.classifier(model.classifier_drop(model.pool(hidden, attention_mask)))


def token_logits(model: "Bert", hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Task "token_classification": (B, T, C) -> (B, T, num_labels)."""
    return model.classifier(model.classifier_drop(hidden))


# the read-out of each task, chosen once when the model is built (Bert.forward never looks at the task);
# the classifier itself stays `classifier` (HF's state-dict name), so the read-outs hold no weights
TASK_READOUTS = {"none": hidden_states, "sequence_classification": sequence_logits,
                 "token_classification": token_logits}


class Bert(nn.Module):
    """`forward(input_ids (B, T), attention_mask=None, token_type_ids=None)`:
    task "none" -> last hidden state (B, T, C); "sequence_classification" -> (B, num_labels)
    (from the pooler, or the [CLS] hidden state without one); "token_classification" -> (B, T, num_labels).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        C = c.n_embd
        self.embeddings = TokenPositionEmbedding(c.vocab_size, C, c.block_size, c.type_vocab_size,
                                                 norm=LayerNorm(C, c.norm_eps), dropout=c.dropout)
        self.blocks = nn.ModuleList(
            PostNormBlock(Attention(C, c.n_head, causal=False, bias=c.bias, dropout=c.dropout),
                          MLP(C, c.intermediate_size, bias=c.bias, activation=c.activation),
                          LayerNorm(C, c.norm_eps, bias=c.bias), LayerNorm(C, c.norm_eps, bias=c.bias),
                          dropout=c.dropout)
            for _ in range(c.n_layer))
        self.pooler = BertPooler(C) if c.pooler else None
        if c.task != "none":
            p = c.dropout if c.classifier_dropout is None else c.classifier_dropout
            self.classifier_drop = nn.Dropout(p) if p else nn.Identity()
            self.classifier = nn.Linear(C, c.num_labels)
        else:
            self.classifier = None
        self.readout = TASK_READOUTS[c.task]
        if not self.embeddings.tok_emb.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT init: normal(0, init_std) Linear/Embedding weights, zero biases, unit LayerNorms."""
        normal_init_(self, self.config.init_std)

    def parts(self) -> ModelParts:
        """Post-norm blocks: `zero_residual_is_identity=False` (grow cannot deepen BERT by zeroing)."""
        n = len(self.blocks)
        return ModelParts(
            blocks=tuple(f"blocks.{i}" for i in range(n)), input_layer="embeddings.tok_emb",
            classifier="classifier" if self.classifier is not None else None,
            position_embedding="embeddings.pos_emb",
            residual_projections=tuple(f"blocks.{i}.{r}" for i, b in enumerate(self.blocks)
                                       for r in b.residual_projections()),
            example_inputs=self.example_inputs, vocab=("embeddings.tok_emb",),
            zero_residual_is_identity=all(b.zero_residual_is_identity for b in self.blocks))

    def example_inputs(self, batch_size: int = 1, seq_len: int | None = None) -> tuple[torch.Tensor]:
        """`(input_ids,)` (batch_size, seq_len or block_size)."""
        return token_inputs(self, self.config.vocab_size, self.config.block_size, batch_size, seq_len)

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         token_type_ids: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden state (B, T, C)."""
        x = self.embeddings(input_ids, position_ids=position_ids, token_type_ids=token_type_ids)
        mask = None
        if attention_mask is not None:
            t = input_ids.shape[1]
            mask, _ = make_attention_mask(attention_mask, t, t, False, input_ids.device)
        for block in self.blocks:
            x = block(x, attention_mask=mask)
        return x

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled sentence vector (B, C) as `config.pooling` says: the tanh pooler (the [CLS] state
        when there is none), the [CLS] state, or the mean over real tokens (`attention_mask`)."""
        if self.config.pooling == "mean":
            return pool_tokens(hidden, "mean", attention_mask)
        if self.config.pooling == "cls" or self.pooler is None:
            return hidden[:, 0]
        return self.pooler(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.forward_features(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        return self.readout(self, hidden, attention_mask)  # the task's read-out, chosen at build time


register_family("bert", BertConfig, Bert)
register_preset("bert-base", "bert", description="BERT-base (uncased vocab), 110M with pooler")
register_preset("bert-large", "bert", description="BERT-large, 335M with pooler",
                n_layer=24, n_head=16, n_embd=1024, intermediate_size=4096)
register_preset("minilm-l6-h384", "bert", description="MiniLM-L6-H384 (all-MiniLM-L6-v2 shape)",
                n_layer=6, n_head=12, n_embd=384, intermediate_size=1536)
register_preset("bert-tiny", "bert", description="BERT-tiny (L2 H128 A2) for tests",
                n_layer=2, n_head=2, n_embd=128, intermediate_size=512)

"""Built-in text for language modelling: character-level windows over Python's `pydoc_data.topics`.

A minimal stand-in until the tokenizer-based `text` dataset exists: vocabulary = the sorted set of
characters in the corpus; the first 90% is the training split, the rest validation. Each example is a
non-overlapping window of `block_size + 1` characters giving `input_ids` and next-char `labels`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from torchgraft.config import from_dict
from torchgraft.data.registry import DataBundle, register_dataset
from torchgraft.errors import ConfigError


@dataclass
class CharsConfig:
    block_size: int = 128
    val_fraction: float = 0.1
    max_chars: int | None = None   # use only the first N characters (quick experiments)


@lru_cache(maxsize=1)
def corpus() -> str:
    """The built-in English text (~465k characters of Python documentation topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class CharWindows(torch.utils.data.Dataset):
    """Non-overlapping (block_size + 1)-character windows of an encoded text."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        self.ids, self.block_size = ids, block_size
        self.n = (len(ids) - 1) // block_size
        if self.n < 1:
            raise ConfigError(f"text split has {len(ids)} characters, fewer than "
                              f"block_size+1={block_size + 1}; lower data.block_size")
        self._offsets = torch.arange(block_size + 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch(torch.tensor([i])).items()}

    def get_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        win = self.ids[indices[:, None] * self.block_size + self._offsets]  # (B, T+1)
        return {"input_ids": win[:, :-1], "labels": win[:, 1:]}


def build_chars(options: dict, seed: int = 0) -> DataBundle:
    cfg = from_dict(CharsConfig, options, prefix="data")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    text = corpus() if cfg.max_chars is None else corpus()[: cfg.max_chars]
    vocab = sorted(set(corpus()))
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * (1 - cfg.val_fraction))
    return DataBundle(train=CharWindows(ids[:cut], cfg.block_size),
                      val=CharWindows(ids[cut:], cfg.block_size), task="lm",
                      info={"vocab_size": len(vocab), "itos": "".join(vocab),
                            "block_size": cfg.block_size})


register_dataset("chars", build_chars)

"""What `torchgraft serve ARTIFACT` serves, and how it is loaded.

- a decoder LM (GPT / Llama run directory, checkpoint folder, merged LoRA folder, LoRA run, or a
  Hugging Face directory), via `recipes.lm.load_lm`, with its tokenizer and chat template:
  `/v1/completions` and `/v1/chat/completions`;
- a text classification run (`labels.json`, a `textclass` run such as a fine-tuned MiniLM), via
  `recipes.predict.load_classifier`: `/v1/classify` (as `predict --json`) and `/v1/embeddings`;
- a text encoder without a head (a Hugging Face BERT / MiniLM directory): `/v1/embeddings`.
An artifact is one of the two dataclasses below; the app offers the routes its kind supports.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgraft.errors import CheckpointError, ConfigError


@dataclass
class DecoderArtifact:
    """A decoder LM with its tokenizer and chat template."""
    name: str
    model: nn.Module
    tokenizer: Any
    template: Any          # data.chat_template.ChatTemplate
    context: int           # most positions (prompt + completion) a sequence may use

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt text -> ids, bos only for an empty prompt (as `generate` does)."""
        return self.tokenizer.encode(text, add_bos=text == "" and self.tokenizer.bos_id is not None)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation rendered by the chat template, ready for the assistant's answer (the
        template places bos itself)."""
        return self.tokenizer.encode(self.template.render(messages, add_generation_prompt=True))


@dataclass
class EncoderArtifact:
    """A text encoder: `encode(texts) -> batch` (input_ids, attention_mask[, token_type_ids]);
    `classifier` (recipes.predict.Classifier) when it is a classification run."""
    name: str
    model: nn.Module
    encode: Callable[[list[str]], dict[str, torch.Tensor]]
    classifier: Any = None
    normalize: bool = False  # sentence-transformers' Normalize module follows the pooling


def artifact_name(path: Path) -> str:
    """The model id clients use: the run directory's name (a checkpoint folder's run, if any)."""
    p = path.resolve()
    if p.parent.name == "checkpoints":
        p = p.parent.parent
    return p.name


def load_artifact(path: str | Path, device: str = "cpu", name: str | None = None,
                  context: int | None = None) -> DecoderArtifact | EncoderArtifact:
    """Load what `path` holds (see the module docstring); `context` caps a decoder's window."""
    from torchgraft.checkpoint.artifact import resolve

    if not Path(path).expanduser().exists():
        raise CheckpointError(f"artifact not found: {path} (give a run directory, a checkpoint folder or a "
                              "Hugging Face model directory)")
    a = resolve(path)  # what the path is, as for every command
    p = a.path
    name = name or artifact_name(p)
    if a.labels_file is not None:
        return _classifier(p, device, name)
    from torchgraft.recipes.lm import lm_chat_template, load_lm

    lm = load_lm(p, device=device)
    if lm.tokenizer is None:
        raise ConfigError(f"no tokenizer.json found for {p}; put one next to the weights")
    block = int(getattr(lm.model.config, "block_size", 0) or 0)
    if not hasattr(lm.model, "make_kv_cache"):
        return EncoderArtifact(name, lm.model, _text_batcher(lm.tokenizer, block or 512), None, _normalizes(p))
    if context is not None:
        if context < 2:
            raise ConfigError(f"--context must be >= 2, got {context}")
        block = min(block, context) if block else context
    if not block:
        raise ConfigError(f"{p}: the model has no block_size; pass --context N")
    return DecoderArtifact(name, lm.model, lm.tokenizer, lm_chat_template(lm), block)


def _classifier(run: Path, device: str, name: str) -> EncoderArtifact:
    from torchgraft.recipes.predict import load_classifier

    clf = load_classifier(run, device=device)
    if getattr(clf.task, "name", None) != "sequence_classification":
        raise ConfigError(f"{run} is a {getattr(clf.task, 'name', 'non-text')} run; serve classifies text "
                          "(textclass runs); use `torchgraft predict` for images")
    return EncoderArtifact(name, clf.model, clf.encode, clf, False)


def _text_batcher(tokenizer: Any, max_len: int) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """Texts -> a padded batch with the tokenizer's special tokens ([CLS] ... [SEP]), truncated to
    `max_len`, as sentence-transformers tokenises."""
    from torchgraft.data.textclass import PadCollate, TextEncoder

    enc, collate = TextEncoder(tokenizer, max_len), PadCollate(tokenizer.pad_id)

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        encs, _ = enc.encode(list(texts))
        return collate([{"input_ids": torch.tensor(e.ids, dtype=torch.long)} for e in encs])

    return encode


def _normalizes(directory: Path) -> bool:
    """True when a sentence-transformers `modules.json` lists a Normalize module."""
    f = directory / "modules.json"
    if not f.is_file():
        return False
    try:
        modules = json.loads(f.read_text(encoding="utf-8"))
    except ValueError:
        raise ConfigError(f"{f} is not valid JSON") from None
    return any(str(m.get("type", "")).endswith("Normalize") for m in modules if isinstance(m, dict))

"""Instruction / chat data for supervised fine-tuning of causal LMs (the loss on the assistant only).

    data: {name: sft, path: chats.jsonl, tokenizer: path/to/tokenizer_dir, seq_len: 512, packing: true}

Records (JSONL, one per line): `{"prompt": ..., "response": ...}` (optionally `"system"`), or
`{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}`.

1. Each conversation is rendered with the chat template (`torchgraft.data.chat_template`: the
   tokenizer's own, `data.chat_template`, or the plain built-in one) and split into segments;
   each segment is tokenised on its own, so the assistant's tokens are known exactly. Labels are
   the next token where that token belongs to an assistant turn (its content and the template's
   end-of-turn text), -100 everywhere else.
2. A conversation longer than `seq_len + 1` tokens is cut to that length (counted and reported;
   one left with no assistant token is dropped).
3. `packing: true` puts several conversations into one window of `seq_len` tokens (in file order,
   a new window when the next one does not fit). Positions restart at 0 for every conversation
   (`position_ids`) and each token attends only to earlier tokens of its own conversation: the
   batch carries a boolean `attention_mask` (B, 1, T, T) (True = may attend) that the models pass
   straight to `scaled_dot_product_attention`. So a packed conversation has exactly the loss it has
   alone. `packing: false` gives one conversation per row, right-padded to the batch's longest,
   with a (B, T) padding mask.

Batches: {"input_ids": (B, T), "labels": (B, T), "position_ids": (B, T), "attention_mask":
(B, 1, T, T) bool | (B, T)} for the "lm" task (whose val_loss is then the loss on responses only).
The template is saved with the run (`RUN_DIR/tokenizer/chat_template.jinja`), so
`torchgraft generate RUN_DIR --chat` renders prompts the same way.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from torchgraft.config import from_dict
from torchgraft.data.chat_template import TEMPLATE_FILE, ChatTemplate, validate_messages
from torchgraft.data.registry import DataBundle, register_dataset
from torchgraft.data.tokenizers import Tokenizer, load_tokenizer
from torchgraft.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class SFTConfig:
    """Options of the "sft" dataset (`data:` section)."""
    path: str = ""                     # JSONL of prompt/response or messages records
    val_path: str | None = None        # separate validation JSONL (else a seeded split)
    val_fraction: float = 0.1
    split_seed: int = 0
    tokenizer: str = ""                # tokenizer.json or a directory holding one (+ tokenizer_config.json)
    chat_template: str | None = None   # a .jinja file or inline Jinja (default: the tokenizer's, else built-in)
    seq_len: int = 512                 # tokens per training window
    packing: bool = True               # several conversations per window, attention kept apart


@dataclass
class Example:
    ids: list[int]       # the conversation's tokens
    trained: list[bool]  # True where the token is the assistant's


def conversation_of(record: Any, where: str) -> list[dict[str, str]]:
    """The messages of one JSONL record (prompt/response records become user + assistant)."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: each line must be a JSON object with \"messages\" or \"prompt\"/\"response\"")
    if "messages" in record:
        msgs = validate_messages(record["messages"], where)
    elif "prompt" in record and "response" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["response"], str):
            raise ConfigError(f"{where}: prompt and response must be strings")
        msgs = [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]}]
        if isinstance(record.get("system"), str):
            msgs.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise ConfigError(f"{where}: a record needs \"messages\" or both \"prompt\" and \"response\" "
                          f"(keys: {', '.join(record)})")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ConfigError(f"{where}: the conversation has no assistant message to learn from")
    return msgs


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    if not path.is_file():
        raise ConfigError(f"instruction file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{n} is not valid JSON (JSONL needs one object per line)") from None
        out.append(conversation_of(record, f"{path}:{n}"))
    if not out:
        raise ConfigError(f"{path} is empty; it needs one JSON record per line")
    return out


def encode_conversation(messages: list[dict[str, str]], template: ChatTemplate, tok: Tokenizer,
                        last_turn_only: bool = False) -> Example:
    """Tokens of the rendered conversation and which of them are the assistant's (with
    `last_turn_only`, only the final assistant turn's: a preference pair's completion; the text is
    cut into the same segments either way, so the tokens are the same)."""
    text, spans = template.assistant_spans(messages)
    ids: list[int] = []
    trained: list[bool] = []
    pos = 0
    for k, (start, end) in enumerate(spans + [(len(text), len(text))]):
        learn = not last_turn_only or k == len(spans) - 1
        for piece, mine in ((text[pos:start], False), (text[start:end], learn)):
            if piece:
                seg = tok.encode(piece)
                ids += seg
                trained += [mine] * len(seg)
        pos = end
    return Example(ids, trained)


class SFTWindows(Dataset):
    """Windows of one or more whole conversations. Item i -> {"input_ids", "labels", "doc_ids"}
    (T_i,) each, where `doc_ids` numbers the conversations in the window (positions restart)."""

    def __init__(self, examples: list[Example], windows: list[list[int]]):
        self.examples, self.windows = examples, windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels, docs = [], [], []
        for d, e in enumerate(self.windows[i]):
            ex = self.examples[e]
            ids += ex.ids[:-1]
            labels += [t if keep else IGNORE_INDEX for t, keep in zip(ex.ids[1:], ex.trained[1:])]
            docs += [d] * (len(ex.ids) - 1)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "doc_ids": torch.tensor(docs)}


class SFTCollate:
    """Right-pad to `length` (packed: the window) or the longest row; build positions and the mask."""

    def __init__(self, pad_id: int, packed: bool, length: int | None = None):
        self.pad_id, self.packed, self.length = pad_id, packed, length

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        t = self.length or max(len(it["input_ids"]) for it in items)
        b = len(items)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        docs = torch.full((b, t), -1, dtype=torch.long)  # (B, T); -1 = padding
        for r, it in enumerate(items):
            n = len(it["input_ids"])
            ids[r, :n], labels[r, :n], docs[r, :n] = it["input_ids"], it["labels"], it["doc_ids"]
        if not self.packed:
            real = (docs >= 0).long()
            pos = (real.cumsum(1) - 1).clamp(min=0)
            return {"input_ids": ids, "labels": labels, "attention_mask": real, "position_ids": pos}
        return {"input_ids": ids, "labels": labels, "position_ids": document_positions(docs),
                "attention_mask": document_mask(docs)}


def document_positions(docs: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 where the document id changes."""
    b, t = docs.shape
    idx = torch.arange(t).expand(b, t)
    start = torch.ones_like(docs, dtype=torch.bool)
    start[:, 1:] = docs[:, 1:] != docs[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values  # index where each run began
    return idx - first


def document_mask(docs: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: query i may attend key j iff j <= i and both are in the same document
    (padding, id -1, forms its own document, so every row attends to at least itself)."""
    t = docs.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]


def pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Greedy in-order packing of examples with `lengths` (input tokens) into windows of `seq_len`."""
    windows: list[list[int]] = []
    used = seq_len + 1
    for i, n in enumerate(lengths):
        if used + n > seq_len:
            windows.append([])
            used = 0
        windows[-1].append(i)
        used += n
    return windows


def _tokenizer(spec: str) -> Tokenizer:
    if not spec:
        raise ConfigError("data.tokenizer is required: a tokenizer.json or a directory holding one (its "
                          "tokenizer_config.json may carry the chat template)")
    return load_tokenizer(Path(spec).expanduser())


def build_sft(options: dict[str, Any], seed: int = 0) -> DataBundle:
    """Builder of the "sft" dataset (see the module docstring)."""
    cfg = from_dict(SFTConfig, options, prefix="data")
    if not cfg.path:
        raise ConfigError("data.path is required: a JSONL of {\"prompt\", \"response\"} or {\"messages\": [...]} records")
    if cfg.seq_len < 2:
        raise ConfigError(f"data.seq_len must be >= 2, got {cfg.seq_len}")
    tok = _tokenizer(cfg.tokenizer)
    template = ChatTemplate.for_tokenizer(Path(cfg.tokenizer).expanduser(), cfg.chat_template,
                                          {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                                           "pad_token": tok.pad_token})
    train_convs = read_conversations(Path(cfg.path).expanduser())
    if cfg.val_path:
        val_convs = read_conversations(Path(cfg.val_path).expanduser())
    else:
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
        g = torch.Generator().manual_seed(cfg.split_seed)
        order = torch.randperm(len(train_convs), generator=g).tolist()
        k = min(round(len(train_convs) * cfg.val_fraction), len(train_convs) - 1)
        val_convs = [train_convs[i] for i in sorted(order[:k])]
        train_convs = [train_convs[i] for i in sorted(order[k:])]
    stats = {"truncated": 0, "dropped": 0}

    def examples(convs: list[list[dict[str, str]]]) -> list[Example]:
        out = []
        for msgs in convs:
            ex = encode_conversation(msgs, template, tok)
            if len(ex.ids) > cfg.seq_len + 1:
                stats["truncated"] += 1
                ex = Example(ex.ids[: cfg.seq_len + 1], ex.trained[: cfg.seq_len + 1])
            if not any(ex.trained[1:]):
                stats["dropped"] += 1
                continue
            out.append(ex)
        return out

    def dataset(convs: list[list[dict[str, str]]]) -> SFTWindows | None:
        exs = examples(convs)
        if not exs:
            return None
        windows = pack([len(e.ids) - 1 for e in exs], cfg.seq_len) if cfg.packing else [[i] for i in range(len(exs))]
        return SFTWindows(exs, windows)

    train, val = dataset(train_convs), dataset(val_convs)
    n = len(train_convs) + len(val_convs)
    said = []
    if stats["truncated"]:
        said.append(f"{stats['truncated']} of {n} conversations were longer than seq_len + 1 = "
                    f"{cfg.seq_len + 1} tokens and were truncated")
    if stats["dropped"]:
        whole = "" if stats["truncated"] else f" of {n} conversations"
        said.append(f"{stats['dropped']}{whole} kept no assistant token and were dropped")
    empty = sum(1 for c in train_convs + val_convs for m in c
                if m["role"] == "assistant" and not str(m.get("content") or "").strip())
    if empty:
        said.append(f"{empty} assistant turn(s) are empty and are trained on as they are (the model learns "
                    "to answer with only the end of the turn); fill or remove them if they are mistakes")
    if said:
        warnings.warn("sft: " + "; ".join(said), stacklevel=3)
    if train is None:
        raise ConfigError(f"{cfg.path}: no conversation has an assistant token within seq_len={cfg.seq_len}")
    info = {"vocab_size": tok.vocab_size, "tokenizer": tok, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "seq_len": cfg.seq_len, "chat_template": template.name, "n_conversations": n,
            "n_truncated": stats["truncated"], "n_dropped": stats["dropped"], "n_empty_turns": empty,
            "n_train_windows": len(train), "n_val_windows": len(val) if val is not None else 0}
    collate = SFTCollate(tok.pad_id, cfg.packing, cfg.seq_len if cfg.packing else None)
    return DataBundle(train=train, val=val, task="lm", collate_fn=collate, info=info,
                      files={f"tokenizer/{TEMPLATE_FILE}": template.source})


register_dataset("sft", build_sft)

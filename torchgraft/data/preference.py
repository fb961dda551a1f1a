"""Preference pairs for DPO-style tuning and reward models: a prompt, a preferred and a rejected answer.

    data: {name: preference, path: pairs.jsonl, tokenizer: runs/sft/tokenizer, max_len: 256}

Records (`.jsonl` / `.json` one object per line, `.csv` / `.tsv` with a header row), in the column
names of Hugging Face / TRL preference datasets:
- standard: `{"prompt": str, "chosen": str, "rejected": str}` (optionally `"system": str`);
- conversational, explicit prompt: `{"prompt": [messages], "chosen": [{"role": "assistant",
  "content": ...}], "rejected": [...]}` (`"messages"` is accepted in place of `"prompt"`; a chosen /
  rejected string is the assistant's content);
- conversational, implicit prompt: `{"chosen": [messages], "rejected": [messages]}`, two whole
  conversations that share everything but their last (assistant) message.

1. Both conversations are rendered with the chat template exactly as the `sft` dataset renders them
   (`torchgraft.data.chat_template`, `torchgraft.data.sft.encode_conversation`: the tokenizer's
   template, `data.chat_template`, or the built-in one), so a model SFT'd with torchgraft sees the
   same tokens. Labels are the next token where it belongs to the final assistant turn (the
   completion: its content and the template's end-of-turn text), -100 elsewhere.
2. Truncation: a sequence holds at most `max_len` input tokens (`max_len + 1` tokens with the
   shifted labels). The prompt is always kept whole; the completion is cut at the end. A pair whose
   prompt alone is longer than `max_len` tokens cannot be trained on.
3. Bad pairs: a missing field, chosen == rejected, an empty (or whitespace-only) completion, a
   prompt longer than `max_len`. With `on_bad: error` (default) the first one stops the run with one
   line naming the record and the fix; with `on_bad: skip` they are dropped, counted per reason and
   reported in one warning (and `DataBundle.info["n_skipped"]`).
4. Batches are not packed: one pair per row, both sides right-padded to the batch's longest
   sequence, with (B, T) padding masks:
   `{"chosen_input_ids", "chosen_labels", "chosen_attention_mask", "rejected_input_ids",
   "rejected_labels", "rejected_attention_mask"}` (B, T) each, and `"pair_id"` (B,) (a number unique
   over train + val, so a task can cache the reference's log-probs of a pair).
The tasks `dpo`, `simpo`, `orpo` and `reward_model` (torchgraft.train.tasks) read these batches.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from torchgraft.config import from_dict
from torchgraft.data.chat_template import TEMPLATE_FILE, ChatTemplate, validate_messages
from torchgraft.data.registry import DataBundle, register_dataset
from torchgraft.data.sft import IGNORE_INDEX, Example, _tokenizer, encode_conversation
from torchgraft.data.textclass import read_rows
from torchgraft.data.tokenizers import Tokenizer
from torchgraft.errors import ConfigError

SIDES = ("chosen", "rejected")
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}


@dataclass
class PreferenceConfig:
    """Options of the "preference" dataset (`data:` section)."""
    path: str = ""                     # JSONL / CSV / TSV of preference records
    val_path: str | None = None        # separate validation file (else a seeded split)
    val_fraction: float = 0.1
    split_seed: int = 0
    tokenizer: str = ""                # tokenizer.json or a directory holding one (+ tokenizer_config.json)
    chat_template: str | None = None   # a .jinja file or inline Jinja (default: the tokenizer's, else built-in)
    max_len: int = 512                 # input tokens per sequence (prompt kept whole, completion cut)
    on_bad: Literal["error", "skip"] = "error"  # what a bad pair does: stop the run, or counted skip


class BadPair(ValueError):
    """One record that cannot become a training pair; `reason` is the skip counter's key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Pair:
    chosen: Example
    rejected: Example


def _completion(value: Any, side: str) -> dict[str, str]:
    """The final assistant message of one side (a string, or a one-message list)."""
    if isinstance(value, str):
        msg = {"role": "assistant", "content": value}
    elif isinstance(value, list) and len(value) == 1:
        try:
            msg = validate_messages(value, side)[0]
        except ConfigError as e:
            raise BadPair("bad field", str(e)) from None
    else:
        raise BadPair("bad field", f"{side} must be a string or a list with one assistant message")
    if msg["role"] != "assistant":
        raise BadPair("bad field", f"the {side} message must have role \"assistant\", not {msg['role']!r}")
    if not msg["content"].strip():
        raise BadPair("empty completion", f"the {side} completion is empty")
    return msg


def _prompt(record: dict[str, Any]) -> list[dict[str, str]]:
    key = "prompt" if "prompt" in record else "messages"
    value = record[key]
    if isinstance(value, str):
        msgs = [{"role": "user", "content": value}]
        if isinstance(record.get("system"), str) and record["system"]:
            msgs.insert(0, {"role": "system", "content": record["system"]})
        return msgs
    try:
        return validate_messages(value, key)
    except ConfigError as e:
        raise BadPair("bad field", str(e)) from None


def pair_conversations(record: Any) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(chosen conversation, rejected conversation) of one record; `BadPair` if it is not a valid pair."""
    if not isinstance(record, dict):
        raise BadPair("bad field", "a record must be an object with \"chosen\" and \"rejected\"")
    missing = [k for k in SIDES if record.get(k) is None]
    if missing:
        raise BadPair("missing field", f"missing field {', '.join(repr(m) for m in missing)} "
                                       f"(keys: {', '.join(record) or 'none'})")
    if "prompt" in record or "messages" in record:
        prompt = _prompt(record)
        convs = tuple(prompt + [_completion(record[s], s)] for s in SIDES)
    else:  # implicit prompt: two whole conversations sharing all but the last message
        if not all(isinstance(record[s], list) and record[s] for s in SIDES):
            raise BadPair("missing field", "missing field 'prompt' (chosen/rejected strings need a prompt; "
                                           "conversations need the whole chat in each)")
        try:
            convs = tuple(validate_messages(record[s], s) for s in SIDES)
        except ConfigError as e:
            raise BadPair("bad field", str(e)) from None
        if convs[0][:-1] != convs[1][:-1]:
            raise BadPair("bad field", "chosen and rejected conversations must share everything but their "
                                       "last message (the prompt)")
        for s, conv in zip(SIDES, convs):
            _completion([conv[-1]], s)
    if convs[0][-1]["content"] == convs[1][-1]["content"]:
        raise BadPair("chosen == rejected", "chosen and rejected are the same, so the pair prefers nothing")
    return convs


def encode_side(messages: list[dict[str, str]], template: ChatTemplate, tok: Tokenizer, max_len: int
                ) -> tuple[Example, bool]:
    """One side's tokens with only the completion trained, cut to `max_len + 1` tokens (prompt kept),
    and whether it was cut."""
    ex = encode_conversation(messages, template, tok, last_turn_only=True)
    prompt_len = ex.trained.index(True) if True in ex.trained else len(ex.ids)
    if prompt_len > max_len:
        raise BadPair("prompt longer than max_len",
                      f"the prompt is {prompt_len} tokens, longer than max_len={max_len}")
    if prompt_len == len(ex.ids):
        raise BadPair("empty completion", "the completion has no tokens")
    return Example(ex.ids[: max_len + 1], ex.trained[: max_len + 1]), len(ex.ids) > max_len + 1


class PreferencePairs(Dataset):
    """Item i -> {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"} (T_i,) each, "pair_id"."""

    def __init__(self, pairs: list[Pair], first_id: int = 0):
        self.pairs, self.first_id = pairs, first_id

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        out = {"pair_id": torch.tensor(self.first_id + i)}
        for side in SIDES:
            ex: Example = getattr(self.pairs[i], side)
            out[f"{side}_ids"] = torch.tensor(ex.ids[:-1])
            out[f"{side}_labels"] = torch.tensor([t if keep else IGNORE_INDEX
                                                  for t, keep in zip(ex.ids[1:], ex.trained[1:])])
        return out


class PreferenceCollate:
    """Right-pad chosen and rejected rows to one length T (the longest of the batch), with masks."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        t = max(len(it[f"{s}_ids"]) for it in items for s in SIDES)
        b = len(items)
        batch = {"pair_id": torch.stack([it["pair_id"] for it in items])}  # (B,)
        for s in SIDES:
            ids = torch.full((b, t), self.pad_id, dtype=torch.long)  # (B, T)
            labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)  # (B, T)
            mask = torch.zeros((b, t), dtype=torch.long)  # (B, T); 1 = real token
            for r, it in enumerate(items):
                n = len(it[f"{s}_ids"])
                ids[r, :n], labels[r, :n], mask[r, :n] = it[f"{s}_ids"], it[f"{s}_labels"], 1
            batch.update({f"{s}_input_ids": ids, f"{s}_labels": labels, f"{s}_attention_mask": mask})
        return batch


def read_records(path: Path) -> list[Any]:
    """The records of a preference file (JSONL objects or CSV/TSV rows with a header)."""
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot tell the format of {path} from its suffix; use .jsonl, .json, .csv or .tsv")
    rows, _ = read_rows(path, fmt, header=True)
    return rows


def build_preference(options: dict[str, Any], seed: int = 0) -> DataBundle:
    """Builder of the "preference" dataset (see the module docstring)."""
    cfg = from_dict(PreferenceConfig, options, prefix="data")
    if not cfg.path:
        raise ConfigError("data.path is required: a JSONL / CSV of {\"prompt\", \"chosen\", \"rejected\"} records")
    if cfg.max_len < 2:
        raise ConfigError(f"data.max_len must be >= 2, got {cfg.max_len}")
    tok = _tokenizer(cfg.tokenizer)
    template = ChatTemplate.for_tokenizer(Path(cfg.tokenizer).expanduser(), cfg.chat_template,
                                          {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                                           "pad_token": tok.pad_token})
    skipped: Counter[str] = Counter()
    truncated = [0]

    def pairs_of(path: Path) -> list[Pair]:
        out = []
        for n, record in enumerate(read_records(path), 1):
            try:
                (chosen, cut_c), (rejected, cut_r) = (encode_side(c, template, tok, cfg.max_len)
                                                      for c in pair_conversations(record))
            except BadPair as e:
                if cfg.on_bad == "error":
                    raise ConfigError(f"{path}: record {n}: {e}; fix or remove it, or set data.on_bad=skip "
                                      "to skip bad pairs") from None
                skipped[e.reason] += 1
                continue
            truncated[0] += cut_c or cut_r
            out.append(Pair(chosen, rejected))
        return out

    train_pairs = pairs_of(Path(cfg.path).expanduser())
    if cfg.val_path:
        val_pairs = pairs_of(Path(cfg.val_path).expanduser())
    else:
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
        g = torch.Generator().manual_seed(cfg.split_seed)
        order = torch.randperm(len(train_pairs), generator=g).tolist()
        k = min(round(len(train_pairs) * cfg.val_fraction), max(0, len(train_pairs) - 1))
        val_pairs = [train_pairs[i] for i in sorted(order[:k])]
        train_pairs = [train_pairs[i] for i in sorted(order[k:])]
    if skipped:
        warnings.warn(f"preference: skipped {sum(skipped.values())} bad pairs ("
                      + ", ".join(f"{r}: {c}" for r, c in sorted(skipped.items())) + ")", stacklevel=3)
    if truncated[0]:
        warnings.warn(f"preference: {truncated[0]} pairs had a completion cut to fit max_len={cfg.max_len} "
                      "(prompts are kept whole)", stacklevel=3)
    if not train_pairs:
        raise ConfigError(f"{cfg.path}: no usable preference pair (all were skipped as bad)")
    info = {"vocab_size": tok.vocab_size, "tokenizer": tok, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "seq_len": cfg.max_len, "chat_template": template.name, "n_train_pairs": len(train_pairs),
            "n_val_pairs": len(val_pairs), "n_truncated": truncated[0], "n_skipped": dict(skipped)}
    val = PreferencePairs(val_pairs, first_id=len(train_pairs)) if val_pairs else None
    return DataBundle(train=PreferencePairs(train_pairs), val=val, task="dpo",
                      collate_fn=PreferenceCollate(tok.pad_id), info=info,
                      files={f"tokenizer/{TEMPLATE_FILE}": template.source})


register_dataset("preference", build_preference)

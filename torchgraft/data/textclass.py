"""Labelled text for classification: CSV / TSV / JSONL rows of text (or text pairs) and a label.

    data: {name: textclass, path: reviews.csv, text_column: text, label_column: label,
           tokenizer: path/to/hf_model_dir, max_len: 128}

- Files: `.csv` (comma), `.tsv` / `.tab` (tab), `.jsonl` / `.json` (one object per line), or set
  `format:`. With `header: false` a CSV/TSV has no header row (and a JSONL holds arrays): name
  the columns by position (`text_column: 0, label_column: 1`).
- `text_pair_column:` a second text per row (sentence pairs, e.g. premise/hypothesis); the pair is
  encoded the way the tokenizer's post-processor says (BERT: `[CLS] a [SEP] b [SEP]`, token types
  0/1) and batches then carry `token_type_ids`.
- Labels are names (any strings) or integers. Classes are the labels of the training file, in the
  order of `labels:` when given, else sorted (numerically when every label is an integer); a
  validation label the training data lacks is an error. The names go to `labels.json` in the run
  directory.
- `tokenizer:` a `tokenizer.json` or a directory holding one (a Hugging Face model directory, a run
  directory). Its post-processor's special tokens are added (`[CLS]`/`[SEP]` for BERT); every
  example is truncated to `max_len` tokens (counted and reported); batches are padded to their
  longest example with the tokenizer's pad id.
- `val_path:` a separate validation file, else a seeded, stratified split by `val_fraction`.

Batches: {"input_ids": (B, T) long, "attention_mask": (B, T) long, "labels": (B,) long}
(+ "token_type_ids" (B, T) for pairs), for the "sequence_classification" task.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from torchgraft.config import from_dict
from torchgraft.data.registry import LABELS_FILE, DataBundle, register_dataset, register_encoder
from torchgraft.data.tokenizers import Tokenizer, load_tokenizer
from torchgraft.errors import ConfigError

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass
class TextClassConfig:
    """Options of the "textclass" dataset (`data:` section)."""
    path: str = ""                          # training file
    val_path: str | None = None             # validation file (else a split of `path`)
    text_column: str | int = "text"
    text_pair_column: str | int | None = None
    label_column: str | int = "label"
    header: bool = True                     # false: CSV/TSV without a header row, columns by position
    format: str | None = None               # csv | tsv | jsonl (default: from the file suffix)
    labels: list[str] | None = None         # class order (default: sorted training labels)
    tokenizer: str = ""                     # tokenizer.json, or a directory holding one
    max_len: int = 128                      # tokens per example, special tokens included
    val_fraction: float = 0.2
    split_seed: int = 0


# ---- reading ----------------------------------------------------------------------------------------
def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("csv", "tsv", "jsonl"):
            raise ConfigError(f"data.format must be csv, tsv or jsonl, got {fmt!r}")
        return fmt
    if path.suffix.lower() not in _FORMATS:
        raise ConfigError(f"cannot tell the format of {path} from its suffix; set data.format: csv, tsv or jsonl")
    return _FORMATS[path.suffix.lower()]


def read_rows(path: Path, fmt: str, header: bool) -> tuple[list[Any], list[str] | None]:
    """Rows (dicts with a header, else lists) and the column names (None without a header)."""
    if not path.is_file():
        raise ConfigError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise ConfigError(f"{path} is empty; it needs one example per row")
    if fmt == "jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{n} is not valid JSON (JSONL needs one object per line)") from None
            want = dict if header else list
            if not isinstance(rows[-1], want):
                raise ConfigError(f"{path}:{n} must be a JSON {'object' if header else 'array'} "
                                  f"({'header: false reads arrays' if not header else 'or set header: false for arrays'})")
        columns = sorted({k for r in rows for k in r}) if header else None
        return rows, columns
    reader = csv.reader(io.StringIO(text), delimiter="," if fmt == "csv" else "\t")
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))  # a long text is read whole, then truncated to max_len
    try:
        rows = [r for r in reader if any(c.strip() for c in r)]
    except csv.Error as e:
        raise ConfigError(f"{path}:{reader.line_num} is not valid {fmt.upper()} ({e}); fix that row or set "
                          "data.format") from None
    finally:
        csv.field_size_limit(limit)
    if not header:
        return rows, None
    columns, body = [c.strip() for c in rows[0]], rows[1:]
    if not body:
        raise ConfigError(f"{path} has a header row but no examples")
    return [dict(zip(columns, r)) for r in body], columns


def _cell(row: Any, column: str | int, path: Path, n: int, columns: list[str] | None) -> Any:
    if isinstance(row, dict):
        if column not in row:
            raise ConfigError(f"{path}: row {n} has no column {column!r}" +
                              (f" (columns: {', '.join(columns)})" if columns else ""))
        return row[column]
    if not isinstance(column, int):
        raise ConfigError(f"{path} is read without a header (header: false), so name columns by position, "
                          f"e.g. text_column: 0, label_column: 1 (got {column!r})")
    if not -len(row) <= column < len(row):
        raise ConfigError(f"{path}: row {n} has {len(row)} columns, no column {column}")
    return row[column]


def read_examples(path: Path, cfg: TextClassConfig) -> list[tuple[str, str | None, Any]]:
    """(text, text pair or None, raw label) for every row of `path`."""
    fmt = _format_of(path, cfg.format)
    rows, columns = read_rows(path, fmt, cfg.header)
    if not rows:
        raise ConfigError(f"{path} holds no examples")
    if columns is not None:
        for key in ("text_column", "text_pair_column", "label_column"):
            col = getattr(cfg, key)
            if col is not None and col not in columns:
                raise ConfigError(f"data.{key}={col!r} is not a column of {path} (columns: {', '.join(columns)})")
    out = []
    for n, row in enumerate(rows, 1):
        text = _cell(row, cfg.text_column, path, n, columns)
        pair = _cell(row, cfg.text_pair_column, path, n, columns) if cfg.text_pair_column is not None else None
        label = _cell(row, cfg.label_column, path, n, columns)
        if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
            raise ConfigError(f"{path}: row {n}: the text column must hold a string")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise ConfigError(f"{path}: row {n} has an empty label")
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise ConfigError(f"{path}: row {n}: a label must be a name or an integer, got {label!r}")
        out.append((text, pair, label.strip() if isinstance(label, str) else label))
    return out


def _as_int(v: Any) -> int | None:
    if isinstance(v, int):
        return v
    try:
        return int(v)
    except ValueError:
        return None


def label_names(raw: list[Any], given: list[str] | None) -> list[str]:
    """Class names in class-index order (`given`, else sorted; numeric order for integer labels)."""
    names = [str(v) for v in raw]
    if given is not None:
        given = [str(g) for g in given]
        if len(set(given)) != len(given):
            raise ConfigError(f"data.labels has duplicates: {given}")
        missing = sorted(set(names) - set(given))
        if missing:
            raise ConfigError(f"the training data has label(s) {missing[:5]} that data.labels does not list")
        return given
    distinct = sorted(set(names))
    ints = [_as_int(v) for v in distinct]
    if all(i is not None for i in ints):
        distinct = [str(i) for i in sorted(ints)]  # "2" < "10"
    return distinct


# ---- encoding ---------------------------------------------------------------------------------------
class TextEncoder:
    """Text (or pairs) -> token ids with the tokenizer's special tokens, truncated to `max_len`."""

    def __init__(self, tokenizer: Tokenizer, max_len: int):
        if max_len < 2:
            raise ConfigError(f"data.max_len must be >= 2, got {max_len}")
        self.tokenizer, self.max_len = tokenizer, max_len
        self.backend = tokenizer.backend
        self.backend.no_padding()
        self.backend.enable_truncation(max_len, strategy="longest_first")

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> tuple[list[Any], int]:
        """(encodings with `.ids` / `.type_ids`, number of truncated examples)."""
        batch = list(zip(texts, pairs)) if pairs is not None else list(texts)
        encs = self.backend.encode_batch(batch, add_special_tokens=True)
        return encs, sum(1 for e in encs if e.overflowing)


class TextClassDataset(Dataset):
    """Pre-tokenised examples; item i -> {"input_ids": (L,), "labels": (), ["token_type_ids": (L,)]}."""

    def __init__(self, encodings: list[Any], labels: list[int], pairs: bool):
        self.ids = [torch.tensor(e.ids, dtype=torch.long) for e in encodings]
        self.types = [torch.tensor(e.type_ids, dtype=torch.long) for e in encodings] if pairs else None
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.ids[i], "labels": self.labels[i]}
        if self.types is not None:
            item["token_type_ids"] = self.types[i]
        return item


class PadCollate:
    """Pad a list of items to the longest: input_ids with `pad_id`, attention_mask 1 on real tokens."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        t = max(len(it["input_ids"]) for it in items)
        b = len(items)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((b, t), dtype=torch.long)  # (B, T)
        types = torch.zeros((b, t), dtype=torch.long) if "token_type_ids" in items[0] else None
        for r, it in enumerate(items):
            n = len(it["input_ids"])
            ids[r, :n] = it["input_ids"]
            mask[r, :n] = 1
            if types is not None:
                types[r, :n] = it["token_type_ids"]
        out = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            out["token_type_ids"] = types
        if "labels" in items[0]:
            out["labels"] = torch.stack([it["labels"] for it in items])
        return out


def _split(n_labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified seeded split of example indices (per class round(n * fraction) to validation)."""
    by: dict[int, list[int]] = {}
    for i, y in enumerate(n_labels):
        by.setdefault(y, []).append(i)
    tr, va = [], []
    for y, idx in sorted(by.items()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + y)
        order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        k = min(round(len(idx) * fraction), len(idx) - 1)
        va += order[:k]
        tr += order[k:]
    return sorted(tr), sorted(va)


def _tokenizer(spec: str) -> Tokenizer:
    if not spec:
        raise ConfigError("data.tokenizer is required: a tokenizer.json or a directory holding one "
                          "(e.g. a Hugging Face model directory)")
    return load_tokenizer(Path(spec).expanduser())


def build_textclass(options: dict[str, Any], seed: int = 0) -> DataBundle:
    """Builder of the "textclass" dataset (see the module docstring)."""
    cfg = from_dict(TextClassConfig, options, prefix="data")
    if not cfg.path:
        raise ConfigError("data.path is required: a CSV, TSV or JSONL file of labelled text")
    tok = _tokenizer(cfg.tokenizer)
    enc = TextEncoder(tok, cfg.max_len)
    train_rows = read_examples(Path(cfg.path).expanduser(), cfg)
    names = label_names([r[2] for r in train_rows], cfg.labels)
    if len(names) < 2:
        raise ConfigError(f"{cfg.path}: classification needs at least 2 labels, found only {names}")
    index = {n: i for i, n in enumerate(names)}

    def ids_of(rows: list[tuple[str, str | None, Any]], where: str) -> list[int]:
        out = []
        for n, (_, _, label) in enumerate(rows, 1):
            key = str(label)
            if key not in index and _as_int(label) is not None:
                key = str(_as_int(label))  # "07" and 7 both name class "7"
            if key not in index:
                raise ConfigError(f"{where}: row {n} has label {label!r}, which the training data does not "
                                  f"have (labels: {', '.join(names[:10])}); fix the row or add training examples")
            out.append(index[key])
        return out

    train_labels = ids_of(train_rows, cfg.path)
    if cfg.val_path:
        val_rows = read_examples(Path(cfg.val_path).expanduser(), cfg)
        val_labels = ids_of(val_rows, cfg.val_path)
    else:
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
        tr, va = _split(train_labels, cfg.val_fraction, cfg.split_seed)
        val_rows, val_labels = [train_rows[i] for i in va], [train_labels[i] for i in va]
        train_rows, train_labels = [train_rows[i] for i in tr], [train_labels[i] for i in tr]
    pairs = cfg.text_pair_column is not None
    truncated = 0

    def dataset(rows: list[tuple[str, str | None, Any]], labels: list[int]) -> TextClassDataset | None:
        nonlocal truncated
        if not rows:
            return None
        encs, n_trunc = enc.encode([r[0] for r in rows], [r[1] or "" for r in rows] if pairs else None)
        truncated += n_trunc
        return TextClassDataset(encs, labels, pairs)

    empty = sum(1 for r in train_rows + val_rows if not r[0].strip() and not (r[1] or "").strip())
    if empty:
        warnings.warn(f"textclass: {empty} of {len(train_rows) + len(val_rows)} examples have an empty text; "
                      "they are kept (the model sees only special tokens for them): remove or fill those rows "
                      "if they are mistakes", stacklevel=3)
    train, val = dataset(train_rows, train_labels), dataset(val_rows, val_labels)
    if truncated:
        warnings.warn(f"textclass: {truncated} of {len(train_rows) + len(val_rows)} examples were longer "
                      f"than max_len={cfg.max_len} tokens and were truncated", stacklevel=3)
    info = {"num_classes": len(names), "num_labels": len(names), "labels": names,
            "vocab_size": tok.vocab_size, "tokenizer": tok, "pad_id": tok.pad_id, "max_len": cfg.max_len,
            "n_train": len(train), "n_val": len(val) if val is not None else 0, "n_truncated": truncated, "n_empty": empty,
            "pairs": pairs}
    return DataBundle(train=train, val=val, task={"name": "sequence_classification", "label_names": names},
                      collate_fn=PadCollate(tok.pad_id), info=info,
                      files={LABELS_FILE: json.dumps(names, indent=1) + "\n"})


def text_encoder(options: dict[str, Any], run_dir: Any):
    """For predict: strings (pairs as "first<TAB>second") -> a padded batch, tokenised with the run's
    saved tokenizer (`RUN_DIR/tokenizer/`) and `max_len`."""
    max_len = int(options.get("max_len", 128))
    saved = Path(run_dir) / "tokenizer"
    tok = load_tokenizer(saved) if (saved / "tokenizer.json").is_file() else _tokenizer(str(options.get("tokenizer", "")))
    enc = TextEncoder(tok, max_len)
    pairs = options.get("text_pair_column") is not None
    collate = PadCollate(tok.pad_id)

    def encode(inputs: list[str]) -> dict[str, torch.Tensor]:
        if pairs:
            split = [s.split("\t", 1) for s in inputs]
            bad = [s for s, p in zip(inputs, split) if len(p) != 2]
            if bad:
                raise ConfigError(f"this run classifies text pairs: give each input as 'first<TAB>second' "
                                  f"(got {bad[0]!r})")
            encs, _ = enc.encode([p[0] for p in split], [p[1] for p in split])
        else:
            encs, _ = enc.encode(list(inputs))
        ds = TextClassDataset(encs, [0] * len(encs), pairs)
        batch = collate([ds[i] for i in range(len(ds))])
        batch.pop("labels")
        return batch

    return encode


register_dataset("textclass", build_textclass)
register_encoder("textclass", text_encoder, task="sequence_classification")

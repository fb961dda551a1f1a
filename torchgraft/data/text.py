"""Text data for language modelling: sources -> tokenized shards on disk -> packed windows.

Pipeline (registered as the dataset "text"):
1. documents come from a source: `builtin` (Python's `pydoc_data.topics`, ~465k chars of English
   about Python), a text file (one document), a JSONL file (one document per line, the `field`
   key), or a directory of such files (sorted, recursive);
2. each document is tokenized and followed by eos; the token stream is written once into numpy
   shards (`uint16` when the vocabulary fits, else `uint32`) under a cache directory keyed by the
   source (paths, sizes, mtimes), the field and the tokenizer, with a progress bar; later runs
   memory-map the same shards;
3. the stream (or its first `max_tokens` tokens) is split deterministically: the last
   `val_fraction` of tokens is validation;
4. `PackedWindows` cuts each part into fixed windows of `seq_len + 1` tokens (map-style, so a
   sampler's index order alone fixes the batches, which keeps exact resume exact).

Batches: {"input_ids": (B, T) long, "labels": (B, T) long} with `labels[t] = input_ids[t + 1]`
(already shifted: the loss is a plain cross-entropy of logits (B, T, V) against labels).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from torchgraft.config import from_dict
from torchgraft.data.registry import DataBundle, register_dataset
from torchgraft.data.sources import builtin_documents, iter_documents, source_key  # noqa: F401  (re-exported)
from torchgraft.data.tokenizers import Tokenizer, byte_tokenizer, char_tokenizer, load_tokenizer, train_bpe
from torchgraft.errors import ConfigError
from torchgraft.io import publish_dir

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """`$TORCHGRAFT_CACHE/text`, else `~/.cache/torchgraft/text`."""
    root = os.environ.get("TORCHGRAFT_CACHE") or Path.home() / ".cache" / "torchgraft"
    return Path(root) / "text"


# ---- tokenizer resolution -------------------------------------------------------------------------
def resolve_tokenizer(spec: str, source: str = "builtin", field: str = "text", vocab_size: int = 4096,
                      cache_dir: str | Path | None = None) -> tuple[Tokenizer, Path]:
    """`char` (alphabet of the source), `byte` (256 bytes), `bpe` (byte-level BPE trained on the
    source with `vocab_size` ids, cached) or a path to a tokenizer.json / a directory holding one.
    Returns the tokenizer and the path of its saved tokenizer.json."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if spec in ("char", "byte", "bpe"):
        key = {"char": f"char-{source_key(source, field)}", "byte": "byte",
               "bpe": f"bpe{vocab_size}-{source_key(source, field)}"}[spec]
        d = cache / "tokenizers" / key
        if (d / "tokenizer.json").is_file():
            return load_tokenizer(d), d / "tokenizer.json"
        if spec == "char":
            tok = char_tokenizer(iter_documents(source, field))
        elif spec == "byte":
            tok = byte_tokenizer()
        else:
            tok = train_bpe(iter_documents(source, field), vocab_size)
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        tok.save(tmp)
        publish_dir(tmp, d, replace=False)
        return load_tokenizer(d), d / "tokenizer.json"
    p = Path(spec).expanduser()
    if not p.exists():
        raise ConfigError(f"unknown tokenizer {spec!r}: use char, byte, bpe or a path to a "
                          "tokenizer.json (or a directory holding one)")
    tok = load_tokenizer(p)
    return tok, (p / "tokenizer.json" if p.is_dir() else p)


# ---- shards ---------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def _progress(enabled: bool):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("tokenizing {task.fields[name]}"),
                    TextColumn("{task.completed} documents, {task.fields[tokens]:,} tokens"),
                    TimeElapsedColumn(), disable=not enabled, transient=False,
                    console=_stderr_console())


def _stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr)


def build_shards(source: str, field: str, tokenizer: Tokenizer, cache_dir: str | Path | None = None,
                 shard_tokens: int = 1 << 26, progress: bool = True, batch_docs: int = 256) -> Path:
    """Tokenize `source` once into shards `cache_dir/<key>/shard_XXXXX.bin` (+ meta.json) and return
    that directory; an existing complete directory for the same key is reused as is."""
    if tokenizer.eos_id is None:
        raise ConfigError("the tokenizer has no eos token, which separates documents; use one "
                          "with an eos (char, byte and bpe tokenizers have <|endoftext|>)")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, source_key(source, field), field,
                                     tokenizer.fingerprint()]).encode()).hexdigest()[:20]
    final = cache / "shards" / key
    if (final / "meta.json").is_file():
        return final
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict[str, Any]] = []
    n_docs = n_tokens = 0
    out, in_shard = None, 0

    def flush_ids(ids: np.ndarray) -> None:
        nonlocal out, in_shard
        while ids.size:
            if out is None:
                shards.append({"file": f"shard_{len(shards):05d}.bin", "tokens": 0})
                out, in_shard = (tmp / shards[-1]["file"]).open("wb"), 0
            take = min(ids.size, shard_tokens - in_shard)
            out.write(ids[:take].tobytes())
            in_shard += take
            shards[-1]["tokens"] = in_shard
            ids = ids[take:]
            if in_shard == shard_tokens:
                out.close()
                out = None

    name = "built-in corpus" if source == "builtin" else str(source)
    with _progress(progress) as bar:
        task = bar.add_task("tok", total=None, name=name, tokens=0)
        batch: list[str] = []
        docs = iter_documents(source, field)
        while True:
            batch.clear()
            for doc in docs:
                batch.append(doc)
                if len(batch) == batch_docs:
                    break
            if not batch:
                break
            encoded = tokenizer.encode_batch(batch, add_eos=True)
            ids = np.fromiter((i for seq in encoded for i in seq), dtype=np.int64)
            flush_ids(ids.astype(dtype))
            n_docs += len(batch)
            n_tokens += int(ids.size)
            bar.update(task, advance=len(batch), tokens=n_tokens)
    if out is not None:
        out.close()
    if n_tokens == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"text source {source!r} holds no text")
    meta = {"format_version": FORMAT_VERSION, "source": source, "field": field,
            "tokenizer_fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name, "n_documents": n_docs, "n_tokens": n_tokens, "shards": shards}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    tokenizer.save(tmp)
    publish_dir(tmp, final, replace=False)
    return final


class TokenStream:
    """The concatenated shards of a shard directory, memory-mapped lazily (so it pickles cheaply
    into DataLoader workers). `stream[a:b]` -> np.ndarray of ids."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(f"{self.directory} is not a token shard directory (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        sizes = [s["tokens"] for s in self.meta["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _open(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(self.directory / s["file"], dtype=self.dtype, mode="r")
                          for s in self.meta["shards"]]
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(len(self))
        maps = self._open()
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        i, pos = first, start
        while pos < stop:
            lo = pos - int(self.offsets[i])
            hi = min(stop, int(self.offsets[i + 1])) - int(self.offsets[i])
            parts.append(maps[i][lo:hi])
            pos = int(self.offsets[i]) + hi
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class PackedWindows(Dataset):
    """Fixed windows of `seq_len + 1` tokens from `stream[start:end]`, every `stride` tokens.

    Item `i` -> {"input_ids": (T,), "labels": (T,)} with labels shifted by one. Deterministic:
    the same index always gives the same window.
    """

    def __init__(self, stream: TokenStream, start: int, end: int, seq_len: int, stride: int | None = None):
        self.stream, self.start, self.end = stream, start, end
        self.seq_len = seq_len
        self.stride = stride or seq_len
        span = end - start
        self.n = 0 if span < seq_len + 1 else (span - seq_len - 1) // self.stride + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"window {i} out of range ({self.n} windows)")
        i %= self.n
        a = self.start + i * self.stride
        w = torch.from_numpy(self.stream[a:a + self.seq_len + 1].astype(np.int64))  # (T + 1,)
        return {"input_ids": w[:-1], "labels": w[1:]}

    def get_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Windows `indices` stacked: {"input_ids": (B, T), "labels": (B, T)} (the loader's fast path)."""
        rows = [self[int(i)] for i in indices]
        return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}


def collate_lm(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length windows into (B, T) tensors."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# ---- the registered dataset -----------------------------------------------------------------------
@dataclass
class TextDataConfig:
    """Options of the "text" dataset (`data:` section of a run config)."""
    source: str = "builtin"          # builtin | path to .txt / .jsonl / directory
    field: str = "text"              # JSONL key holding the document text
    tokenizer: str = "char"          # char | byte | bpe | path to tokenizer.json or its directory
    vocab_size: int = 4096           # only for tokenizer: bpe
    seq_len: int = 256               # tokens per training window
    stride: int | None = None        # train window step (default seq_len; smaller = overlapping)
    val_fraction: float = 0.1        # last fraction of the token stream held out
    max_tokens: int | None = None    # use only the first N tokens of the stream (quick experiments)
    cache_dir: str | None = None     # default $TORCHGRAFT_CACHE/text or ~/.cache/torchgraft/text
    shard_tokens: int = 1 << 26      # tokens per shard file
    progress: bool = True            # progress bar while tokenizing


def build_text(options: dict[str, Any], seed: int = 0) -> DataBundle:
    """Builder of the "text" dataset. `info` carries `vocab_size`, `tokenizer` (the object),
    `tokenizer_path` (its tokenizer.json, to be copied into run dirs), `seq_len`, token counts."""
    cfg = from_dict(TextDataConfig, options, prefix="data")
    if cfg.seq_len < 1:
        raise ConfigError(f"data.seq_len must be >= 1, got {cfg.seq_len}")
    if cfg.stride is not None and cfg.stride < 1:
        raise ConfigError(f"data.stride must be >= 1, got {cfg.stride}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise ConfigError(f"data.max_tokens must be >= 1 (or null for all), got {cfg.max_tokens}")
    tok, _ = resolve_tokenizer(cfg.tokenizer, cfg.source, cfg.field, cfg.vocab_size, cfg.cache_dir)
    shard_dir = build_shards(cfg.source, cfg.field, tok, cfg.cache_dir, cfg.shard_tokens, cfg.progress)
    stream = TokenStream(shard_dir)
    n = len(stream) if cfg.max_tokens is None else min(len(stream), cfg.max_tokens)  # shards stay whole
    n_val = int(round(n * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    if n_val:
        n_val = max(n_val, cfg.seq_len + 1)
    n_train = n - n_val
    train = PackedWindows(stream, 0, n_train, cfg.seq_len, cfg.stride)
    val = PackedWindows(stream, n_train, n, cfg.seq_len) if n_val else None
    if len(train) == 0:
        split = (f" and the validation split takes {n_val} of them (val_fraction={cfg.val_fraction}, at "
                 "least seq_len + 1)") if n_val else ""
        raise ConfigError(f"the text has {n} tokens{split}, leaving {max(n_train, 0)} for training, fewer "
                          f"than seq_len + 1 = {cfg.seq_len + 1}; lower data.seq_len, raise data.max_tokens "
                          "or add text")
    info = {"vocab_size": tok.vocab_size, "tokenizer": tok,
            "tokenizer_path": str(shard_dir / "tokenizer.json"), "seq_len": cfg.seq_len,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id, "n_train_tokens": n_train,
            "n_val_tokens": n_val, "shard_dir": str(shard_dir)}
    return DataBundle(train=train, val=val, task="lm", collate_fn=None, info=info)


register_dataset("text", build_text)

"""Document sources for text data: the built-in corpus, text / JSONL files, directories of them.

Below both `data.tokenizers` (which trains BPE on documents) and `data.text` (which tokenizes them
into shards), so neither has to import the other to read text.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from torchgraft.errors import ConfigError

_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".py", ".jsonl", ".json", ".csv", ".tex", ".html"}


def builtin_documents() -> list[str]:
    """The built-in corpus: the help texts of Python's `pydoc_data.topics`, sorted by topic."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _source_files(source: str) -> list[Path]:
    p = Path(source).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(p).parts) and f.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"no text files ({', '.join(sorted(_TEXT_SUFFIXES))}) found under {p}")
        return files
    raise ConfigError(f"text source not found: {source!r} (give a file, a directory or 'builtin')")


def _iter_file(path: Path, field: str) -> Iterator[str]:
    if path.suffix.lower() in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(f"{path}:{lineno} is not valid JSON (JSONL needs one object "
                                      "per line)") from None
                if not isinstance(row, dict) or field not in row:
                    keys = list(row) if isinstance(row, dict) else []
                    raise ConfigError(f"{path}:{lineno} has no field {field!r} (keys: {keys}); set "
                                      "the data option `field:`")
                value = row[field]
                if not isinstance(value, str):
                    raise ConfigError(f"{path}:{lineno}: field {field!r} must be a string")
                if value:
                    yield value
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text") from None
        if text:
            yield text


def iter_documents(source: str = "builtin", field: str = "text") -> Iterator[str]:
    """Yield the documents of `source` ('builtin', a .txt/.jsonl file or a directory)."""
    if source == "builtin":
        yield from builtin_documents()
        return
    for path in _source_files(source):
        yield from _iter_file(path, field)


def source_key(source: str, field: str) -> str:
    """What identifies a source's content for caching: file paths, sizes and mtimes (cheap) or, for
    the built-in corpus, a hash of its text."""
    h = hashlib.sha256()
    if source == "builtin":
        h.update(b"builtin")
        for doc in builtin_documents():
            h.update(doc.encode())
    else:
        for p in _source_files(source):
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(field.encode())
    return h.hexdigest()[:16]

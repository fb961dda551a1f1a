"""Output directories that never lose user files.

Commands that write a directory (`convert`, `export`, `tokenizer train`) go through `staged_dir`:
- the destination is checked first: a file, a path under a file, or a non-empty directory is refused
  with one line (a non-empty directory is only replaced when the user passes `--overwrite`);
- everything is written into a hidden sibling folder, which is renamed into place only when complete,
  so a failure (or a crash) leaves what was there untouched and nothing half-written;
- with `--overwrite` the old directory is moved aside, the new one renamed in, then the old one deleted:
  the destination never holds a mix of old and new files.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torchgraft.errors import ConfigError
from torchgraft.io import publish_dir


def _check_parents(p: Path, what: str, kind: str) -> None:
    """The nearest existing folder above `p` is a folder (not a file) and writable."""
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {p} lies under {parent}, which is a file; give a {kind} path")
            if not os.access(parent, os.W_OK | os.X_OK) and not p.exists():
                raise ConfigError(f"{what} {p}: cannot create it, {parent} is not writable")
            break


def check_output_dir(path: str | Path, *, overwrite: bool = False, option: str = "--overwrite",
                     what: str = "output directory") -> Path:
    """Refuse a destination that is a file, lies under a file, or is a non-empty directory (unless
    `overwrite`). Returns the path. Creates nothing."""
    p = Path(path)
    if p.is_file() or (p.exists() and not p.is_dir()):
        raise ConfigError(f"{what} {p} is an existing file; give a directory path")
    _check_parents(p, what, "directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        n = sum(1 for _ in p.iterdir())
        raise ConfigError(f"{what} {p} is not empty ({n} entries); nothing was written. Choose a new or "
                          f"empty directory, or pass {option} to replace it")
    return p


def check_output_file(path: str | Path, *, overwrite: bool = False, suffixes: tuple[str, ...] = (),
                      kind: str = "", option: str = "--overwrite", what: str = "--out") -> Path:
    """The one check of a file a command will write, done before any work: not a directory, not under
    a file, in a writable folder, ending in one of `suffixes` (what `kind` writes), and
    not an existing file unless `overwrite`. Returns the path; creates nothing."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory; give a file path"
                          + (f" such as {p / ('out' + suffixes[0])}" if suffixes else ""))
    if suffixes and p.suffix.lower() not in suffixes:
        raise ConfigError(f"{what} {p}: {kind or 'this command'} writes a {' or '.join(suffixes)} file, not "
                          f"{p.suffix or '(no extension)'!r}; give a path ending in {suffixes[0]}")
    _check_parents(p, what, "file")
    if p.exists() and not overwrite:
        raise ConfigError(f"{what} {p} already exists; nothing was written. Choose another path, or pass "
                          f"{option} to replace it")
    return p


def check_input_file(path: str | Path, what: str, hint: str = "") -> Path:
    """The one check of a file a command reads: it exists and is a readable file (not a folder)."""
    p = Path(path)
    tail = f" ({hint})" if hint else ""
    if not p.exists():
        raise ConfigError(f"{what} {p} not found{tail}")
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory; give a file{tail}")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{what} {p} is not readable (check its permissions)")
    return p


def read_input_text(path: str | Path, what: str, hint: str = "", encoding: str = "utf-8") -> str:
    """The text of a file a command reads, through `check_input_file`: a missing file, a folder, an
    unreadable or a binary (not `encoding`) file is one ConfigError naming `what` and the path."""
    p = check_input_file(path, what, hint)
    try:
        return p.read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p} is not {encoding.upper().removesuffix('-SIG')} text"
                          + (f" ({hint})" if hint else "")) from None
    except OSError as e:
        raise ConfigError(f"{what} {p} cannot be read ({e.strerror or e})") from None


def read_input_json(path: str | Path, what: str, hint: str = "") -> Any:
    """The parsed JSON of a file a command reads (`read_input_text`); invalid JSON is one line
    naming the file, the line and the parser's reason."""
    import json

    text = read_input_text(path, what, hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno})"
                          + (f"; {hint}" if hint else "")) from None


def staging_name(final: Path) -> str:
    """The prefix of a staging folder beside `final`, owned by this process (`.NAME.PID.`)."""
    return f".{final.name}.{os.getpid()}."


def clean_stale_staging(final: str | Path) -> list[Path]:
    """Remove staging folders of `final` left by killed processes (`.NAME.PID.xxxx` whose PID is gone);
    a live writer's folder is left alone. Returns what was removed."""
    import re

    from torchgraft.io import pid_alive

    final = Path(final)
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(\d+)\.[\w-]+$")
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def staged_dir(path: str | Path, *, overwrite: bool = False, option: str = "--overwrite",
               what: str = "output directory") -> Iterator[Path]:
    """Yield a fresh hidden sibling folder to write into; on success it replaces `path` atomically.

    On an exception the staging folder is removed and `path` is left exactly as it was.
    """
    final = check_output_dir(path, overwrite=overwrite, option=option, what=what)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, final)  # an existing (empty, or --overwrite) DST is moved aside, then removed
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

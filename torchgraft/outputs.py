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

from torchgraft.errors import ConfigError
from torchgraft.io import publish_dir


def check_output_dir(path: str | Path, *, overwrite: bool = False, option: str = "--overwrite",
                     what: str = "output directory") -> Path:
    """Refuse a destination that is a file, lies under a file, or is a non-empty directory (unless
    `overwrite`). Returns the path. Creates nothing."""
    p = Path(path)
    if p.is_file() or (p.exists() and not p.is_dir()):
        raise ConfigError(f"{what} {p} is an existing file; give a directory path")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {p} lies under {parent}, which is a file; give a directory path")
            if not os.access(parent, os.W_OK | os.X_OK) and not p.exists():
                raise ConfigError(f"{what} {p}: cannot create it, {parent} is not writable")
            break
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        n = sum(1 for _ in p.iterdir())
        raise ConfigError(f"{what} {p} is not empty ({n} entries); nothing was written. Choose a new or "
                          f"empty directory, or pass {option} to replace it")
    return p


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

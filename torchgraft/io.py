"""Files that are never half-written: the one atomic-write helper of torchgraft, and step folder names.

Everything that must survive a crash (checkpoints, metrics logs being truncated, tokenizer caches,
exported weights, adapter files) goes through here: write to a temporary name next to the target,
fsync it, rename it into place, then fsync the parent folder so the rename itself is durable.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint of optimizer step `step` (`step_00000100`)."""
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name (`step_00000100` -> 100), None for any other name."""
    m = STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def fsync_dir(path: str | Path) -> None:
    """Make renames/creations inside folder `path` durable (a no-op where folders cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def write_synced(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (for files inside a temporary folder published later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` produce the file at a temporary path, then fsync it and rename it to `path`.
    A failure leaves `path` as it was (the temporary file is removed)."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temp file + fsync + rename."""
    return atomic_write_file(path, lambda tmp: write_synced(tmp, data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a temp file + fsync + rename."""
    return atomic_write_bytes(path, text.encode())


def publish_dir(tmp: str | Path, final: str | Path, *, replace: bool = True) -> bool:
    """Atomically make the fully written folder `tmp` visible as `final` (fsync, then rename).

    `replace=True`: an existing `final` is moved aside first and removed after (re-saving the same
    step). `replace=False`: if `final` appears meanwhile (another process won the race with the
    same content), `tmp` is discarded. Returns True when `tmp` became `final`."""
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and replace:
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            os.replace(tmp, final)
        except OSError:  # `final` exists (a non-empty folder): someone else published it first
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    fsync_dir(final.parent)
    return True


def remove_dir(path: str | Path) -> None:
    """Delete a folder so that no half-deleted folder keeps its name (rename aside, then remove)."""
    path = Path(path)
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_verified(path: str | Path) -> dict[str, bytes]:
    """Read every file of a checkpoint folder and check it against its manifest.json (sha256 and size);
    CheckpointError if not. Every reader of a torchgraft checkpoint goes through this function
    (resume, load_model, eval, generate, convert, export, transfer / finetune.source, init_from)."""
    import hashlib
    import json

    from torchgraft.errors import CheckpointError

    path = Path(path)
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        manifest = json.loads(mpath.read_bytes())
        entries = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no manifest.json (incomplete write?)") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} has an unreadable manifest.json") from None
    out = {}
    for name, info in entries.items():
        fpath = path / name
        try:
            data = fpath.read_bytes()
        except OSError:
            raise CheckpointError(f"checkpoint {path} is missing {name}") from None
        if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupted (sha256 mismatch)")
        out[name] = data
    return out

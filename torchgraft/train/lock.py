"""One writer per run directory: `<run>/.lock` holds the pid and host of the process training there.

The lock is an exclusive `flock` on that file, held for the whole run, plus the holder's pid/host
written inside for the message. A second `train` (or a `--resume` started while the run goes on) is
refused with one line. A lock left by a killed process is stale: the kernel released its flock, so
the next run takes it over (and says so). On filesystems without flock the pid is checked instead.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from torchgraft.errors import ConfigError
from torchgraft.io import pid_alive as _pid_alive

LOCK_NAME = ".lock"


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}




class RunLock:
    """`with RunLock(run_dir): ...` - refuse a second writer; release on exit (also on errors)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def _refuse(self, holder: dict[str, Any]) -> None:
        since = holder.get("started")
        when = time.strftime(" since %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
        raise ConfigError(f"run directory {self.path.parent} is in use by pid {holder.get('pid', '?')} on "
                          f"{holder.get('host', '?')}{when}; wait for it to finish, or choose another --out "
                          f"(if that process is gone, delete {self.path})")

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for _ in range(10):  # retried when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(_read(self.path))
            except OSError:  # no flock on this filesystem: fall back to the pid written inside
                holder = _read(self.path)
                pid = holder.get("pid")
                if isinstance(pid, int) and pid != os.getpid() and holder.get("host") == host and _pid_alive(pid):
                    os.close(fd)
                    self._refuse(holder)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = _read(self.path)
            if old.get("pid") and old.get("pid") != os.getpid():
                warnings.warn(f"took over a stale lock of pid {old.get('pid')} on {old.get('host')} "
                              f"({self.path}); that process is no longer running", stacklevel=2)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": host, "started": time.time()}).encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise ConfigError(f"could not lock {self.path}: it keeps being replaced by another process")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# what a torchgraft run directory (trainer, fine-tune recipe, quickstart) may already hold
RUN_FILES = {"config.yaml", "metrics.jsonl", "checkpoints", "result.json", "tokenizer", "transfer.json",
             "finetune.json", "adapter", "merged", LOCK_NAME, "tensorboard", "curves.png"}


def check_run_dir(run_dir: str | Path) -> None:
    """`--out` must be a directory (or creatable); a folder holding someone's files (and no run files)
    is never trained into."""
    from torchgraft.outputs import check_output_dir

    p = Path(run_dir)
    check_output_dir(p, overwrite=True, what="--out")  # a file, or under a file, or not writable
    if p.is_dir():
        entries = [e.name for e in p.iterdir()]
        # someone's own files at the top level (sub-folders such as a data cache are fine)
        foreign = [e.name for e in p.iterdir() if e.is_file() and e.name not in RUN_FILES
                   and not e.name.startswith(("events.", "."))]
        if foreign and not any(n in RUN_FILES for n in entries):
            raise ConfigError(f"--out {p} is not empty and is not a torchgraft run directory (it holds "
                              f"{', '.join(sorted(foreign)[:3])}{' ...' if len(foreign) > 3 else ''}); "
                              "choose a new or empty directory")

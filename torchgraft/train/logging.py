"""Run logging: metrics.jsonl (one JSON object per logged step), TensorBoard events, a rich progress bar.

`MetricsLogger(enabled=False)` turns everything into no-ops (non-zero ranks in a distributed run).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from torchgraft.io import atomic_write_text


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if resume_step is not None:
            self.truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old directory starts a fresh log
        self._file = open(self.path, "a")
        if tensorboard:
            self._tb = TBWriter(Path(run_dir) / "tb", purge_step=None if resume_step is None else resume_step + 1)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written by a run that was killed before its next checkpoint)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                continue  # a line cut short by a crash
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.scalars(record["step"], {
                (f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"): v for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class TBWriter:
    """Minimal synchronous TensorBoard event-file writer (scalars only).

    `torch.utils.tensorboard.SummaryWriter` hands every scalar to a background thread; on small
    models that GIL hand-off costs more than the training step itself. This writes one event per
    logged step directly; `purge_step` makes TensorBoard drop stale events of a resumed run.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        import socket

        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._Event, self._Summary = Event, Summary
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self._file = open(log_dir / name, "ab")
        self._writer = RecordWriter(self._file)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(Event(wall_time=time.time(), step=purge_step,
                              session_log=SessionLog(status=SessionLog.START)))
        self._file.flush()

    def _write(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = self._Summary(value=[self._Summary.Value(tag=k, simple_value=float(v))
                                       for k, v in values.items()])
        self._write(self._Event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self._file.flush()
        self._file.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (unreadable lines skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class ProgressBar:
    """A rich progress bar with step, loss, lr, throughput and ETA; silent when disabled."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, unit: str = "samples"):
        self.enabled, self.unit = enabled, unit
        self._progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                  transient=False)
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, record: dict[str, Any]) -> None:
        if self._progress is None:
            return
        rate = record.get(f"{self.unit}_per_s")
        info = f"loss {record.get('loss', float('nan')):.4f}  lr {record.get('lr', 0):.2e}"
        if rate:
            info += f"  {rate:,.0f} {self.unit}/s"
        self._progress.update(self._task, completed=step, info=info)

    def print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt

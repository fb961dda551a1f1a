"""`CheckpointManager`: the one writer and the one resumer of a run's checkpoints.

Shaped after torchtitan's CheckpointManager: a run hands it its stateful parts once,

    manager = CheckpointManager(run / "checkpoints", states={"model": model, "optimizer": opt,
                                "loader": loader, "rng": RNGState(), "state": counters},
                                layout=engine.checkpoint_layout(), every=100, keep_last=2)
    manager.save(step, last=final)      # writes when due (cadence), then rotates (last K + best)
    manager.load()                      # newest good checkpoint back into every part (or None)

and each part owns its entry through `state_dict()` / `load_state_dict()`. The engine supplies only
the layout of the `model` and `optimizer` entries (`torchgraft.checkpoint.layout`: single file, or
DCP shards); every other entry is stored here, in the format of `torchgraft.checkpoint.files`:
its JSON values under its name in `trainer_state.json`, its top-level tensors (e.g. the torch
generator states of `rng`) in `<name>.safetensors`, never in JSON.

Writes are atomic (temporary folder, fsync, sha256 manifest, rename); loading verifies the manifest
and falls back to the previous good checkpoint with a `CheckpointFallbackWarning`; nothing is
unpickled.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save as st_save

from torchgraft.checkpoint.files import (LoadedCheckpoint, capture_rng, json_bytes, list_checkpoints,
                                         newest_verified, read_checkpoint, restore_rng, write_checkpoint_dir)
from torchgraft.checkpoint.layout import Collectives, Layout, SingleFileLayout
from torchgraft.errors import CheckpointError
from torchgraft.io import atomic_write_bytes, remove_dir, step_dir_name

LAYOUT_ENTRIES = ("model", "optimizer")  # stored by the layout; every other entry by the manager


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RNGState:
    """The process's random generators as one checkpoint entry: python and numpy states (JSON), torch
    CPU and CUDA generator states (tensors, so they land in `rng.safetensors`)."""

    def state_dict(self) -> dict[str, Any]:
        js, tensors = capture_rng()
        return {**js, **tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state, {k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


def split_entry(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part, top-level tensors) of an entry's state_dict."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {k: v for k, v in state.items() if k not in tensors}, tensors


class CheckpointManager:
    """Saves step checkpoints of `states` under `root` in `layout`, on a cadence, keeping the last
    `keep_last` plus the best; loads the newest good one back.

    `every`: save when `step % every == 0` (0: only `last` and new bests); `save_best`: also save on a
    new best; `meta()`: the descriptive meta.json of a checkpoint (model, config, metrics; `step` is
    added); `upgrade(ck)`: the entries of a checkpoint written in an older arrangement of
    trainer_state.json (a format migration; None when it is not one). With no `states` it only
    lists, verifies and rotates (`mark_best`, `prune`)."""

    def __init__(self, root: str | Path, states: Mapping[str, Stateful] | None = None,
                 layout: Layout | None = None, *, every: int = 0, keep_last: int = 2, save_best: bool = False,
                 meta: Callable[[], dict[str, Any]] | None = None,
                 upgrade: Callable[[LoadedCheckpoint], dict[str, Any] | None] | None = None):
        self.root = Path(root)
        self.states = dict(states or {})
        self.layout = layout if layout is not None else SingleFileLayout()
        self.every, self.keep_last, self.save_best = every, keep_last, save_best
        self.meta = meta if meta is not None else dict
        self.upgrade = upgrade
        self.last_saved = -1

    @property
    def comm(self) -> Collectives:
        """The processes' collectives, from the layout."""
        return self.layout.comm

    def path_for(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    # ---- writing
    def due(self, step: int, last: bool = False, improved: bool = False) -> bool:
        """Whether `save` writes at `step`: the cadence, the last step, or a new best (`save_best`)."""
        return (bool(self.every) and step % self.every == 0) or last or (improved and self.save_best)

    def save(self, step: int, last: bool = False, *, best: tuple[str, float] | None = None,
             force: bool = False) -> Path | None:
        """Write checkpoint `step` when due (or `force`), then rotate; None when not due.
        `best=(metric, value)`: the step is a new best (saved when `save_best`, and marked in best.json).
        Every process calls it; only the main one writes files."""
        if not (force or self.due(step, last, best is not None)):
            return None
        main, path = self.comm.is_main, self.path_for(step)
        files, write_shards = self.layout.files(self.states.get("model"), self.states.get("optimizer"))
        if main:
            self.clean_temp()
            files.update(self._entry_files())
            meta = {**self.meta(), "step": step, **({"sharded": True} if write_shards is not None else {})}
            files["meta.json"] = json_bytes(meta)
        write_checkpoint_dir(path, files, write_shards=write_shards, main=main, barrier=self.comm.barrier)
        if main:
            if best is not None:
                self.mark_best(step, *best)
            self.prune()
        self.comm.barrier()
        self.last_saved = step
        return path

    def _entry_files(self) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        js: dict[str, Any] = {}
        for name, part in self.states.items():
            if name in LAYOUT_ENTRIES:
                continue
            js[name], tensors = split_entry(part.state_dict())
            if tensors:
                files[f"{name}.safetensors"] = st_save(tensors)
        if js:
            files["trainer_state.json"] = json_bytes(js)
        return files

    # ---- reading
    def newest_verified(self) -> Path | None:
        """The newest checkpoint whose manifest verifies (falling back with a warning), None if none."""
        ckpts = list_checkpoints(self.root)
        return newest_verified(ckpts, self.root) if ckpts else None

    def peek(self, name: str = "meta.json") -> dict[str, Any] | None:
        """A JSON file of the newest checkpoint, unverified (to decide before loading, e.g. which
        engine or config the run had); None when there is none or it is unreadable."""
        ckpts = list_checkpoints(self.root)
        try:
            return json.loads((ckpts[-1] / name).read_text()) if ckpts else None
        except (OSError, ValueError):
            return None

    def load(self, step: int | None = None) -> LoadedCheckpoint | None:
        """Load the newest good checkpoint (or that of `step`, no fallback) into every state; return
        it (for its meta), or None when there is none. Every process calls it."""
        comm = self.comm
        if comm.is_main:
            self.clean_temp()
        comm.barrier()
        ck = None
        if comm.is_main:
            if step is not None:
                ck = read_checkpoint(self.path_for(step))
            elif list_checkpoints(self.root):
                ck = newest_verified(list_checkpoints(self.root), self.root, parse=True)
        chosen = comm.broadcast(str(ck.path) if ck is not None else "")
        if not chosen:
            return None
        if ck is None:
            ck = read_checkpoint(chosen)
        self._load_into_states(ck)
        self.last_saved = int(ck.meta.get("step", -1))
        return ck

    def _load_into_states(self, ck: LoadedCheckpoint) -> None:
        own = [n for n in self.states if n not in LAYOUT_ENTRIES]
        ts = ck.trainer_state or {}
        if self.upgrade is not None and ts and any(n not in ts for n in own):
            ts = self.upgrade(ck) or ts
        missing = [n for n in own if n not in ts]
        if own and missing:
            what = "weights only" if not ts else f"no {', '.join(missing)} state"
            raise CheckpointError(f"{ck.path} holds {what}; it cannot resume a run")
        self.layout.load(ck, self.states.get("model"), self.states.get("optimizer"))
        for name in own:
            entry = ts[name]
            tensors = ck.entry_tensors.get(name, {})
            self.states[name].load_state_dict({**entry, **tensors} if isinstance(entry, dict) else entry)

    # ---- rotation
    def mark_best(self, step: int, metric: str, value: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / "best.json", json_bytes(
            {"name": step_dir_name(step), "step": step, "metric": metric, "value": value}))

    def best_name(self) -> str | None:
        try:
            return json.loads((self.root / "best.json").read_text())["name"]
        except (OSError, ValueError, KeyError):
            return None

    def prune(self) -> None:
        """Delete all but the last `keep_last` checkpoints and the best one (rename, then remove)."""
        ckpts = list_checkpoints(self.root)
        keep = set(p.name for p in ckpts[-self.keep_last:]) if self.keep_last else {ckpts[-1].name} if ckpts else set()
        best = self.best_name()
        if best:
            keep.add(best)
        for p in ckpts:
            if p.name not in keep:
                remove_dir(p)

    def clean_temp(self) -> None:
        """Remove leftovers of interrupted writes/deletes (.tmp-*, .trash-*)."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-", ".trash-")) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)

"""Checkpoints that cannot be lost: atomic folders of safetensors + JSON with a sha256 manifest.

Layout of `<run>/checkpoints/step_00000100/`:
    model.safetensors      weights under the model's state_dict() names
    optimizer.safetensors  optimizer tensors (state.<param index>.<key>)
    optimizer.json         optimizer param groups and non-tensor state
    rng.safetensors        torch CPU / CUDA generator states (the tensors of the `rng` entry)
    trainer_state.json     the JSON part of every other entry under its name: counters, data loader
                           position, python/numpy RNG, loss scaler, ... (see checkpoint/manager.py)
    meta.json              model name + config, run config, step, metrics
    manifest.json          sha256 and size of every other file (written last)

A checkpoint is written under a temporary name, each file fsynced, then the folder is renamed
into place, so a crash leaves either the old set or the new one. Loading verifies the manifest and
falls back to the previous good checkpoint with a warning. Nothing is ever unpickled.

This module is the format: the one writer (`write_checkpoint_dir`) and the one verified reader
(`newest_verified` / `load_latest` / `read_checkpoint`, all through `torchgraft.io.read_verified`).
Runs save and resume through `torchgraft.checkpoint.manager.CheckpointManager`; commands that read
weights use `load_latest` (or `torchgraft.checkpoint.model.load_model`).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from torchgraft.checkpoint.subclass_tensors import (described_in, from_plain, plain_param_groups,
                                                    safetensors_metadata, to_plain)
from torchgraft.errors import CheckpointError
from torchgraft.io import read_verified  # noqa: F401  (the one verified reader; re-exported)
from torchgraft.io import STEP_DIR_RE, fsync_dir, publish_dir, write_synced

FORMAT_VERSION = 1


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was unusable and an older one is used instead."""


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def state_dict_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors; tied (shared-storage) entries are cloned so every name stays."""
    out, seen = {}, set()
    for k, v in sd.items():
        t = v.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[k] = t.contiguous()
    return out


# ---------------------------------------------------------------- optimizer <-> files

def optimizer_to_files(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    tensors, subclasses = to_plain(tensors)  # 8-/4-bit optimizer states: their inner tensors
    js = {"param_groups": plain_param_groups(sd["param_groups"]), "scalars": scalars}
    return tensors, {**js, "subclasses": subclasses} if subclasses else js


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    tensors = from_plain(tensors, meta.get("subclasses") or {})
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a JSON-restored optimizer state, turning lists back into tuples where the group had them."""
    groups = sd["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"cannot resume: the checkpoint's optimizer has {len(groups)} parameter "
                              f"groups, this run has {len(optimizer.param_groups)}")
    for saved, current in zip(groups, optimizer.param_groups):
        for k, v in current.items():
            if isinstance(v, tuple) and isinstance(saved.get(k), list):
                saved[k] = tuple(saved[k])
            elif isinstance(v, torch.Tensor) and isinstance(saved.get(k), (int, float)):  # torchao's tensor lr
                saved[k] = torch.tensor(saved[k], dtype=v.dtype)
    optimizer.load_state_dict(sd)


# ---------------------------------------------------------------- RNG

def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part: python + numpy states, tensor part: torch CPU + CUDA states)."""
    py = random.getstate()
    np_state = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                    float(np_state[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return js, tensors


def restore_rng(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    v, internal, gauss = js["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])


# ---------------------------------------------------------------- writing / verifying a checkpoint

def model_files(model_state: dict[str, torch.Tensor] | None,
                optimizer_state: dict[str, Any] | None = None) -> dict[str, bytes]:
    """model.safetensors and optimizer.safetensors / optimizer.json of full (unsharded) states."""
    files: dict[str, bytes] = {}
    if model_state is not None:
        plain, subclasses = to_plain(model_state)  # a quantised (NF4) base: its inner tensors
        files["model.safetensors"] = st_save(state_dict_tensors(plain),
                                             metadata={"format": "pt", **safetensors_metadata(subclasses)})
    if optimizer_state is not None:
        tensors, js = optimizer_to_files(optimizer_state)
        files["optimizer.safetensors"] = st_save(tensors)
        files["optimizer.json"] = json_bytes(js)
    return files


def checkpoint_files(*, model_state: dict[str, torch.Tensor] | None, meta: dict[str, Any],
                     optimizer_state: dict[str, Any] | None = None,
                     trainer_state: dict[str, Any] | None = None,
                     rng_tensors: dict[str, torch.Tensor] | None = None) -> dict[str, bytes]:
    """The files of a checkpoint folder (name -> bytes), every part optional but `meta`."""
    files = model_files(model_state, optimizer_state)
    if rng_tensors is not None:
        files["rng.safetensors"] = st_save({k: v.contiguous() for k, v in rng_tensors.items()})
    if trainer_state is not None:
        files["trainer_state.json"] = json_bytes(trainer_state)
    files["meta.json"] = json_bytes(meta)
    return files


def _noop() -> None:
    pass


def write_checkpoint_dir(path: str | Path, files: dict[str, bytes], *,
                         write_shards: Callable[[Path], None] | None = None, main: bool = True,
                         barrier: Callable[[], None] = _noop) -> Path:
    """The one checkpoint writer, for single-file and sharded layouts.

    The folder is written under a temporary name: `write_shards(tmp)` (every process, e.g. DCP
    shards into `tmp/dcp`) and `files` (the main process) are fsynced, `manifest.json` lists the
    sha256 and size of every file (written last), then the folder is renamed into place. A crash
    leaves either the old set or the new one. Every process calls this; only `main` writes files.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{'sharded' if write_shards else os.getpid()}")
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if write_shards is not None:
        barrier()
        write_shards(tmp)
    if main:
        try:
            for name, data in files.items():
                write_synced(tmp / name, data)
            entries = {n: _entry(b) for n, b in files.items()}
            for f in sorted(tmp.rglob("*")):
                rel = str(f.relative_to(tmp))
                if f.is_file() and rel not in entries:
                    entries[rel] = _entry(f.read_bytes())
                elif f.is_dir():
                    fsync_dir(f)
            manifest = {"format_version": FORMAT_VERSION, "step": json.loads(files["meta.json"]).get("step"),
                        "files": dict(sorted(entries.items()))}
            write_synced(tmp / "manifest.json", json_bytes(manifest))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)  # the half-written folder; older checkpoints are untouched
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                need = sum(len(b) for b in files.values())
                raise CheckpointError(f"disk full while writing checkpoint {path} ({need / 1e6:.1f} MB needed); "
                                      f"the previous checkpoints in {path.parent} are intact: free space and "
                                      "resume with --resume") from None
            raise
        publish_dir(tmp, path)
    barrier()
    return path


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_checkpoint(path: str | Path, *, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
                     optimizer_state: dict[str, Any] | None = None,
                     trainer_state: dict[str, Any] | None = None,
                     rng_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a single-file checkpoint folder atomically (temp folder, fsync every file, manifest, rename)."""
    return write_checkpoint_dir(path, checkpoint_files(
        model_state=model_state, meta=meta, optimizer_state=optimizer_state,
        trainer_state=trainer_state, rng_tensors=rng_tensors))


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    trainer_state: dict[str, Any] | None
    entry_tensors: dict[str, dict[str, torch.Tensor]]  # `<entry>.safetensors` of the manager's entries

    @property
    def rng_tensors(self) -> dict[str, torch.Tensor] | None:
        return self.entry_tensors.get("rng")


_LAYOUT_FILES = ("model.safetensors", "optimizer.safetensors")


def _parse(path: Path, files: dict[str, bytes]) -> LoadedCheckpoint:
    try:
        model_state = from_plain(st_load(files["model.safetensors"]), described_in(files["model.safetensors"]))
        meta = json.loads(files["meta.json"])
        opt = None
        if "optimizer.safetensors" in files:
            opt = optimizer_from_files(st_load(files["optimizer.safetensors"]),
                                       json.loads(files["optimizer.json"]))
        ts = json.loads(files["trainer_state.json"]) if "trainer_state.json" in files else None
        entries = {name[: -len(".safetensors")]: st_load(data) for name, data in files.items()
                   if name.endswith(".safetensors") and "/" not in name and name not in _LAYOUT_FILES}
    except (KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    return LoadedCheckpoint(path, model_state, meta, opt, ts, entries)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root` (a checkpoints/ folder), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _checkpoints_root(path: Path) -> Path | None:
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if list_checkpoints(path):
        return path
    return None


def load_latest(path: str | Path, *, before: Path | None = None) -> LoadedCheckpoint:
    """Load the newest good checkpoint of a run dir / checkpoints dir / checkpoint folder.

    A checkpoint folder that fails verification falls back to the previous good one in the same
    parent with a `CheckpointFallbackWarning`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (give a run directory or a "
                              f"checkpoints/step_XXXXXXXX folder)")
    root = _checkpoints_root(path)
    if root is not None:
        candidates = list_checkpoints(root)
        if not candidates:
            raise CheckpointError(f"no checkpoints in {root}")
    elif (path / "manifest.json").exists() or STEP_DIR_RE.match(path.name):
        siblings = list_checkpoints(path.parent) if STEP_DIR_RE.match(path.name) else []
        candidates = [p for p in siblings if p.name <= path.name] or [path]
        if path not in candidates:
            candidates.append(path)
    else:
        raise CheckpointError(f"{path} is neither a run directory nor a checkpoint folder "
                              f"(expected checkpoints/ or manifest.json inside)")
    return newest_verified(candidates, path, parse=True)


def newest_verified(candidates: list[Path], where: str | Path, *, parse: bool = False) -> Any:
    """The newest of `candidates` (oldest first) whose manifest verifies: its path, or its
    `LoadedCheckpoint` when `parse`. Each bad one warns `CheckpointFallbackWarning` and the previous
    is tried (the one fallback loop of every loader)."""
    errors = []
    for cand in reversed(candidates):
        try:
            files = read_verified(cand)
            return _parse(cand, files) if parse else cand
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"{e}; falling back to the previous checkpoint", CheckpointFallbackWarning,
                          stacklevel=3)
    raise CheckpointError(f"no good checkpoint under {where}: " + "; ".join(errors))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state_dict, meta) of the newest good checkpoint at `path`, manifest verified."""
    ck = load_latest(path)
    return ck.model_state, ck.meta


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """One checkpoint folder, manifest verified (no fallback)."""
    return _parse(Path(path), read_verified(path))

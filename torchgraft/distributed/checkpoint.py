"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP), and a single-file export.

`save_sharded` writes each rank's shards of the model and optimizer state in parallel (no rank
gathers the full model); `load_sharded` reads them back into a model parallelised in any way and
with any number of processes (DCP reshards by parameter name: save with 2 ranks, resume with 1
or with 8; FSDP, DDP or a plain model). `export_safetensors` gathers the full weights to rank 0
and writes one `model.safetensors` under the model's `state_dict()` names, for inference or for
the Hugging Face exporters.

Nothing is unpickled freely: DCP stores its index (`.metadata`) as a pickle and small non-tensor
values (optimizer hyper-parameters) with `torch.save`; `load_sharded` reads the index with an
unpickler that only accepts DCP's own metadata classes and torch dtypes/sizes, and the values with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchgraft.checkpoint.files import LoadedCheckpoint, load_optimizer_state, model_files
from torchgraft.checkpoint.layout import Collectives, SingleFileLayout, WriteShards
from torchgraft.errors import CheckpointError
from torchgraft.io import atomic_write_file, atomic_write_text

_META = "torchgraft_dcp.json"


class _SafeMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` index, refusing anything but its dataclasses and torch dtypes."""

    _BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "slice", "int", "float", "bool", "bytes", "str"}

    _ALLOWED = {("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint."):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                               (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "builtins" and name in self._BUILTINS:
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint index refers to {module}.{name}, which a DCP index never "
                              "holds; refusing to load an untrusted file")


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            rank = kwargs.get("rank")
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
                metadata = _SafeMetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))


def _planner(allow_partial_load: bool):
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner(allow_partial_load=allow_partial_load)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' single-process use when no group exists; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 *, extra: dict[str, Any] | None = None) -> Path:
    """Write model (+ optimizer) state as a DCP checkpoint folder; every rank must call it.

    `extra`: small JSON-able data (step, config, ...) written once by rank 0 next to the shards.
    Works without a process group too (a one-process checkpoint that any world size can load).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    path = Path(path)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(path), no_dist=not _is_dist())
    if _rank() == 0:
        meta = {"format": "torch.distributed.checkpoint", "has_optimizer": optimizer is not None,
                "world_size": dist.get_world_size() if _is_dist() else 1, "extra": extra or {}}
        atomic_write_text(path / _META, json.dumps(meta, indent=2))
    if _is_dist():
        dist.barrier()
    return path


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True when `path` is a folder written by `save_sharded`."""
    p = Path(path)
    return (p / ".metadata").is_file() and (p / _META).is_file()


def read_extra(path: str | Path) -> dict[str, Any]:
    """The `extra` mapping saved with `save_sharded`."""
    p = Path(path) / _META
    if not p.is_file():
        raise CheckpointError(f"{path} is not a torchgraft sharded checkpoint (no {_META}); "
                              "point at a folder written by save_sharded")
    return json.loads(p.read_text()).get("extra", {})


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 *, strict: bool = True) -> dict[str, Any]:
    """Load a `save_sharded` checkpoint in place into `model` (+ `optimizer`); return its `extra`.

    The model may be parallelised differently and run on a different number of processes than
    when it was saved. Every rank must call it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a torchgraft sharded checkpoint (missing .metadata or "
                              f"{_META}); it may be incomplete, use an earlier checkpoint")
    meta = json.loads((path / _META).read_text())
    if optimizer is not None and not meta.get("has_optimizer"):
        raise CheckpointError(f"{path} holds no optimizer state; load the model only (optimizer=None)")
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=_reader(path), planner=_planner(not strict), no_dist=not _is_dist())
    except CheckpointError:
        raise
    except (Exception, dcp.CheckpointException) as e:  # DCP wraps per-rank failures: one readable line
        raise CheckpointError(f"cannot load sharded checkpoint {path}: {_first_failure(e)}") from e
    set_model_state_dict(model, state["model"], options=_options(strict=strict))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return meta.get("extra", {})


def _first_failure(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    text = str(e).strip()
    if "global metadata read failed: " in text:  # DCP's wording around the reader's own error
        text = text.split("global metadata read failed: ", 1)[1].split("; rank local", 1)[0]
    return text.splitlines()[0] if text else type(e).__name__


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state on CPU, on rank 0 only (other ranks get {}).

    A collective under FSDP: every rank must call it. Names are the model's `state_dict()` names.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if _is_dist() and dist.get_world_size() > 1:
        sd = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    else:
        sd = get_model_state_dict(model, options=_options(full_state_dict=True))
        sd = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
        if hasattr(next(iter(sd.values()), None), "full_tensor"):  # a one-rank FSDP model
            sd = {k: v.full_tensor() for k, v in sd.items()}
    return sd if _rank() == 0 else {}


def export_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path | None:
    """Gather the full weights and write one safetensors file on rank 0 (returns its path there).

    Every rank must call it. Tied weights (e.g. `lm_head.weight` = `tok_emb.weight`) are written
    under both names, like `model.state_dict()`.
    """
    from safetensors.torch import save_file

    sd = full_state_dict(model)
    out = None
    if _rank() == 0:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        seen: set[int] = set()
        tensors = {}
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                continue
            v = v.detach().contiguous()
            if v.untyped_storage().data_ptr() in seen:  # shared storage: safetensors needs a copy
                v = v.clone()
            seen.add(v.untyped_storage().data_ptr())
            tensors[k] = v
        atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"}))
        out = path
    if _is_dist():
        dist.barrier()
    return out


class DistributedLayout(SingleFileLayout):
    """The checkpoint layout of a run on several processes (`CheckpointManager(layout=...)`).

    `sharded` (FSDP2): every rank writes its DCP shards of model + optimizer into `dcp/`, and rank 0
    the full `model.safetensors` (gathered) for inference and export. Otherwise (DDP) the single-file
    layout, written by rank 0. Loading reads either kind into either kind of model: DCP shards
    reshard by name; a single-file checkpoint is cut into shards locally by each rank."""

    def __init__(self, comm: Collectives, sharded: bool):
        super().__init__(comm)
        self.sharded = sharded

    def files(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None
              ) -> tuple[dict[str, bytes], WriteShards | None]:
        if not self.sharded or model is None:
            return super().files(model, optimizer)
        full = full_state_dict(model)  # a collective: every rank calls it

        def write_shards(tmp: Path) -> None:
            save_sharded(tmp / "dcp", model, optimizer)

        return (model_files(full) if self.comm.is_main else {}), write_shards

    def load(self, ck: LoadedCheckpoint, model: nn.Module | None,
             optimizer: torch.optim.Optimizer | None) -> None:
        if model is not None and is_sharded_checkpoint(ck.path / "dcp"):
            load_sharded(ck.path / "dcp", model, optimizer)
        elif model is not None and self.sharded:
            if optimizer is None or ck.optimizer_state is None:
                raise CheckpointError(f"{ck.path} holds weights only; it cannot resume a run")
            _load_full_into_fsdp(model, optimizer, ck.model_state, ck.optimizer_state)
        else:
            super().load(ck, model, optimizer)


def _load_full_into_fsdp(model: nn.Module, optimizer: torch.optim.Optimizer,
                         model_state: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
    """Load a single-file (unsharded) checkpoint into an FSDP-sharded model and its optimizer.

    Every rank has read the whole file, so each cuts its own shards locally (no communication).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    def local_piece(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if isinstance(like, DTensor):
            return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
        return full.to(dtype=like.dtype, device=like.device)

    expected = set(model.state_dict())
    if set(model_state) != expected:
        missing, extra = sorted(expected - set(model_state)), sorted(set(model_state) - expected)
        raise CheckpointError(f"checkpoint weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); resume with the same model config")
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            piece = local_piece(model_state[name], t)
            (t.to_local() if isinstance(t, DTensor) else t).copy_(
                piece.to_local() if isinstance(piece, DTensor) else piece)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for pid, st in optim_state["state"].items():
        p = params[int(pid)]
        state[pid] = {k: local_piece(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                      for k, v in st.items()}
    load_optimizer_state(optimizer, {"state": state, "param_groups": optim_state["param_groups"]})

"""Lazy safetensors reading and streaming writing, single file or sharded (`*.index.json`).

Why not `safetensors.torch.load_file`: it materialises every tensor at once, and `safe_open`
memory-maps the file so touched pages count against the process as well. Here each tensor is read
with one `readinto` straight into its own freshly allocated storage, so loading a model costs one
copy of the weights plus nothing else. The writer streams the same way: a tensor is produced,
written and dropped, so exporting never holds a second full copy of the converted weights.

The file format (https://github.com/huggingface/safetensors): 8-byte little-endian header length,
a JSON header `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`
padded with spaces to a multiple of 8, then the raw little-endian tensor bytes.
"""
from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchgraft.errors import CheckpointError
from torchgraft.io import atomic_write_file, atomic_write_text

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("torchgraft.interop.safetensors_io needs a little-endian machine")


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> safetensors dtype tag ("F32", "BF16", ...)."""
    if dtype not in _NAMES:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")
    return _NAMES[dtype]


def parse_size(size: int | str) -> int:
    """`5_000_000`, "5GB", "200MB", "10KiB" -> bytes (decimal units like Hugging Face's `max_shard_size`)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise CheckpointError(f"cannot read size {size!r}; use bytes or e.g. '5GB', '200MB'")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One `.safetensors` file: header parsed at open, tensors read one at a time on `get`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"safetensors file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path} is not a safetensors file (bad header length {n})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path} has a corrupted safetensors header") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        self._infos: dict[str, TensorInfo] = {}
        for name, h in header.items():
            try:
                dtype = _DTYPES[h["dtype"]]
                shape = tuple(int(s) for s in h["shape"])
                b, e = (int(x) for x in h["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: bad header entry for tensor {name!r}") from None
            expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if e - b != expected or b < 0 or data_start + e > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent offsets "
                                      f"(file truncated or corrupted?)")
            self._infos[name] = TensorInfo(dtype, shape, data_start + b, data_start + e)

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        """Read tensor `name` into new CPU memory (exactly its own bytes, nothing else)."""
        info = self._infos[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            view = memoryview(buf.numpy())
            with open(self.path, "rb", buffering=0) as f:
                f.seek(info.begin)
                got = 0
                while got < info.nbytes:
                    k = f.readinto(view[got:])
                    if not k:
                        raise CheckpointError(f"{self.path}: unexpected end of file reading {name!r}")
                    got += k
        return buf.view(info.dtype).reshape(info.shape)


class CheckpointReader:
    """The tensors of a directory holding `model.safetensors` or a sharded
    `model.safetensors.index.json` (or of a single `.safetensors` file). Shards open lazily."""

    def __init__(self, path: str | Path, single: str = SINGLE_FILE, index: str = INDEX_FILE):
        p = Path(path)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, Path] = {}
        if p.is_file():
            f = SafetensorsFile(p)
            self._files[str(p)] = f
            self._where = {k: p for k in f.keys()}
            self.root = p.parent
            return
        self.root = p
        if (p / index).is_file():
            try:
                weight_map = json.loads((p / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{p / index} is not a valid safetensors index "
                                      "(needs a 'weight_map' object)") from None
            for name, shard in weight_map.items():
                shard_path = p / shard
                if not shard_path.is_file():
                    raise CheckpointError(f"shard {shard} listed in {p / index} is missing")
                self._where[name] = shard_path
        elif (p / single).is_file():
            f = SafetensorsFile(p / single)
            self._files[str(p / single)] = f
            self._where = {k: p / single for k in f.keys()}
        elif list(p.glob("*.bin")) or list(p.glob("*.pt")) or list(p.glob("*.pth")):
            raise CheckpointError(f"{p} holds only pickle weights (.bin/.pt), which torchgraft never "
                                  f"unpickles; re-save them as safetensors (save_pretrained does by default)")
        else:
            raise CheckpointError(f"no {single} or {index} in {p}")

    def _file(self, name: str) -> SafetensorsFile:
        path = self._where[name]
        f = self._files.get(str(path))
        if f is None:
            f = self._files[str(path)] = SafetensorsFile(path)
        if name not in f:
            raise CheckpointError(f"tensor {name!r} is listed in the index but absent from {path.name}")
        return f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._file(name).info(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} not found in {self.root}")
        return self._file(name).get(name)

    @property
    def total_bytes(self) -> int:
        return sum(self.info(k).nbytes for k in self.keys())


# ---------------------------------------------------------------------------------------------
# writing

@dataclass
class PendingTensor:
    """A tensor to write: its name, shape and dtype up front, its values produced on demand."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def pending(name: str, tensor: torch.Tensor) -> PendingTensor:
    """Wrap an existing tensor as a `PendingTensor`."""
    return PendingTensor(name, tuple(tensor.shape), tensor.dtype, lambda: tensor)


def write_file(path: str | Path, tensors: list[PendingTensor],
               metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file, producing and writing one tensor at a time (atomic rename)."""
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for t in tensors:
        if t.name in header:
            raise CheckpointError(f"tensor name {t.name!r} written twice")
        header[t.name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for t in tensors:
                x = t.produce()
                if tuple(x.shape) != t.shape or x.dtype != t.dtype:
                    raise CheckpointError(f"tensor {t.name!r}: produced {tuple(x.shape)} {x.dtype}, "
                                          f"announced {t.shape} {t.dtype}")
                x = x.detach().to("cpu").contiguous()
                if x.numel():
                    f.write(memoryview(x.reshape(-1).view(torch.uint8).numpy()))
                del x

    atomic_write_file(path, write)


def write_hf_weights(directory: str | Path, tensors: list[PendingTensor],
                     max_shard_size: int | str = "5GB",
                     metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json` when the total exceeds `max_shard_size` (Hugging Face layout).
    Returns the files written."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    for stale in [d / SINGLE_FILE, d / INDEX_FILE, *d.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        write_file(d / SINGLE_FILE, shards[0], metadata)
        return [d / SINGLE_FILE]
    n = len(shards)
    written, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_file(d / name, shard, metadata)
        written.append(d / name)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors),
                          "total_parameters": sum(math.prod(t.shape) for t in tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
    write_json(d / INDEX_FILE, index)
    written.append(d / INDEX_FILE)
    return written


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON to `path` atomically (temporary file, fsync, rename)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


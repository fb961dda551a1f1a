"""Tensor subclasses (torchao's NF4 weights, 8-/4-bit optimizer states) <-> plain tensors + JSON,
so that they round-trip bit for bit through safetensors files, never through pickle.

A subclass tensor `name` becomes its inner tensors `name::<attr>` (from `__tensor_flatten__`) and a
JSON entry with its class and flatten context; only the classes listed in `_CLASSES` are rebuilt,
so a file cannot make the loader import arbitrary code.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any

import torch

from torchgraft.errors import CheckpointError

METADATA_KEY = "torchgraft.subclasses"  # safetensors metadata entry of a model file
_CLASSES = {
    "NF4Tensor": "torchao.quantization.quantize_.workflows.nf4.nf4_tensor",
    "OptimState8bit": "torchao.optim.subclass_8bit",
    "OptimState4bit": "torchao.optim.subclass_4bit",
}
_DATACLASSES = {"SubclassTensorArgs": "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"}


def is_subclass(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, torch.nn.Parameter) \
        and hasattr(t, "__tensor_flatten__")


def _encode(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return {"__dtype__": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"__device__": "cpu"}  # checkpoints are read back on the CPU
    if isinstance(v, torch.Size):
        return {"__size__": list(v)}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v) and type(v).__name__ in _DATACLASSES:
        return {"__dataclass__": type(v).__name__,
                "fields": {f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise CheckpointError(f"cannot store a tensor subclass attribute of type {type(v).__name__}")


def _decode(v: Any) -> Any:
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "__dtype__" in v:
        return getattr(torch, v["__dtype__"])
    if "__device__" in v:
        return torch.device(v["__device__"])
    if "__size__" in v:
        return torch.Size(v["__size__"])
    if "__tuple__" in v:
        return tuple(_decode(x) for x in v["__tuple__"])
    if "__dataclass__" in v:
        cls = getattr(importlib.import_module(_DATACLASSES[v["__dataclass__"]]), v["__dataclass__"])
        return cls(**{k: _decode(x) for k, x in v["fields"].items()})
    return {k: _decode(x) for k, x in v.items()}


def to_plain(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(plain tensors, {name: subclass description}); plain inputs pass through unchanged."""
    plain: dict[str, torch.Tensor] = {}
    described: dict[str, Any] = {}
    for name, t in tensors.items():
        if not is_subclass(t):
            plain[name] = t
            continue
        cls = type(t).__name__
        if cls not in _CLASSES:
            raise CheckpointError(f"{name}: cannot checkpoint a {cls} tensor (known subclasses: "
                                  f"{', '.join(_CLASSES)})")
        attrs, ctx = t.__tensor_flatten__()
        for a in attrs:
            plain[f"{name}::{a}"] = getattr(t, a).detach()
        described[name] = {"class": cls, "attrs": list(attrs), "ctx": _encode(ctx),
                           "size": list(t.shape), "stride": list(t.stride())}
    return plain, described


def from_plain(plain: dict[str, torch.Tensor], described: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Undo `to_plain`: rebuild every described subclass tensor from its inner tensors."""
    if not described:
        return plain
    out = {k: v for k, v in plain.items() if "::" not in k}
    for name, d in described.items():
        if d.get("class") not in _CLASSES:
            raise CheckpointError(f"{name}: unknown tensor subclass {d.get('class')!r} in the checkpoint")
        try:
            cls = getattr(importlib.import_module(_CLASSES[d["class"]]), d["class"])
        except ImportError:
            raise CheckpointError(f"{name} is a {d['class']} tensor: reading it needs torchao "
                                  "(pip install 'torchgraft[qlora]')") from None
        inner = {a: plain[f"{name}::{a}"] for a in d["attrs"]}
        out[name] = cls.__tensor_unflatten__(inner, _decode(d["ctx"]), torch.Size(d["size"]), tuple(d["stride"]))
    return out


def safetensors_metadata(described: dict[str, Any]) -> dict[str, str]:
    """The extra safetensors metadata that records `described` (empty when there is nothing)."""
    return {METADATA_KEY: json.dumps(described)} if described else {}


def described_in(data: bytes) -> dict[str, Any]:
    """The subclass descriptions stored in the header of a safetensors file's bytes ({} if none)."""
    n = int.from_bytes(data[:8], "little")
    try:
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
    except (ValueError, TypeError):
        raise CheckpointError("unreadable safetensors header") from None


def plain_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer param groups with 0-d tensor values (torchao keeps `lr` as a tensor) as floats."""
    return [{k: v.item() if isinstance(v, torch.Tensor) and v.ndim == 0 else v for k, v in g.items()}
            for g in groups]

"""Load a bf16 / fp32 checkpoint straight into a quantised model, one layer at a time.

    model = torchgraft.build("llama3-8b", device="meta")
    report = load_quantized(model, "ckpt/model.safetensors", fmt="nf4", targets=["*_proj"])

The model is built on the meta device (no memory); for every module in turn its own tensors are
allocated, read from the safetensors file(s) (plain reads, one tensor at a time: no memory map, whose
pages would count as resident memory) and, for a target
nn.Linear, quantised at once, so at most one layer is ever held in high precision. Tensors the file
does not hold (RoPE tables, other non-persistent buffers) come from the module's `reset_parameters`.
The report gives the peak resident memory seen during the load.
"""
from __future__ import annotations

import json
import resource
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from torchgraft.errors import CheckpointError
from torchgraft.quant.formats import quantizer


@dataclass
class LoadReport:
    quantized: list[str] = field(default_factory=list)
    loaded_tensors: int = 0
    peak_rss_bytes: int = 0          # the process's peak resident set size at the end of the load
    high_precision_peak_bytes: int = 0  # the largest one-layer float weight held while quantising

    def __str__(self) -> str:
        return (f"loaded {self.loaded_tensors} tensors, quantised {len(self.quantized)} linear layers; peak RSS "
                f"{self.peak_rss_bytes / 2**30:.2f} GiB (largest float layer {self.high_precision_peak_bytes / 2**20:.0f} MiB)")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: Linux's VmHWM (reset by exec, unlike
    ru_maxrss, which a subprocess inherits from the parent it was forked from), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        files = [f for f in files if f.name not in ("optimizer.safetensors", "rng.safetensors")]
        if files:
            return files
    elif path.is_file():
        return [path]
    raise CheckpointError(f"no model safetensors at {path} (give a .safetensors file or a checkpoint folder)")


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _Reader:
    """One safetensors file read tensor by tensor with `readinto` (a buffer per tensor, then freed)."""

    def __init__(self, path: Path):
        self.f = open(path, "rb")
        n = int.from_bytes(self.f.read(8), "little")
        self.header = {k: v for k, v in json.loads(self.f.read(n)).items() if k != "__metadata__"}
        self.base = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def get_tensor(self, name: str) -> torch.Tensor:
        h = self.header[name]
        start, end = h["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        self.f.seek(self.base + start)
        self.f.readinto(buf.numpy())
        return buf.view(_DTYPES[h["dtype"]]).reshape(h["shape"])

    def close(self) -> None:
        self.f.close()


def _materialize(m: nn.Module, memo: dict[int, torch.Tensor], dtype: torch.dtype | None) -> bool:
    """Allocate `m`'s own meta tensors on the CPU (tied tensors once, via `memo`); True if any was."""
    done = False
    for store, is_param in ((m._parameters, True), (m._buffers, False)):
        for name, t in list(store.items()):
            if t is None or not t.is_meta:
                continue
            if id(t) not in memo:
                dt = dtype if dtype is not None and is_param and t.is_floating_point() else t.dtype
                new = torch.empty(t.shape, dtype=dt, device="cpu")
                memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
            store[name] = memo[id(t)]
            done = True
    return done


def load_quantized(model: nn.Module, weights: str | Path, fmt: str = "nf4", targets: Iterable[str] | None = None,
                   dtype: torch.dtype | None = None) -> LoadReport:
    """Fill the meta-device `model` from `weights` (a .safetensors file or a folder of them, under the
    model's own names), quantising the target nn.Linear layers (default all) to `fmt` as they load;
    floating parameters are cast to `dtype` (default: as built; buffers keep theirs). Returns what was done."""
    from torchgraft.peft.lora import target_matches  # deferred: peft.lora imports quant.base

    from torchgraft.quant.converters import shared_weights

    make = quantizer(fmt)
    tied = shared_weights(model)  # ids of meta weights used twice: kept in float
    pats = list(targets) if targets is not None else None
    report = LoadReport()
    memo: dict[int, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = [_Reader(f) for f in _files(Path(weights))]
        for h in handles:
            stack.callback(h.close)
        where = {k: h for h in handles for k in h.keys()}
        for name in [n for n, _ in model.named_modules()]:  # names only: a list of modules would keep
            m = model.get_submodule(name) if name else model  # every float layer alive after its swap
            meta_names = [n for n, t in list(m._parameters.items()) + list(m._buffers.items())
                          if t is not None and t.is_meta]
            if not _materialize(m, memo, dtype):
                continue
            prefix = f"{name}." if name else ""
            missing = [n for n in meta_names if prefix + n not in where]
            if missing and hasattr(m, "reset_parameters"):
                m.reset_parameters()  # buffers the file lacks (e.g. RoPE tables)
            with torch.no_grad():
                for n in meta_names:
                    if prefix + n in where:
                        t = getattr(m, n)
                        t.copy_(where[prefix + n].get_tensor(prefix + n))  # cast to the model's dtype
                        report.loaded_tensors += 1
            meta_weight = next((k for k, v in memo.items() if v is getattr(m, "weight", None)), None)
            if isinstance(m, nn.Linear) and name and meta_weight not in tied and \
                    (pats is None or any(target_matches(name, p) for p in pats)):
                report.high_precision_peak_bytes = max(report.high_precision_peak_bytes,
                                                       m.weight.numel() * m.weight.element_size())
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, make(m, name))
                del memo[meta_weight]  # the float weight is freed now
                report.quantized.append(name)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{weights} lacks {len(left)} tensor(s) of the model, e.g. {left[0]!r}")
    report.peak_rss_bytes = peak_rss_bytes()
    return report

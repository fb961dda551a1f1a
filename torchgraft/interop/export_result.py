"""What `torchgraft.export` wrote (`ExportResult`): the file, its input kind, names, axes and metadata,
and the check's differences against eager PyTorch."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExportResult:
    """What `export` wrote. `dynamic_axes`: {input name: {axis: dim name}}; `max_abs_diff`: the check
    against eager PyTorch (set by `check_export` / `export(check=True)`); `spec`: the input kind."""
    path: Path
    format: str
    kind: str                                  # "logits" or "decode_step"
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    metadata: dict[str, str]
    opset: int | None = None
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    checked_shapes: list[list[tuple[int, ...]]] = field(default_factory=list)
    quantized_path: Path | None = None
    quantized_max_abs_diff: float | None = None
    spec: str = ""                             # "image", "tokens", "text-pair", "decode-step", ...

    def summary(self) -> str:
        ins = ", ".join(f"{n}{_axes_str(self.dynamic_axes.get(n, {}))}" for n in self.input_names[:3])
        more = f", ... ({len(self.input_names)} inputs)" if len(self.input_names) > 3 else ""
        opset = f", opset {self.opset}" if self.opset else ""
        return f"{self.path} ({self.format}{opset}, {self.kind}): inputs {ins}{more} -> {self.output_names[0]}"


def _axes_str(axes: Mapping[int, str]) -> str:
    return "[" + ", ".join(f"{a}:{n}" for a, n in sorted(axes.items())) + "]" if axes else ""

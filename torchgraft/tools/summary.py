"""Model summary: a table of modules (name, type, output shape, parameters, trainable) for any nn.Module.

Output shapes come from forward hooks during one forward pass on the meta device (no memory is
allocated, so a 70B model is summarised in seconds): the model's parameters and buffers are swapped
for meta copies with `torch.func.functional_call`, inputs are moved to meta. Models that keep plain
(unregistered) tensors fall back to `FakeTensorMode`.

The meta-device helpers (`example_inputs`, `make_inputs`, `record_pass`) live in `meta.py`, below
this module, `flops.py` and `memory.py`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchgraft.tools.meta import (  # noqa: F401  (InputSpec, InspectError, example_inputs re-exported)
    InputSpec,
    InspectError,
    PassRecorder,
    dtype_name,
    example_inputs,
    format_bytes,
    make_inputs,
    record_pass,
)
from torchgraft.tools.console import recording_console

def shape_of(x: Any) -> Any:
    """Output shape(s) as lists; tuples/lists/dicts of tensors keep their structure; None if no tensor."""
    if isinstance(x, torch.Tensor):
        return list(x.shape)
    if isinstance(x, (tuple, list)):
        shapes = [shape_of(v) for v in x]
        return shapes if any(s is not None for s in shapes) else None
    if isinstance(x, dict):
        shapes = {k: shape_of(v) for k, v in x.items()}
        shapes = {k: v for k, v in shapes.items() if v is not None}
        return shapes or None
    return None


# --------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------
@dataclass
class ModuleRow:
    name: str  # dotted name ("" for the root)
    type: str
    depth: int  # 0 = the model itself, 1 = its children, ...
    output_shape: Any  # list of ints, nested lists/dicts for several outputs, None if unknown
    parameters: int  # all parameters under this module (tied ones once)
    trainable: int  # those with requires_grad

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "depth": self.depth, "output_shape": self.output_shape,
                "parameters": self.parameters, "trainable": self.trainable}


@dataclass
class Summary:
    """What `summary()` returns: rows (modules up to `depth`), totals and bytes per dtype."""

    model_type: str
    rows: list[ModuleRow]
    parameters: int
    trainable_parameters: int
    param_bytes: dict[str, int]  # dtype -> bytes of parameters
    buffer_bytes: dict[str, int]  # dtype -> bytes of buffers
    input_shapes: Any = None
    output_shape: Any = None
    depth: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def non_trainable_parameters(self) -> int:
        return self.parameters - self.trainable_parameters

    @property
    def total_bytes(self) -> int:
        return sum(self.param_bytes.values()) + sum(self.buffer_bytes.values())

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "parameters": self.parameters,
                "trainable_parameters": self.trainable_parameters,
                "non_trainable_parameters": self.non_trainable_parameters,
                "param_bytes": dict(self.param_bytes), "buffer_bytes": dict(self.buffer_bytes),
                "total_bytes": self.total_bytes, "input_shapes": self.input_shapes,
                "output_shape": self.output_shape, "depth": self.depth,
                "modules": [r.to_dict() for r in self.rows if r.depth > 0]}

    def table(self, collapse_repeats: bool = True):
        """A rich Table; runs of identical sibling modules (blocks.0 .. blocks.79) shown once, x N."""
        from rich.table import Table

        t = Table(title=f"{self.model_type}", show_lines=False)
        for col, just in (("module", "left"), ("type", "left"), ("output shape", "left"),
                          ("params", "right"), ("trainable", "right")):
            t.add_column(col, justify=just)
        for row, repeat in _display_rows(self.rows, collapse_repeats):
            name = "  " * (row.depth - 1) + row.name.rsplit(".", 1)[-1]
            if repeat > 1:
                first = row.name.rsplit(".", 1)[-1]
                name = "  " * (row.depth - 1) + f"{first}..{int(first) + repeat - 1} (x{repeat})" \
                    if first.isdigit() else name + f" (x{repeat})"
            shape = "-" if row.output_shape is None else _fmt_shape(row.output_shape)
            params = f"{row.parameters:,}" + (f" each" if repeat > 1 else "")
            t.add_row(name, row.type, shape, params, f"{row.trainable:,}")
        return t

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        console = recording_console(120)
        self.print(console)
        return console.export_text()

    def totals(self) -> str:
        return (f"parameters: {self.parameters:,} (trainable {self.trainable_parameters:,}, frozen "
                f"{self.non_trainable_parameters:,}); " + ", ".join(
                    f"{k} {format_bytes(v)}" for k, v in self.param_bytes.items())
                + (("; buffers " + ", ".join(f"{k} {format_bytes(v)}" for k, v in self.buffer_bytes.items()))
                   if self.buffer_bytes else ""))

    def print(self, console: Any = None) -> None:
        from rich.console import Console

        console = console or Console()
        console.print(self.table())
        console.print(self.totals())


def _fmt_shape(s: Any) -> str:
    if isinstance(s, list) and all(isinstance(v, int) for v in s):
        return "(" + ", ".join(str(v) for v in s) + ")"
    if isinstance(s, list):
        return ", ".join(_fmt_shape(v) for v in s if v is not None)
    if isinstance(s, dict):
        return ", ".join(f"{k}: {_fmt_shape(v)}" for k, v in s.items())
    return str(s)


def _display_rows(rows: list[ModuleRow], collapse: bool) -> list[tuple[ModuleRow, int]]:
    """Rows to show; consecutive numbered siblings with the same type/params/shape collapse into one."""
    shown = [r for r in rows if r.depth > 0]
    if not collapse:
        return [(r, 1) for r in shown]
    out: list[tuple[ModuleRow, int]] = []
    i = 0
    while i < len(shown):
        r = shown[i]
        parent, _, leaf = r.name.rpartition(".")
        j = i + 1
        repeat = 1
        if leaf.isdigit():
            while j < len(shown):
                s = shown[j]
                if s.depth > r.depth:  # pre-order: a descendant of r or of an identical sibling
                    j += 1
                    continue
                sp, _, sl = s.name.rpartition(".")
                if (sp == parent and sl.isdigit() and s.depth == r.depth and s.type == r.type
                        and s.parameters == r.parameters and s.output_shape == r.output_shape):
                    repeat += 1
                    j += 1
                    continue
                break
        out.append((r, repeat))
        if repeat > 1:
            # show the first sibling's children, skip the others (and their children)
            k = i + 1
            while k < len(shown) and shown[k].name.startswith(r.name + "."):
                out.append((shown[k], 1))
                k += 1
            i = j
        else:
            i += 1
    return out


def _bytes_by_dtype(tensors: list[torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensors:
        k = dtype_name(t.dtype)
        out[k] = out.get(k, 0) + t.numel() * t.element_size()
    return out


def summary(model: nn.Module, input: InputSpec = None, *, input_size: Any = None,
            dtype: torch.dtype | None = None, depth: int = 3, batch: int = 1,
            seq_len: int | None = None) -> Summary:
    """Summarise any `nn.Module`: per-module output shape, parameters and trainable parameters.

    Give `input` (a tensor, a tuple of args or a dict of kwargs) or `input_size` (a shape, float32
    unless `dtype`); zoo models need neither (their declared `ModelParts.example_inputs`, or for
    undeclared models with a `config`, token ids or images made up from it). Without any of these the table has parameters but no output shapes. The forward pass runs
    on meta tensors, so it costs no memory and works on meta-device models.
    `depth`: how many levels of submodules to list (1 = direct children).
    """
    if not isinstance(model, nn.Module):
        raise InspectError(f"summary needs an nn.Module, got {type(model).__name__}")
    if depth < 0:
        raise InspectError(f"depth must be >= 0, got {depth}")
    inputs = make_inputs(model, input, input_size, dtype, batch, seq_len, required=False)
    if inputs is None:
        return _summary_of(model, depth, {}, None, None)
    rec = ShapeRecorder(depth, inputs)
    record_pass(model, *inputs, [rec])
    return rec.summary(model)


class ShapeRecorder(PassRecorder):
    """Records each module's output shape (modules up to `depth` levels) during a `record_pass`."""

    def __init__(self, depth: int, inputs: tuple[tuple, dict]) -> None:
        self.depth = depth
        self.outputs: dict[str, Any] = {}
        self.input_shapes: Any = shape_of(list(inputs[0]) + list(inputs[1].values()))
        self.output_shape: Any = None

    @contextlib.contextmanager
    def session(self, model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
        self.outputs.clear()

        def hook_for(name: str) -> Callable:
            def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
                self.outputs.setdefault(name, shape_of(out))
            return hook

        handles = [m.register_forward_hook(hook_for(name))
                   for name, m in model.named_modules() if _depth(name) <= self.depth]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def forward_done(self, out: Any, logits: torch.Tensor | None) -> None:
        self.output_shape = shape_of(out)

    def summary(self, model: nn.Module) -> Summary:
        return _summary_of(model, self.depth, self.outputs, self.input_shapes, self.output_shape)


def _depth(name: str) -> int:
    return 0 if name == "" else name.count(".") + 1


def _summary_of(model: nn.Module, depth: int, outputs: dict[str, Any], input_shapes: Any,
                out_shape: Any) -> Summary:
    """The Summary of `model` given the output shapes per module name (from a forward pass)."""
    rows = []
    for name, m in model.named_modules():
        d = _depth(name)
        if d > depth:
            continue
        n = t = 0
        for p in m.parameters():
            n += p.numel()
            if p.requires_grad:
                t += p.numel()
        rows.append(ModuleRow(name, type(m).__name__, d, outputs.get(name), n, t))
    params = list(model.parameters())
    return Summary(model_type=type(model).__name__, rows=rows,
                   parameters=sum(p.numel() for p in params),
                   trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
                   param_bytes=_bytes_by_dtype(params), buffer_bytes=_bytes_by_dtype(list(model.buffers())),
                   input_shapes=input_shapes, output_shape=out_shape, depth=depth)


# --------------------------------------------------------------------------------------------------
# everything at once (what `torchgraft inspect` prints)
# --------------------------------------------------------------------------------------------------
@dataclass
class Inspection:
    """Summary, FLOPs and memory of one model; `to_dict()` is `torchgraft inspect --json`."""

    name: str
    summary: Summary
    flops: Any  # flops.FlopsReport
    memory: Any  # memory.MemoryEstimate

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.name, "parameters": self.summary.parameters,
                               "trainable_parameters": self.summary.trainable_parameters}
        f = self.flops
        if f.unit == "token":
            # training FLOPs per token: the analytic 6N + 12LHT when the config describes a transformer
            out["flops_per_token"] = f.analytic_training if f.analytic_training else f.measured_training
        else:
            out["flops_per_sample"] = f.measured_training
        out["flops"] = f.to_dict()
        out["memory_bytes"] = self.memory.to_dict()
        out["memory_settings"] = self.memory.settings()
        out["param_bytes"] = self.summary.param_bytes
        out["summary"] = self.summary.to_dict()
        return out

    def print(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        self.summary.print(console)
        f = self.flops
        t = Table(title=f"training FLOPs per {f.unit}" + (f" (T={f.seq_len})" if f.seq_len else ""))
        t.add_column("count")
        t.add_column("FLOPs", justify="right")
        t.add_row("measured forward", f"{f.measured_forward:,.0f}")
        t.add_row("measured forward+backward", f"{f.measured_training:,.0f}")
        if f.analytic_training:
            t.add_row(f"analytic 6N + 12LHT (N={f.n_params:,})", f"{f.analytic_training:,.0f}")
            t.add_row("measured / analytic", f"{f.ratio:.3f}")
        console.print(t)
        console.print(self.memory.table())


def _identical_layers(model: nn.Module, n_layer: int) -> str | None:
    """The name of the model's largest ModuleList when it holds `n_layer` blocks of the same type and
    weights, else None."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layer]
    if not lists:
        return None
    list_name, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))

    def signature(b: nn.Module) -> list:
        return [type(b).__name__] + [(n, tuple(p.shape), p.dtype) for n, p in b.named_parameters()]

    first = signature(blocks[0])
    return list_name if all(signature(b) == first for b in blocks) else None


def summary_from_shallow(model: nn.Module, shallow: Summary, blocks: str, depth: int) -> Summary:
    """The summary of `model` whose layers `blocks.0..N-1` are identical, from the summary of a
    shallower build of it (`blocks.0..k-1`, same widths): block i >= k has block k-1's output shapes,
    everything else the same shapes (so a 70B model's table needs no forward pass through 80 layers)."""
    shapes = {r.name: r.output_shape for r in shallow.rows}
    k = max(1, sum(1 for r in shallow.rows if r.name.rpartition(".")[0] == blocks))
    outputs = {name: shapes.get(_shallow_name(name, blocks, k)) for name, _ in model.named_modules()}
    return _summary_of(model, depth, outputs, shallow.input_shapes, shallow.output_shape)


def inspect_model(spec: Any, overrides: dict[str, Any] | None = None, *, batch: int = 1,
                  seq_len: int | None = None, precision: str = "fp32", optimizer: str = "adamw",
                  sharding: int = 1, activation_checkpointing: bool | int | str = False, depth: int = 2,
                  chunked_ce: int | None = None) -> Inspection:
    """Build a registered model (name, YAML path, mapping or config) on the meta device and report
    its summary, FLOPs (per token for token models, per sample otherwise) and memory estimate.
    An `nn.Module` is inspected as is (it needs a `config` describing its input)."""
    from torchgraft.tools.flops import FlopRecorder, batch_size_of, flops_report
    from torchgraft.tools.memory import PRECISIONS, ActivationRecorder, _choice, estimate_memory

    if seq_len is not None and seq_len < 1:
        raise InspectError(f"seq_len must be >= 1, got {seq_len}")
    if batch < 1:
        raise InspectError(f"batch must be >= 1, got {batch}")
    prec = _choice("precision", precision, PRECISIONS)
    if isinstance(spec, nn.Module):
        model, name = spec, type(spec).__name__
        run, blocks = model, None
    else:
        from torchgraft.models.registry import build

        overrides = dict(overrides or {})
        model = build(spec, device="meta", **overrides)
        name = getattr(model, "model_name", str(spec))
        n_layer = getattr(getattr(model, "config", None), "n_layer", None)
        blocks = _identical_layers(model, n_layer) if isinstance(n_layer, int) and n_layer > 2 else None
        # Layers of a zoo transformer are identical: the pass runs a 2-layer build, and every layer
        # beyond the second costs what the second did (FLOPs, saved bytes, output shapes; exact,
        # tests compare it with a pass through every layer).
        run = build(spec, device="meta", **{**overrides, "n_layer": 2}) if blocks else model
    args, kwargs = make_inputs(run, batch=batch, seq_len=seq_len)
    shapes, flops, acts = ShapeRecorder(depth, (args, kwargs)), FlopRecorder(), ActivationRecorder(run)
    record_pass(run, args, kwargs, [shapes, flops, acts], dtype=prec.activation)
    count, trace, s = flops.count(run, batch_size_of(args, kwargs)), acts.trace(), shapes.summary(run)
    if blocks is not None:
        count, trace = _deeper(model, blocks, count, flops, trace)
        s = summary_from_shallow(model, s, blocks, depth)
    f = flops_report(model, seq_len=seq_len, count=count.per_sample())
    m = estimate_memory(model, batch=batch, seq_len=seq_len, precision=precision, optimizer=optimizer,
                        sharding=sharding, activation_checkpointing=activation_checkpointing, trace=trace,
                        chunked_ce=chunked_ce)
    return Inspection(name, s, f, m)


def _deeper(model: nn.Module, blocks: str, count: Any, flops: Any, trace: Any) -> tuple[Any, Any]:
    """FlopCount and ActivationTrace of `model` (n_layer identical `blocks`) from a pass through a
    2-layer build of it: each further layer adds what layer 1 did."""
    from torchgraft.tools.flops import FlopCount
    from torchgraft.tools.memory import ActivationTrace

    n_layer = model.config.n_layer
    extra = n_layer - 2
    last = f"{blocks}.1"
    fwd = count.forward + extra * flops.forward_by_module.get(last, 0)
    fb = count.forward_backward + extra * count.by_module.get(last, 0)
    ran = flops.matmul_names()
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if _shallow_name(n, blocks, 2) in ran)
    deep_count = FlopCount(fwd, fb, n_matmul, count.batch)
    deep_trace = ActivationTrace(trace.total + extra * trace.blocks[-1], trace.loss_buffers,
                                 trace.blocks[-1:] * n_layer, trace.block_inputs[-1:] * n_layer,
                                 trace.logits_shape, trace.hidden_width)
    return deep_count, deep_trace


def _shallow_name(name: str, blocks: str, k: int) -> str:
    """The name in a k-layer build of what `name` is in the deep one (block i >= k -> block k-1)."""
    prefix = blocks + "."
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix):].partition(".")
    return prefix + str(min(int(index), k - 1)) + ("." + rest if rest else "")

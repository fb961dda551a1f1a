"""Export a model out of torchgraft: a `torch.export` program (`.pt2`) or an ONNX file.

`export(model, example, format="onnx"|"pt2", path=PATH)` = choose the input kind (an `ExportSpec`,
export_spec.py / export_specs/), trace its module once with `torch.export.export(strict=False)`
(dynamic batch, and sequence for token models; export_trace.py), write, and optionally check:
- `pt2`: `torch.export.save` (reload with `torch.export.load(path).module()`), the torchgraft
  metadata in the archive's `extra/torchgraft.json`;
- `onnx`: `torch.onnx.export(program, dynamo=True)` at opset `ONNX_OPSET`, the graph passes of
  onnx_passes.py, named dynamic axes, external data (`PATH.data`) above 2 GB, and the metadata in the
  model's `metadata_props` (`torchgraft.name`, `.family`, `.config`, `.labels`, `.kind`, ...;
  export_metadata.py);
- `check=True`: onnxruntime / the reloaded program against eager PyTorch (export_check.py).

The input kinds (docs/export.md): `image` (`images` (B, C, H, W)), `tokens` (`input_ids` (B, T), plus
`attention_mask` when forward takes one), `text-pair` (+ `token_type_ids`), `tensors` (any module:
`input_0`, ...) and `decode-step` (`kv_cache=True`: past keys/values in, logits and present
keys/values out, for `torchgraft.interop.onnx_generate`). A model with unmerged LoRA adapters is
merged into a copy first (a warning says so). A trace failure is one `ExportError` line.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.interop.export_check import (check_export, check_files, max_abs_diff, ort_session,  # noqa: F401
                                             run_exported)
from torchgraft.interop.export_metadata import PT2_METADATA, model_metadata, read_metadata  # noqa: F401
from torchgraft.interop.export_result import ExportResult
from torchgraft.interop.export_spec import (DYNAMIC_AXES, EXPORT_SPECS, ExportSpec, FlatInputs,  # noqa: F401
                                            config_of, example_inputs, is_token_input, named_axes, random_like,
                                            register_export_spec, wanted_axes)
from torchgraft.interop.export_specs import (DecodeStep, choose_spec, eager_module, get_spec,  # noqa: F401
                                             is_decoder_lm)
from torchgraft.interop.export_trace import explain, quiet, trace
from torchgraft.interop.onnx_passes import bool_where_to_logic, name_dims

ONNX_OPSET = 18  # default opset of the ONNX files torchgraft writes
EXTERNAL_DATA_BYTES = 2 * 1024 ** 3 - 64 * 1024 ** 2  # protobuf's 2 GB limit, with headroom
Format = Literal["onnx", "pt2"]
FORMATS = ("onnx", "pt2")


# ---- choosing the spec -------------------------------------------------------------------------------
def build_spec(model: nn.Module, example: Any = None, *, spec: str | type[ExportSpec] | None = None,
               kv_cache: bool = False, dynamic: Any = True,
               output_names: Sequence[str] | None = None) -> ExportSpec:
    """The spec `export` traces: `spec` by name (or class), the decode step for `kv_cache=True`, else
    the first registered spec (by priority) that accepts `example` (default: the model's own example
    inputs); its dynamic axes as `dynamic` asks, `output_names` if given."""
    if kv_cache:
        if spec not in (None, "decode-step"):
            raise ConfigError(f"kv_cache=True exports the decode step; it cannot be combined with spec={spec!r}")
        spec = "decode-step"
    cls = get_spec(spec) if spec is not None else None
    if example is None:
        example = (cls or ExportSpec).default_example(model)
    example = (example,) if torch.is_tensor(example) else tuple(example or ())
    if cls is None:
        cls = choose_spec(model, example)
    built = cls(model, example, wanted_axes(dynamic))
    if isinstance(dynamic, Mapping):
        built.dynamic_axes = named_axes(dynamic, built.input_names)
    if output_names:
        built.output_names = list(output_names)
    return built


# ---- writing -----------------------------------------------------------------------------------------
def _nbytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success its files move into place (data files first,
    then the main file, each with os.replace), so a failed export never leaves half a file."""
    from torchgraft.outputs import clean_stale_staging, staging_name

    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(path)  # what a killed export of the same file left behind
    tmp = Path(tempfile.mkdtemp(prefix=staging_name(path), dir=path.parent))
    try:
        yield tmp / path.name
        files = sorted(tmp.iterdir(), key=lambda f: f.name == path.name)
        for f in files:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_onnx(ep: torch.export.ExportedProgram, spec: ExportSpec, output_names: list[str], path: Path,
                opset: int, metadata: dict[str, str], external: bool, name: str) -> None:
    try:
        with quiet():
            prog = torch.onnx.export(ep, (), input_names=spec.input_names, output_names=output_names,
                                     opset_version=opset, dynamo=True, verbose=False, optimize=True)
    except Exception as e:  # noqa: BLE001
        raise explain(e, name) from e
    graph = prog.model.graph
    bool_where_to_logic(graph)
    name_dims(graph, spec.dynamic_axes)
    prog.model.metadata_props.update(metadata)
    prog.model.producer_name = "torchgraft"
    with _staged(path) as tmp:
        with quiet():
            prog.save(str(tmp), external_data=external)


def _write_pt2(ep: torch.export.ExportedProgram, path: Path, metadata: dict[str, str]) -> None:
    with _staged(path) as tmp:
        torch.export.save(ep, str(tmp), extra_files={PT2_METADATA: json.dumps(metadata)})


def merged_copy(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` with its LoRA/DoRA adapters folded in (the model itself is unchanged), and
    the number of adapters that were not merged yet (0 for an already merged model, which exports
    like any other; a model without adapters is returned as it is)."""
    from torchgraft.peft.lora import lora_layers, unload

    layers = lora_layers(model)
    if not layers:
        return model, 0
    unmerged = sum(not l.merged for l in layers.values())
    twin = copy.deepcopy(model)
    unload(twin, merge=True)  # wrappers replaced by their (merged) base layers: plain weights in the graph
    return twin, unmerged


def quantized_path(path: Path) -> Path:
    return path.with_name(path.stem + ".int8" + path.suffix)


def _output_path(model: nn.Module, path: str | Path | None, format: str, quantize: str | None,
                 overwrite: bool) -> Path:
    """The file to write (default `<model name>.<format>`), refused before anything is traced when
    it (or its int8 twin) exists and `overwrite` is off, or when it is a directory."""
    from torchgraft.outputs import check_output_file

    name = getattr(model, "model_name", type(model).__name__)
    safe = re.sub(r"[^\w.-]", "_", name)
    out = Path(path) if path is not None else Path(f"{safe}.{format}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file path such as {out / (name + '.' + format)}")
    for target in (out, *([quantized_path(out)] if quantize else [])):
        check_output_file(target, overwrite=overwrite, suffixes=(f".{format}",), kind=f"format={format!r}")
    return out


def _check_arguments(model: Any, format: str, quantize: str | None) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; use onnx or pt2")
    if quantize not in (None, "int8"):
        raise ConfigError(f"unknown quantisation {quantize!r}; use int8")
    if quantize and format != "onnx":
        raise ConfigError("quantize='int8' is for ONNX (onnxruntime's dynamic quantiser); use format='onnx'")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"export needs an nn.Module, got {type(model).__name__}")


def _without_adapters(model: nn.Module, notes: list[str]) -> nn.Module:
    """`merged_copy(model)`, with a warning (and a note) when it merged anything."""
    work, merged = merged_copy(model)
    if merged:
        msg = (f"merged {merged} LoRA adapter(s) into a copy of the model before export "
               "(the model you passed keeps its adapters)")
        warnings.warn(msg, UserWarning, stacklevel=3)
        notes.append(msg)
    return work


def _write(ep: torch.export.ExportedProgram, spec: ExportSpec, output_names: list[str], path: Path,
           format: str, opset: int, meta: dict[str, str], name: str, notes: list[str]) -> None:
    if format == "pt2":
        _write_pt2(ep, path, meta)
        return
    external = _nbytes(spec.model) > EXTERNAL_DATA_BYTES
    _write_onnx(ep, spec, output_names, path, opset, meta, external, name)
    if external:
        notes.append(f"weights stored as external data in {path.name}.data (model over 2 GB)")


def export(model: nn.Module, example: Any = None, format: Format = "onnx", path: str | Path | None = None, *,
           dynamic: bool | str | Sequence[str] | Mapping[str, Mapping[int, str]] = True,
           kv_cache: bool = False, spec: str | type[ExportSpec] | None = None, opset: int = ONNX_OPSET,
           metadata: Mapping[str, Any] | None = None, output_names: Sequence[str] | None = None,
           check: bool = False, quantize: str | None = None, overwrite: bool = False) -> ExportResult:
    """Export `model` to `path` as ONNX (`format="onnx"`) or a torch.export program (`"pt2"`).

    `example`: a tensor or tuple of the positional inputs of forward (default: `example_inputs(model)`
    for zoo models; required for your own module). `dynamic`: True (batch, and seq for token inputs),
    False / "none", "batch", ["batch", "seq"], or {input name: {axis: dim name}}. `kv_cache=True`:
    a decoder LM's decode step (`DecodeStep`) instead of logits-only. `spec`: the input kind by name
    ("image", "tokens", "text-pair", "tensors", "decode-step" or a registered one; default: chosen
    from `example`). `metadata`: extra entries (labels, tokenizer, ...). `check`: run the file
    (onnxruntime / the reloaded program) and set `max_abs_diff` against eager. `quantize="int8"`
    (ONNX): also write `PATH.int8.onnx`. `path` must end in `.onnx` / `.pt2` as `format` says; an
    existing file there (or at the int8 path) is refused unless `overwrite=True`, before tracing.
    """
    _check_arguments(model, format, quantize)
    path = _output_path(model, path, format, quantize, overwrite)
    name = getattr(model, "model_name", type(model).__name__)
    notes: list[str] = []
    work = _without_adapters(model, notes)
    was_training = work.training
    work.eval()
    try:
        sp = build_spec(work, example, spec=spec, kv_cache=kv_cache, dynamic=dynamic, output_names=output_names)
        ep = trace(sp, name)
        n_out = len(ep.graph_signature.user_outputs)
        outs = (sp.output_names + [f"output_{i}" for i in range(len(sp.output_names), n_out)])[:n_out]
        file_opset = opset if format == "onnx" else None
        meta = model_metadata(work, sp, outs, metadata, file_opset)
        _write(ep, sp, outs, path, format, opset, meta, name, notes)
        result = ExportResult(path=path, format=format, kind=sp.kind, input_names=sp.input_names,
                              output_names=outs, dynamic_axes=sp.dynamic_axes, metadata=meta,
                              opset=file_opset, notes=notes, spec=sp.name)
        if quantize:
            from torchgraft.interop.quantize import quantize_int8

            result.quantized_path = quantize_int8(path, quantized_path(path))
        if check:
            check_files(result, sp.eager_module(), [sp.example(), *sp.more_examples()])
        return result
    finally:
        work.train(was_training)

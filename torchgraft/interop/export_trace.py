"""Tracing an `ExportSpec` with `torch.export`, and trace failures as one `ExportError` line.

A failure names its cause and where it is in the user's code (a data-dependent `if`, a size the
model fixes), not the exporter's traceback; the original exception is its `__cause__`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import traceback
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from torchgraft.errors import ExportError

if TYPE_CHECKING:
    from torchgraft.interop.export_spec import ExportSpec

_TORCH_DIR = os.path.dirname(torch.__file__)
_EXPORT_FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export")  # export*.py, export_specs/


def _user_frame(exc: BaseException) -> str:
    """'file.py:LINE (`code`)' of the innermost frame outside torch and torchgraft's export code, or ''."""
    for f in reversed(traceback.extract_tb(exc.__traceback__)):
        fn = os.path.abspath(f.filename)
        if not fn.startswith(_TORCH_DIR) and not fn.startswith(_EXPORT_FILES) and "site-packages" not in fn:
            code = f" (`{f.line.strip()}`)" if f.line else ""
            rel = os.path.relpath(fn)
            return f"{rel if not rel.startswith('..') else fn}:{f.lineno}{code}"
    return ""


def explain(exc: BaseException, name: str) -> ExportError:
    """One line for an exporter failure of model `name`: what is wrong, where, and the fix."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    where = _user_frame(exc)
    at = f" at {where}" if where else ""
    text = str(exc)
    if isinstance(exc, GuardOnDataDependentSymNode) or "data-dependent" in text or "data dependent" in text:
        return ExportError(f"cannot export {name}: its forward branches on a tensor's value{at}; "
                           "torch.export needs one graph for every input: replace the Python `if` on "
                           "tensor data with torch.where / torch.cond, or move it out of forward")
    if "Constraints violated" in text or "specialized" in text or "must be specialized" in text:
        dims = re.findall(r"Constraints violated \((\w+)\)", text) or re.findall(r"\b(batch|seq)\b", text)
        value = re.search(r"constant \((\d+)\)", text)
        what = (f" the `{dims[0]}` size" if dims else " an input size") + (f" to {value.group(1)}" if value else "")
        return ExportError(f"cannot export {name} with dynamic shapes: it fixes{what}{at} "
                           "(a shape check or a branch on the size); remove it or export with "
                           "--dynamic none (dynamic=False)")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ExportError(f"cannot export {name}: {type(exc).__name__}: {first[:300]}{at}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, log records and warnings (errors still propagate)."""
    previous = logging.root.manager.disable
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def dynamic_shapes(spec: ExportSpec) -> tuple[Any, ...]:
    """torch.export's `dynamic_shapes` for the spec: one `Dim` per dim name (`seq` bounded by
    `spec.max_seq`), `Dim.AUTO` for the derived axes, arranged as the spec's module takes them."""
    dims: dict[str, Any] = {}
    per_input: list[Any] = []
    for name in spec.input_names:
        shape: dict[int, Any] = {}
        for axis, dim_name in spec.dynamic_axes.get(name, {}).items():
            if dim_name not in dims:
                kw = {"max": spec.max_seq} if dim_name == "seq" and spec.max_seq else {}
                dims[dim_name] = torch.export.Dim(re.sub(r"\W", "_", dim_name), **kw)
            shape[axis] = dims[dim_name]
        for axis in spec.derived_axes.get(name, {}):
            shape[axis] = torch.export.Dim.AUTO
        per_input.append(shape or None)
    return spec.arrange(per_input)


def trace(spec: ExportSpec, name: str) -> torch.export.ExportedProgram:
    """`torch.export.export(strict=False)` of the spec's module on its example, failures as one
    ExportError line."""
    try:
        with quiet(), torch.no_grad():
            return torch.export.export(spec.eager_module(), spec.example(), dynamic_shapes=dynamic_shapes(spec),
                                       strict=False)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - every trace failure is reported as one line
        raise explain(e, name) from e

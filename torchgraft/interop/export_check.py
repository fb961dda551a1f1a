"""Running an exported file (onnxruntime for `.onnx`, `torch.export.load` for `.pt2`) and checking it
against eager PyTorch: the max abs difference over every output, on each example."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgraft.errors import ExportError
from torchgraft.interop.export_result import ExportResult


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for an exported file (`threads`: intra-op threads, default ORT's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_exported(path: str | Path, inputs: Sequence[torch.Tensor], session: Any = None) -> list[torch.Tensor]:
    """Run an exported `.onnx` (onnxruntime) or `.pt2` (torch.export.load) file on `inputs`."""
    p = Path(path)
    if p.suffix == ".pt2":
        prog = torch.export.load(str(p)).module()
        with torch.no_grad():
            out = prog(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]
    sess = session or ort_session(p)
    feed = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feed)]


def _flat(out: Any) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if hasattr(out, "logits"):
        return [out.logits]
    return [t for t in out if torch.is_tensor(t)]


def max_abs_diff(path: str | Path, module: nn.Module, inputs: Sequence[torch.Tensor], session: Any = None) -> float:
    """Largest |exported - eager| over every output, for one set of inputs."""
    with torch.no_grad():
        ref = _flat(module(*inputs))
    got = run_exported(path, inputs, session)
    if len(got) != len(ref):
        raise ExportError(f"{path} returned {len(got)} outputs, eager PyTorch {len(ref)}")
    return max(float((g.float() - r.detach().cpu().float()).abs().max()) if r.numel() else 0.0
               for g, r in zip(got, ref))


def check_files(result: ExportResult, module: nn.Module, examples: Sequence[Sequence[torch.Tensor]]) -> ExportResult:
    """Run the exported file (and its int8 copy) on each set of `examples` (inputs in the file's
    order) against `module` (its eager twin) and record the max abs differences in `result`."""
    module = module.eval()
    session = ort_session(result.path) if result.format == "onnx" else None
    result.max_abs_diff = max(max_abs_diff(result.path, module, ex, session) for ex in examples)
    result.checked_shapes = [[tuple(t.shape) for t in ex[:1]] for ex in examples]
    if result.quantized_path is not None:
        qs = ort_session(result.quantized_path)
        result.quantized_max_abs_diff = max(max_abs_diff(result.quantized_path, module, ex, qs) for ex in examples)
    return result


def check_export(result: ExportResult, model: nn.Module, examples: Sequence[Sequence[torch.Tensor]]) -> ExportResult:
    """`check_files` against `model` wrapped as the file's spec (or, for a result without one, its
    kind) says."""
    from torchgraft.interop.export_specs import eager_module, get_spec

    module = (get_spec(result.spec).module_for(model, result.input_names) if result.spec
              else eager_module(model, result.kind, result.input_names))
    return check_files(result, module, examples)

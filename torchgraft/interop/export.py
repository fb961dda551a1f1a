"""Export a model out of torchgraft: a `torch.export` program (`.pt2`) or an ONNX file.

`export(model, example, format="onnx"|"pt2", path=PATH)` traces the model once with
`torch.export.export(strict=False)` (dynamic batch, and sequence for token models), then
- `pt2`: `torch.export.save` (reload with `torch.export.load(path).module()`), the torchgraft
  metadata in the archive's `extra/torchgraft.json`;
- `onnx`: `torch.onnx.export(program, dynamo=True)` at opset `ONNX_OPSET`, named dynamic axes,
  external data (`PATH.data`) above 2 GB, and the metadata in the model's `metadata_props`
  (`torchgraft.name`, `.family`, `.config`, `.labels`, `.tokenizer`, `.kind`, ...).

Inputs follow the forward contracts (docs/architecture.md): the first ONNX input is the image batch
(`images`, (B, C, H, W)) or `input_ids` (B, T) (token models whose forward takes an
`attention_mask` get it as the second input), the first output is `logits`. `kv_cache=True` exports
a decoder LM's decode step instead (`DecodeStep`: past keys/values in, logits and present keys/values
out) for `torchgraft.interop.onnx_generate`. A model with unmerged LoRA adapters is merged into a copy
first (a warning says so). A trace failure becomes one `ExportError` line naming the cause and
where it is (a data-dependent `if`, a size the model fixes), not the exporter's traceback.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import json
import logging
import os
import re
import shutil
import tempfile
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchgraft.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

ONNX_OPSET = 18  # default opset of the ONNX files torchgraft writes
EXTERNAL_DATA_BYTES = 2 * 1024 ** 3 - 64 * 1024 ** 2  # protobuf's 2 GB limit, with headroom
PT2_METADATA = "torchgraft.json"  # the extra file in a .pt2 archive that holds the metadata
Format = Literal["onnx", "pt2"]
FORMATS = ("onnx", "pt2")
DYNAMIC_AXES = ("batch", "seq")


@dataclass
class ExportResult:
    """What `export` wrote. `dynamic_axes`: {input name: {axis: dim name}}; `max_abs_diff`: the check
    against eager PyTorch (set by `check_export` / `export(check=True)`)."""
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

    def summary(self) -> str:
        ins = ", ".join(f"{n}{_axes_str(self.dynamic_axes.get(n, {}))}" for n in self.input_names[:3])
        more = f", ... ({len(self.input_names)} inputs)" if len(self.input_names) > 3 else ""
        opset = f", opset {self.opset}" if self.opset else ""
        return f"{self.path} ({self.format}{opset}, {self.kind}): inputs {ins}{more} -> {self.output_names[0]}"


def _axes_str(axes: Mapping[int, str]) -> str:
    return "[" + ", ".join(f"{a}:{n}" for a, n in sorted(axes.items())) + "]" if axes else ""


# ---- example inputs ---------------------------------------------------------------------------------
def config_of(model: nn.Module) -> Any:
    """The zoo Config of a model (or of a `TaskModel`'s backbone), else None."""
    for m in (model, getattr(model, "backbone", None)):
        cfg = getattr(m, "config", None)
        if dataclasses.is_dataclass(cfg):
            return cfg
    return None


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def example_inputs(model: nn.Module, batch_size: int = 2, seq_len: int | None = 8) -> tuple[torch.Tensor, ...]:
    """Positional example inputs of `model.forward` for a batch, with random values.

    The shapes come from the model (`torchgraft.tools.meta.example_inputs`: its declared
    `parts().example_inputs`, else its config's forward contract); the values are redrawn at random
    (token ids below `vocab_size`, normal floats) so that `check` compares on real data, not zeros.
    A user's own module declares none: pass `example` to `export`.
    """
    from torchgraft.tools.meta import example_inputs as declared_inputs

    shapes = declared_inputs(model, batch_size, seq_len, device=_device(model))
    if shapes is None:
        raise ConfigError(f"cannot make example inputs for {type(model).__name__} (it declares none and has "
                          "no zoo config); pass example=(tensor, ...) with the inputs of its forward")
    return random_like(model, shapes)


def random_like(model: nn.Module, inputs: Sequence[torch.Tensor], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random tensors with the shapes/dtypes/devices of `inputs`: normal floats, token ids below the
    model's `vocab_size` (or below the inputs' own maximum + 1), bools kept."""
    gen = torch.Generator().manual_seed(seed)
    vocab = getattr(config_of(model), "vocab_size", None)
    out = []
    for x in inputs:
        if x.dtype.is_floating_point:
            out.append(torch.randn(x.shape, generator=gen).to(x))
        elif x.dtype == torch.bool:
            out.append(x.clone())
        else:
            high = vocab or int(x.max()) + 1 if x.numel() else 1
            out.append(torch.randint(0, max(1, high), x.shape, generator=gen).to(x))
    return tuple(out)


def is_token_input(x: Any) -> bool:
    return torch.is_tensor(x) and x.dim() == 2 and not x.dtype.is_floating_point and x.dtype != torch.bool


def is_decoder_lm(model: nn.Module) -> bool:
    """The decoder-LM contract: `forward(input_ids, attention_mask, position_ids, kv_cache)` plus
    `make_kv_cache` (docs/architecture.md)."""
    return callable(getattr(model, "make_kv_cache", None))


def _takes(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# ---- modules that fix the exported signature ---------------------------------------------------------
class _Positional(nn.Module):
    """`model(*inputs[:n_positional], **{keyword: inputs[n_positional + i]})` with one flat tuple
    of tensors in, so input names and dynamic axes line up one-to-one with the graph inputs."""

    def __init__(self, model: nn.Module, n_positional: int, keywords: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.n_positional = n_positional
        self.keywords = tuple(keywords)

    def forward(self, *inputs: torch.Tensor) -> Any:
        pos, kw = inputs[: self.n_positional], inputs[self.n_positional:]
        out = self.model(*pos, **dict(zip(self.keywords, kw)))
        return out.logits if hasattr(out, "logits") else out


def eager_module(model: nn.Module, kind: str, input_names: Sequence[str]) -> nn.Module:
    """The module whose flat positional inputs are the exported file's inputs, in order: `DecodeStep`
    for a decode step; else `model` with `attention_mask` passed by keyword after `input_ids`."""
    if kind == "decode_step":
        return DecodeStep(model)
    if list(input_names) == ["input_ids", "attention_mask"]:
        return _Positional(model, 1, ["attention_mask"])
    return _Positional(model, len(input_names))


class _PastLayer:
    """One layer's view of `_PastKV`: `update` appends the new keys/values to the past ones."""

    def __init__(self, parent: "_PastKV", k: torch.Tensor, v: torch.Tensor):
        self.parent, self.k, self.v = parent, k, v

    @property
    def pos(self) -> Any:
        return self.parent.pos

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([self.k, k.to(self.k.dtype)], dim=2)  # (B, H_kv, P + T, D)
        v = torch.cat([self.v, v.to(self.v.dtype)], dim=2)
        self.parent.present += [k, v]
        return k, v


class _PastKV:
    """A KV cache (the `KVCache` protocol the zoo's decoders call: `pos`, `layer(i).update`,
    `advance`) whose past is graph inputs and whose present is graph outputs, not buffers."""

    def __init__(self, past: Sequence[torch.Tensor]):
        self.past = past
        self.present: list[torch.Tensor] = []
        self.pos = past[0].shape[2]

    def layer(self, i: int) -> _PastLayer:
        return _PastLayer(self, self.past[2 * i], self.past[2 * i + 1])

    def advance(self, n: int) -> None:
        pass


class DecodeStep(nn.Module):
    """One forward of a decoder LM over T new tokens with its KV cache as explicit tensors.

    `forward(input_ids (B, T), attention_mask (B, P + T), position_ids (B, T), past_key_0,
    past_value_0, ..., past_value_{L-1} (B, H_kv, P, D)) -> (logits (B, T, V), present_key_0, ...,
    present_value_{L-1} (B, H_kv, P + T, D))`. P = 0 (empty past tensors) is the prefill.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not is_decoder_lm(model):
            raise ConfigError(f"{type(model).__name__} is not a decoder LM (no make_kv_cache); "
                              "kv_cache=True / --kv-cache is for gpt/llama-style models")
        self.model = model
        probe = model.make_kv_cache(1, 1)
        self.n_layer, self.n_kv_head, self.head_dim = probe.n_layer, probe.n_kv_head, probe.head_dim
        self.cache_dtype = probe.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = _PastKV(past)
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            kv_cache=cache)
        return (logits, *cache.present)

    def cache_names(self, prefix: str) -> list[str]:
        return [f"{prefix}_{kv}_{i}" for i in range(self.n_layer) for kv in ("key", "value")]

    def example(self, batch_size: int = 2, seq_len: int = 3, past_len: int = 4,
                vocab_size: int = 2) -> tuple[torch.Tensor, ...]:
        device = _device(self.model)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(device)
        mask = torch.ones(batch_size, past_len + seq_len, dtype=torch.long, device=device)
        pos = torch.arange(past_len, past_len + seq_len, device=device)[None].expand(batch_size, -1)
        past = tuple(torch.randn(batch_size, self.n_kv_head, past_len, self.head_dim, generator=gen)
                     .to(device=device, dtype=self.cache_dtype) for _ in range(2 * self.n_layer))
        return (ids, mask, pos.contiguous(), *past)


# ---- signature: names and dynamic axes ---------------------------------------------------------------
@dataclass
class _Signature:
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    kind: str
    max_seq: int | None = None
    derived: dict[str, dict[int, str]] = field(default_factory=dict)  # axes torch.export infers

    def axes_for(self, name: str) -> dict[int, str]:
        return self.dynamic_axes.get(name, {})


def _wanted_axes(dynamic: bool | str | Sequence[str] | None) -> set[str]:
    if dynamic is None or dynamic is True:
        return set(DYNAMIC_AXES)
    if dynamic is False:
        return set()
    items = [dynamic] if isinstance(dynamic, str) else list(dynamic)
    items = [s.strip() for x in items for s in str(x).split(",") if s.strip()]
    if items in (["none"], ["static"]):
        return set()
    bad = [a for a in items if a not in DYNAMIC_AXES]
    if bad:
        raise ConfigError(f"unknown dynamic axis {bad[0]!r}; use batch, seq, 'batch,seq' or none")
    return set(items)


def _signature(model: nn.Module, example: tuple[Any, ...], dynamic: Any, kv_cache: bool,
               output_names: Sequence[str] | None) -> _Signature:
    wanted = _wanted_axes(dynamic) if not isinstance(dynamic, Mapping) else set()
    cfg = config_of(model)
    block = getattr(cfg, "block_size", None)
    if kv_cache:
        step = DecodeStep(model)
        vocab = getattr(cfg, "vocab_size", 2)
        inputs = step.example(vocab_size=vocab)
        names = ["input_ids", "attention_mask", "position_ids", *step.cache_names("past")]
        outs = ["logits", *step.cache_names("present")]
        axes: dict[str, dict[int, str]] = {}
        derived: dict[str, dict[int, str]] = {}
        b = {0: "batch"} if "batch" in wanted else {}
        s = {1: "seq"} if "seq" in wanted else {}
        axes["input_ids"] = {**b, **s}
        axes["position_ids"] = {**b, **s}
        axes["attention_mask"] = dict(b)
        derived["attention_mask"] = {1: "past_seq + seq"}
        for n in names[3:]:
            axes[n] = {**b, 2: "past_seq"}
        for n in outs[1:]:
            derived[n] = {2: "past_seq + seq"}
        return _Signature(step, inputs, names, outs, axes, "decode_step", None, derived)

    tensors = [x for x in example if torch.is_tensor(x)]
    if len(tensors) != len(example):
        raise ConfigError("example must be a tensor or a tuple of tensors (the positional inputs of forward)")
    if isinstance(dynamic, Mapping):
        axes_in = {str(k): {int(a): str(n) for a, n in v.items()} for k, v in dynamic.items()}
    else:
        axes_in = None
    if example and is_token_input(example[0]):
        inputs = list(example)
        names = ["input_ids"] + [f"input_{i}" for i in range(1, len(example))]
        if len(example) == 1 and _takes(model, "attention_mask"):
            inputs.append(torch.ones_like(example[0]))
            names.append("attention_mask")
        module = eager_module(model, "logits", names)
        token_axes = {**({0: "batch"} if "batch" in wanted else {}), **({1: "seq"} if "seq" in wanted else {})}
        axes = {n: dict(token_axes) if inputs[i].dim() == 2 else {} for i, n in enumerate(names)}
        max_seq = block
    else:
        inputs = list(example)
        names = ["images"] if example and example[0].dim() == 4 and example[0].dtype.is_floating_point \
            else ["input_0"]
        names += [f"input_{i}" for i in range(1, len(example))]
        module = eager_module(model, "logits", names)
        axes = {n: ({0: "batch"} if "batch" in wanted and inputs[i].dim() > 0 else {})
                for i, n in enumerate(names)}
        max_seq = None
    if axes_in is not None:
        unknown = [k for k in axes_in if k not in names]
        if unknown:
            raise ConfigError(f"dynamic axes name unknown input {unknown[0]!r}; inputs are {', '.join(names)}")
        axes = {n: axes_in.get(n, {}) for n in names}
    return _Signature(module, tuple(inputs), names, list(output_names or ["logits"]), axes, "logits", max_seq)


def _dynamic_shapes(sig: _Signature) -> tuple[Any, ...]:
    dims: dict[str, Any] = {}
    specs: list[Any] = []
    for name, x in zip(sig.input_names, sig.inputs):
        spec: dict[int, Any] = {}
        for axis, dim_name in sig.axes_for(name).items():
            if dim_name not in dims:
                kw = {"max": sig.max_seq} if dim_name == "seq" and sig.max_seq else {}
                dims[dim_name] = torch.export.Dim(re.sub(r"\W", "_", dim_name), **kw)
            spec[axis] = dims[dim_name]
        for axis in sig.derived.get(name, {}):
            spec[axis] = torch.export.Dim.AUTO
        specs.append(spec or None)
    if sig.kind == "decode_step":  # DecodeStep.forward(input_ids, attention_mask, position_ids, *past)
        return (*specs[:3], tuple(specs[3:]))
    return (tuple(specs),)  # _Positional.forward(*inputs)


# ---- trace failures -> one line ----------------------------------------------------------------------
_TORCH_DIR = os.path.dirname(torch.__file__)


def _user_frame(exc: BaseException) -> str:
    """'file.py:LINE (`code`)' of the innermost frame outside torch and this module, or ''."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = {os.path.abspath(__file__)}
    for f in reversed(frames):
        fn = os.path.abspath(f.filename)
        if not fn.startswith(_TORCH_DIR) and fn not in mine and "site-packages" not in fn:
            code = f" (`{f.line.strip()}`)" if f.line else ""
            return f"{os.path.relpath(fn) if not os.path.relpath(fn).startswith('..') else fn}:{f.lineno}{code}"
    return ""


def _explain(exc: BaseException, name: str) -> ExportError:
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
def _quiet():
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


def trace(sig: _Signature, name: str) -> torch.export.ExportedProgram:
    """`torch.export.export` of the signature's module, failures as one ExportError line."""
    try:
        with _quiet(), torch.no_grad():
            return torch.export.export(sig.module, sig.inputs, dynamic_shapes=_dynamic_shapes(sig),
                                       strict=False)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - every trace failure is reported as one line
        raise _explain(e, name) from e


# ---- metadata ----------------------------------------------------------------------------------------
def model_metadata(model: nn.Module, sig: _Signature, extra: Mapping[str, Any] | None = None,
                   opset: int | None = None) -> dict[str, str]:
    """String key/values written into the file: name, family, config, labels, tokenizer, kind, I/O."""
    from torchgraft import __version__

    cfg = config_of(model)
    meta: dict[str, Any] = {"name": getattr(model, "model_name", type(model).__name__),
                            "kind": sig.kind, "inputs": sig.input_names, "outputs": sig.output_names,
                            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in sig.dynamic_axes.items()},
                            "version": __version__}
    if cfg is not None:
        from torchgraft.config import to_dict
        from torchgraft.models.registry import family_of_config

        with contextlib.suppress(Exception):
            meta["family"] = family_of_config(cfg).name
        meta["config"] = to_dict(cfg)
    if opset is not None:
        meta["opset"] = opset
    if isinstance(sig.module, DecodeStep):
        meta["kv_cache"] = {"n_layer": sig.module.n_layer, "n_kv_head": sig.module.n_kv_head,
                            "head_dim": sig.module.head_dim, "dtype": str(sig.module.cache_dtype).removeprefix("torch."),
                            "block_size": getattr(cfg, "block_size", None)}
    for k, v in (extra or {}).items():
        if v is not None:
            meta[k] = v
    return {f"torchgraft.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The torchgraft metadata of an exported `.onnx` or `.pt2` file, JSON values decoded."""
    p = Path(path)
    if p.suffix == ".pt2":
        import zipfile

        with zipfile.ZipFile(p) as z:
            name = next((n for n in z.namelist() if n.endswith(f"extra/{PT2_METADATA}")), None)
            raw = json.loads(z.read(name)) if name else {}
    else:
        import onnx

        m = onnx.load(str(p), load_external_data=False)
        raw = {prop.key: prop.value for prop in m.metadata_props}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.removeprefix("torchgraft.")
        try:
            out[key] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[key] = v
    return out


# ---- ONNX graph passes ------------------------------------------------------------------------------
def _bool_where_to_logic(graph: Any) -> int:
    """onnxruntime has no boolean `Where` kernel: rewrite Where(c, x, y) on bools as
    Or(And(c, x), And(Not(c), y)) (the same broadcasting). Returns the count rewritten."""
    import onnx_ir as ir

    n = 0
    for node in list(graph.all_nodes()):
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx") or node.outputs[0].dtype != ir.DataType.BOOL:
            continue
        c, x, y = node.inputs
        g = node.graph
        not_c = ir.node("Not", [c])
        a = ir.node("And", [c, x])
        b = ir.node("And", [not_c.outputs[0], y])
        o = ir.node("Or", [a.outputs[0], b.outputs[0]])
        o.outputs[0].dtype = ir.DataType.BOOL
        o.outputs[0].shape = node.outputs[0].shape
        g.insert_before(node, [not_c, a, b, o])
        old = node.outputs[0]
        ir.convenience.replace_all_uses_with(old, o.outputs[0])
        if old in g.outputs:
            g.outputs[g.outputs.index(old)] = o.outputs[0]
            o.outputs[0].name = old.name
        g.remove(node, safe=True)
        n += 1
    return n


def _name_dims(graph: Any, sig: _Signature) -> None:
    """Give the graph's symbolic dims the names of `dynamic_axes` ('batch', 'seq', 'past_seq + seq')."""
    import onnx_ir as ir

    rename: dict[str, str] = {}
    by_name = {v.name: v for v in graph.inputs}
    for name, axes in sig.dynamic_axes.items():
        v = by_name.get(name)
        if v is None or v.shape is None:
            continue
        for axis, dim_name in axes.items():
            d = v.shape[axis]
            if isinstance(d, ir.SymbolicDim) and d.value and re.fullmatch(r"s\d+", d.value):
                rename[d.value] = dim_name

    def fix(v: Any) -> None:
        if v.shape is None:
            return
        dims = []
        for d in v.shape:
            if isinstance(d, ir.SymbolicDim) and d.value:
                d = ir.SymbolicDim(re.sub(r"\bs\d+\b", lambda m: rename.get(m.group(0), m.group(0)), d.value))
            dims.append(d)
        v.shape = ir.Shape(dims)

    for v in [*graph.inputs, *graph.outputs]:
        fix(v)


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
def _staged(path: Path):
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


def _write_onnx(ep: torch.export.ExportedProgram, sig: _Signature, path: Path, opset: int,
                metadata: dict[str, str], external: bool, name: str) -> None:
    try:
        with _quiet():
            prog = torch.onnx.export(ep, (), input_names=sig.input_names, output_names=sig.output_names,
                                     opset_version=opset, dynamo=True, verbose=False, optimize=True)
    except Exception as e:  # noqa: BLE001
        raise _explain(e, name) from e
    graph = prog.model.graph
    _bool_where_to_logic(graph)
    _name_dims(graph, sig)
    prog.model.metadata_props.update(metadata)
    prog.model.producer_name = "torchgraft"
    with _staged(path) as tmp:
        with _quiet():
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


def export(model: nn.Module, example: Any = None, format: Format = "onnx", path: str | Path | None = None, *,
           dynamic: bool | str | Sequence[str] | Mapping[str, Mapping[int, str]] = True,
           kv_cache: bool = False, opset: int = ONNX_OPSET, metadata: Mapping[str, Any] | None = None,
           output_names: Sequence[str] | None = None, check: bool = False,
           quantize: str | None = None, overwrite: bool = False) -> ExportResult:
    """Export `model` to `path` as ONNX (`format="onnx"`) or a torch.export program (`"pt2"`).

    `example`: a tensor or tuple of the positional inputs of forward (default: `example_inputs(model)`
    for zoo models; required for your own module). `dynamic`: True (batch, and seq for token inputs),
    False / "none", "batch", ["batch", "seq"], or {input name: {axis: dim name}}. `kv_cache=True`:
    a decoder LM's decode step (`DecodeStep`) instead of logits-only. `metadata`: extra entries
    (labels, tokenizer, ...). `check`: run the file (onnxruntime / the reloaded program) and set
    `max_abs_diff` against eager. `quantize="int8"` (ONNX): also write `PATH.int8.onnx`.
    `path` must end in `.onnx` / `.pt2` as `format` says; an existing file there (or at the int8 path)
    is refused unless `overwrite=True`, before anything is traced.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; use onnx or pt2")
    if quantize not in (None, "int8"):
        raise ConfigError(f"unknown quantisation {quantize!r}; use int8")
    if quantize and format != "onnx":
        raise ConfigError("quantize='int8' is for ONNX (onnxruntime's dynamic quantiser); use format='onnx'")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"export needs an nn.Module, got {type(model).__name__}")
    name = getattr(model, "model_name", type(model).__name__)
    safe = re.sub(r"[^\w.-]", "_", name)
    path = Path(path) if path is not None else Path(f"{safe}.{format}")
    if path.is_dir():
        raise ConfigError(f"--out {path} is a directory; give a file path such as {path / (name + '.' + format)}")
    from torchgraft.outputs import check_output_file

    for target in (path, *([quantized_path(path)] if quantize else [])):
        check_output_file(target, overwrite=overwrite, suffixes=(f".{format}",), kind=f"format={format!r}")
    notes: list[str] = []
    work, merged = merged_copy(model)
    if merged:
        msg = (f"merged {merged} LoRA adapter(s) into a copy of the model before export "
               "(the model you passed keeps its adapters)")
        warnings.warn(msg, UserWarning, stacklevel=2)
        notes.append(msg)
    if example is None and not kv_cache:
        example = example_inputs(work)
    example = (example,) if torch.is_tensor(example) else tuple(example or ())
    was_training = work.training
    work.eval()
    try:
        sig = _signature(work, example, dynamic, kv_cache, output_names)
        ep = trace(sig, name)
        n_out = len(ep.graph_signature.user_outputs)
        sig.output_names = (sig.output_names + [f"output_{i}" for i in range(len(sig.output_names), n_out)])[:n_out]
        meta = model_metadata(work, sig, metadata, opset if format == "onnx" else None)
        if format == "onnx":
            external = _nbytes(work) > EXTERNAL_DATA_BYTES
            _write_onnx(ep, sig, path, opset, meta, external, name)
            if external:
                notes.append(f"weights stored as external data in {path.name}.data (model over 2 GB)")
        else:
            _write_pt2(ep, path, meta)
        result = ExportResult(path=path, format=format, kind=sig.kind, input_names=sig.input_names,
                              output_names=sig.output_names, dynamic_axes=sig.dynamic_axes, metadata=meta,
                              opset=opset if format == "onnx" else None, notes=notes)
        if quantize:
            from torchgraft.interop.quantize import quantize_int8

            result.quantized_path = quantize_int8(path, quantized_path(path))
        if check:
            check_export(result, work, [sig.inputs, *_more_examples(work, sig)])
        return result
    finally:
        work.train(was_training)


def quantized_path(path: Path) -> Path:
    return path.with_name(path.stem + ".int8" + path.suffix)


# ---- running and checking ----------------------------------------------------------------------------
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


def _more_examples(model: nn.Module, sig: _Signature) -> list[tuple[torch.Tensor, ...]]:
    """Inputs at other sizes along the dynamic axes (batch + 1, seq + 3), to show they are dynamic."""
    if sig.kind == "decode_step":
        step = sig.module
        vocab = getattr(config_of(model), "vocab_size", 2)
        return [step.example(batch_size=3, seq_len=1, past_len=6, vocab_size=vocab),
                step.example(batch_size=1, seq_len=5, past_len=0, vocab_size=vocab)]
    x = sig.inputs[0]
    if not sig.dynamic_axes.get(sig.input_names[0]):
        return []
    axes = sig.dynamic_axes[sig.input_names[0]]
    b = x.shape[0] + 1 if 0 in axes else x.shape[0]
    if sig.input_names[0] == "input_ids":
        t = x.shape[1] + 3 if 1 in axes else x.shape[1]
        if sig.max_seq:
            t = min(t, sig.max_seq)
        cfg = config_of(model)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, getattr(cfg, "vocab_size", int(x.max()) + 1), (b, t), generator=gen).to(x.device)
        rest = [torch.ones_like(ids) if n == "attention_mask" else None for n in sig.input_names[1:]]
        if any(r is None for r in rest):
            return []
        return [(ids, *rest)]
    if len(sig.inputs) == 1 and x.dtype.is_floating_point:
        gen = torch.Generator().manual_seed(1)
        return [(torch.randn((b, *x.shape[1:]), generator=gen).to(x),)]
    return []


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


def check_export(result: ExportResult, model: nn.Module, examples: Sequence[Sequence[torch.Tensor]]) -> ExportResult:
    """Run the exported file on each set of `examples` (inputs in the file's order) and record the
    max abs difference against eager PyTorch in `result.max_abs_diff` (and for the int8 copy)."""
    module = eager_module(model, result.kind, result.input_names).eval()
    session = ort_session(result.path) if result.format == "onnx" else None
    result.max_abs_diff = max(max_abs_diff(result.path, module, ex, session) for ex in examples)
    result.checked_shapes = [[tuple(t.shape) for t in ex[:1]] for ex in examples]
    if result.quantized_path is not None:
        qs = ort_session(result.quantized_path)
        result.quantized_max_abs_diff = max(max_abs_diff(result.quantized_path, module, ex, qs) for ex in examples)
    return result

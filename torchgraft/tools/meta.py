"""Meta-device helpers shared by summary, flops and memory (below all three, so none imports another):
example inputs from a model's declaration (or its config), input normalisation, and running a
forward pass on storage-free copies of a model's weights."""
from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.errors import TorchgraftError
from torchgraft.models.parts import parts_of

InputSpec = Any  # a tensor, a tuple of positional args, or a dict of keyword args


class InspectError(TorchgraftError, ValueError):
    """A model cannot be inspected as asked (no input given, forward fails on meta tensors, ...)."""


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def example_inputs(model: nn.Module, batch: int = 1, seq_len: int | None = None,
                   device: str | torch.device = "meta") -> tuple[torch.Tensor, ...] | None:
    """Example positional inputs of `model` on `device`, or None when it describes none.

    A model that declares its parts (`parts_of`) gives them (`ModelParts.example_inputs`). Otherwise
    its `config` is read: token models (config with `vocab_size`) get `input_ids (batch, seq_len)`
    (default `block_size`); image models (config with `image_size` or `in_chans`) get
    `(batch, in_chans, size, size)` floats (size = `image_size`, or 224 for size-agnostic CNNs).
    """
    parts = parts_of(model)
    if parts is not None and parts.example_inputs is not None:
        return tuple(x.to(device) for x in parts.example_inputs(batch, seq_len))
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if getattr(cfg, "vocab_size", None):
        t = seq_len or getattr(cfg, "block_size", None) or 128
        return (torch.zeros(batch, t, dtype=torch.long, device=device),)
    if getattr(cfg, "image_size", None) or getattr(cfg, "in_chans", None):
        size = getattr(cfg, "image_size", None) or 224  # size-agnostic CNNs (ResNet): ImageNet's 224
        hw = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return (torch.zeros(batch, getattr(cfg, "in_chans", 3), *hw, device=device),)
    return None


def make_inputs(model: nn.Module, input: InputSpec = None, input_size: Any = None,
                dtype: torch.dtype | None = None, batch: int = 1, seq_len: int | None = None,
                required: bool = True) -> tuple[tuple, dict] | None:
    """Normalise the ways of giving an input into `(args, kwargs)` of meta tensors.

    `input`: a tensor, a tuple/list of args, or a dict of keyword args (real or meta tensors).
    `input_size`: a shape like `(1, 3, 32, 32)` or a list of shapes (float tensors of `dtype`,
    default float32; use `dtype=torch.long` for token ids). Neither: `example_inputs(model)`.
    """
    if input is not None:
        if isinstance(input, torch.Tensor):
            args, kwargs = (input,), {}
        elif isinstance(input, dict):
            args, kwargs = (), dict(input)
        elif isinstance(input, (tuple, list)):
            args, kwargs = tuple(input), {}
        else:
            raise InspectError(f"input must be a tensor, a tuple of tensors or a dict, got {type(input).__name__}")
    elif input_size is not None:
        sizes = list(input_size)
        if not sizes or all(isinstance(s, int) for s in sizes):
            sizes = [sizes]
        dt = dtype or torch.float32
        try:
            args = tuple(torch.zeros(tuple(s), dtype=dt, device="meta") for s in sizes)
        except TypeError:
            raise InspectError(f"input_size must be a shape like (1, 3, 32, 32) or a list of shapes, "
                               f"got {input_size!r}") from None
        kwargs = {}
    else:
        ex = example_inputs(model, batch=batch, seq_len=seq_len)
        if ex is None:
            if not required:
                return None
            raise InspectError(f"cannot guess an input for {type(model).__name__}: pass input=<tensor> "
                               "or input_size=(batch, ...) (e.g. input_size=(1, 3, 32, 32))")
        args, kwargs = ex, {}

    def to_meta(x: Any) -> Any:
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    return tuple(to_meta(a) for a in args), {k: to_meta(v) for k, v in kwargs.items()}


def _meta_copy(t: torch.Tensor, dtype: torch.dtype | None, device: str = "meta") -> torch.Tensor:
    dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    out = torch.empty(t.shape, dtype=dt, device=device)
    return out.requires_grad_(t.requires_grad) if out.is_floating_point() else out


def meta_state(model: nn.Module, dtype: torch.dtype | None = None, device: str = "meta"
               ) -> dict[str, torch.Tensor]:
    """Storage-free copies of every parameter and buffer (floating ones cast to `dtype` if given),
    keyed by name; tied parameters appear once (`functional_call` re-ties them)."""
    state = {name: _meta_copy(p, dtype, device) for name, p in model.named_parameters()}
    for name, b in model.named_buffers():
        state[name] = _meta_copy(b, dtype, device)
    return state


def run_on_meta(model: nn.Module, args: tuple, kwargs: dict, fn: Callable[[Callable[[], Any],
                dict[str, torch.Tensor]], Any], dtype: torch.dtype | None = None) -> Any:
    """Call `fn(forward, state)` where `forward()` runs `model` on storage-free copies of its weights.

    First on the meta device; if the forward pass refuses meta tensors (plain tensor attributes,
    `torch.autocast(device_type="meta")`, ...) again under `FakeTensorMode` with CPU fake tensors.
    `state` maps parameter/buffer names to the tensors `forward` uses (so `fn` can take gradients
    with respect to them). The model itself is never modified or moved. On meta, attention takes
    the CPU's kernel (`CpuAttentionOnMeta`) and torch._dynamo stays unimported
    (`_dynamo_left_unloaded`): the fake-tensor fallback imports it (1.3-1.9 s of CPU).
    """
    def cast(x: Any, device: str) -> Any:
        if isinstance(x, torch.Tensor):
            dt = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
            return torch.empty(x.shape, dtype=dt, device=device)
        return x

    def attempt(device: str) -> Any:
        state = meta_state(model, dtype, device)
        a = tuple(cast(x, device) for x in args)
        kw = {k: cast(v, device) for k, v in kwargs.items()}

        def forward() -> Any:
            with _weights_restored(model):
                return torch.func.functional_call(model, state, a, kw, strict=False)

        return fn(forward, state)

    try:
        with _dynamo_left_unloaded(), CpuAttentionOnMeta():
            return attempt("meta")
    except InspectError:
        raise
    except Exception:  # noqa: BLE001 - retried with fake tensors below
        pass
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            return attempt("cpu")
    except InspectError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InspectError(f"{type(model).__name__}.forward failed on meta/fake tensors "
                           f"(check the input): {_one_line(e)}") from e


@contextlib.contextmanager
def _weights_restored(model: nn.Module) -> Iterator[None]:
    """Puts every module's own parameters and buffers back afterwards: `functional_call` restores
    by name, and a submodule reachable under two names (one RoPE module shared by every layer)
    kept the swapped-in copy (a float32 buffer came back bfloat16 after a bf16 inspection)."""
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for m, params, buffers in saved:
            m._parameters.update(params)
            m._buffers.update(buffers)


class CpuAttentionOnMeta(torch.overrides.TorchFunctionMode):
    """On meta tensors, `F.scaled_dot_product_attention` runs the kernel a CPU would pick (its flash
    kernel, for 4-D inputs of one head width, same heads, no dropout) instead of the math path
    that meta dispatch takes, so the FLOPs and the tensors saved for backward (q, k, v, output,
    logsumexp; no (T, T) matrix) are those of a real run, without fake tensors (whose mode
    imports torch._dynamo)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            flash = _cpu_flash_call(*args, **kwargs)
            if flash is not None:
                return flash
        return func(*args, **kwargs)


def _cpu_flash_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                    scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor | None:
    """CPU flash attention on meta tensors where the CPU's kernel choice would take it, else None."""
    qkv = (query, key, value)
    if not (all(t.is_meta and t.dim() == 4 for t in qkv) and dropout_p == 0.0
            and query.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
            and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and query.shape[1] == key.shape[1] == value.shape[1]
            and all(t.shape[2] > 0 for t in qkv) and all(t.stride(-1) == 1 for t in qkv)):
        return None
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def _dynamo_left_unloaded() -> Iterator[None]:
    """While dynamo has not been imported, let torch's internal `_disable_dynamo` wrappers (on
    every dispatch mode's `__torch_dispatch__` and on the Python reference kernels that implement
    many ops on meta) run their function directly instead of importing torch._dynamo (1.3-1.9 s of
    CPU) to disable a compiler that cannot be running: torch.compile imports it first. Each wrapper
    caches its choice on the function; those caches are removed on exit, so a later torch.compile
    in this process gets the real wrappers."""
    if "torch._dynamo" in sys.modules:
        yield
        return
    seen: list[Callable] = []

    def disable(fn: Callable, recursive: bool = True, wrapping: bool = True) -> Callable:
        seen.append(fn)
        return fn

    stub = types.ModuleType("torch._dynamo", "stand-in while torchgraft runs a meta pass (tools/meta.py)")
    stub.disable = disable
    sys.modules["torch._dynamo"] = stub
    try:
        yield
    finally:
        if sys.modules.get("torch._dynamo") is stub:
            del sys.modules["torch._dynamo"]
        for fn in seen:
            if getattr(fn, "__dynamo_disable", None) is fn:
                delattr(fn, "__dynamo_disable")


# --------------------------------------------------------------------------------------------------
# one pass, several recorders
# --------------------------------------------------------------------------------------------------
class PassRecorder:
    """One thing a meta pass records (module output shapes, FLOPs, tensors saved for backward).
    `record_pass` runs several on one forward (+ loss, + backward when one asks for it), so
    `torchgraft inspect` gets its table, FLOPs and activation memory from a single pass."""

    backward = False  # whether the pass must run backward for this recorder

    def session(self, model: nn.Module, state: dict[str, torch.Tensor]) -> AbstractContextManager:
        """Active for the whole pass (forward, loss, backward); `state`: the weights forward uses.
        Starts afresh: a pass that failed on meta is retried on fake tensors."""
        return nullcontext()

    def forward_phase(self) -> AbstractContextManager:
        """Active during the forward pass and the loss only."""
        return nullcontext()

    def forward_done(self, out: Any, logits: torch.Tensor | None) -> None:
        """Called after the forward pass and the loss; `logits`: an LM's flattened (N, V) logits."""


def lm_logits(model: nn.Module, out: Any) -> torch.Tensor | None:
    """An LM's output as float32 (N, V) logits (what its cross-entropy loss reads), else None."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab and isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[-1] == vocab:
        return out.float().reshape(-1, out.shape[-1])
    return None


def scalar_loss(out: Any) -> torch.Tensor:
    """Sum of every floating output (so backward reaches all of them)."""
    if isinstance(out, torch.Tensor):
        if not out.is_floating_point():
            raise InspectError("the model's output is not a floating tensor; cannot run backward")
        return out.float().sum()
    tensors: list[torch.Tensor] = []

    def collect(x: Any) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad:
            tensors.append(x)
        elif isinstance(x, (tuple, list)):
            for v in x:
                collect(v)
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)

    collect(out)
    if not tensors:
        raise InspectError("the model returned no floating tensor that requires grad; cannot run backward")
    return sum(t.float().sum() for t in tensors)


def record_pass(model: nn.Module, args: tuple, kwargs: dict, recorders: list[PassRecorder],
                dtype: torch.dtype | None = None) -> Any:
    """One forward pass of `model` on meta tensors (`run_on_meta`, weights cast to `dtype`), an
    LM's cross-entropy loss on its logits, and, if a recorder asks, backward to the trainable
    weights (of that loss, else of the sum of the outputs); each recorder sees it through its
    contexts. Returns the model's output (fake tensors)."""
    wants_backward = any(r.backward for r in recorders)

    def run(forward: Callable[[], Any], state: dict[str, torch.Tensor]) -> Any:
        with ExitStack() as whole:
            for r in recorders:
                whole.enter_context(r.session(model, state))
            with ExitStack() as fwd:
                for r in recorders:
                    fwd.enter_context(r.forward_phase())
                out = forward()
                logits = lm_logits(model, out)
                loss = None
                if logits is not None:
                    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
                    loss = F.cross_entropy(logits, target)
            for r in recorders:
                r.forward_done(out, logits)
            leaves = [t for t in state.values() if t.requires_grad]
            if wants_backward and leaves:
                torch.autograd.grad(loss if loss is not None else scalar_loss(out), leaves, allow_unused=True)
        return out

    with torch.enable_grad():
        return run_on_meta(model, args, kwargs, run, dtype=dtype)


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"



"""Training-memory estimate per device: weights, gradients, optimizer state, activations.

    total = weights + gradients + optimizer + activations          (bytes, per device)

- weights      = P * bytes(param) / S  (+ 2 bytes * P for autocast's low-precision weight copies
                 in mixed precisions (bf16 = bf16-mixed) without sharding; with S > 1 shards, + the all-gather buffer
                 of FSDP: 2 * largest block * bytes(compute))
- gradients    = P_trainable * bytes(grad) / S
- optimizer    = P_trainable * states * bytes(state) / S      (adamw/adam 2 states, sgd 1, sgd-nomomentum 0)
- activations  = saved-for-backward tensors of one forward pass + the loss buffers of backward
                 (not sharded: `batch` is the per-device micro-batch).

Activations are counted in one of two ways:
- "traced" (default): run forward (and the LM loss) on fake CPU tensors under
  `torch.autograd.graph.saved_tensors_hooks` and add up the distinct storages autograd keeps,
  in the activation dtype. Exact for the model's actual code, any nn.Module, no memory used.
- "analytic" (transformer configs): per layer, in elements of the activation dtype
  (Korthikanti et al. 2022 without dropout masks, with SDPA/flash attention, which keeps q, k, v,
  the output and a logsumexp but not the (a * s * s) attention matrix):
      s * b * (2h + 4 * h_attn)   attention: norm input, qkv input, q, k, v, output
    + s * b * (2h + k * i)        MLP: norm input, fc input, k = 2 (GELU MLP) or 4 (SwiGLU) tensors of width i
  plus 2 * s * b * h (final norm, head input) and, for LMs, the loss: log-softmax output and two
  gradient buffers of (s * b * vocab) float32. With activation checkpointing of every k-th block
  (k = 1: every block), a checkpointed layer keeps only its (s * b * h) input, the others keep
  everything, and one checkpointed layer is recomputed at a time.
- chunked cross-entropy (`chunked_ce=n`, `torchgraft.nn.losses`): the LM loss term becomes two
  (n * vocab) float32 chunk buffers, a float32 (vocab * h) weight-gradient accumulator and the
  (s * b * h) hidden-state gradient, instead of three (s * b * vocab) float32 tensors.
See docs/inspect.md for the validation against measured CPU peaks.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from torchgraft.activation_checkpointing import parse_ac
from torchgraft.models.shape import transformer_shape
from torchgraft.precision import NAMES as PRECISION_NAMES, Precision, precision
from torchgraft.tools.meta import (InputSpec, InspectError, PassRecorder, format_bytes, make_inputs,
                                   record_pass)


# names of the one precision vocabulary (torchgraft.precision): "bf16" means mixed precision (fp32
# master weights, grads and optimizer states, bf16 autocast); "-true" means everything in 16 bits
PRECISIONS: dict[str, Precision] = {name: precision(name) for name in PRECISION_NAMES}
OPTIMIZER_STATES: dict[str, int] = {"adamw": 2, "adam": 2, "sgd": 1, "sgd-nomomentum": 0}


def _choice(kind: str, value: str, choices: dict) -> Any:
    from torchgraft.errors import did_you_mean

    if value not in choices:
        raise InspectError(f"unknown {kind} {value!r}{did_you_mean(value, choices)}; choose from "
                           + ", ".join(choices))
    return choices[value]


@dataclass
class ActivationTrace:
    """Saved-for-backward bytes of one forward (+ loss) pass on meta tensors."""

    total: int  # everything autograd keeps, deduplicated by storage
    loss_buffers: int  # transient gradient buffers of the output / loss during backward
    blocks: list[int] = field(default_factory=list)  # saved bytes inside each repeated block
    block_inputs: list[int] = field(default_factory=list)  # bytes of each block's input
    logits_shape: tuple[int, int] | None = None  # (N, V) of an LM's flattened logits
    hidden_width: int = 0  # C of the hidden states fed to an LM head


@dataclass
class MemoryEstimate:
    """Per-device bytes; `to_dict()` is what `torchgraft inspect --json` prints under memory_bytes."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    batch: int
    seq_len: int | None
    precision: str
    optimizer_name: str
    sharding: int
    activation_checkpointing: bool | int | str
    activations_method: str
    activations_analytic: int | None = None  # the transformer formula, when the model has a config

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total}

    def settings(self) -> dict[str, Any]:
        return {"batch": self.batch, "seq_len": self.seq_len, "precision": self.precision,
                "optimizer": self.optimizer_name, "sharding": self.sharding,
                "activation_checkpointing": self.activation_checkpointing,
                "activations_method": self.activations_method,
                "activations_analytic": self.activations_analytic}

    def table(self):
        from rich.table import Table

        t = Table(title=(f"training memory per device\nbatch {self.batch}"
                         + (f" x seq {self.seq_len}" if self.seq_len else "")
                         + f", {self.precision}, {self.optimizer_name}, {self.sharding} shard(s)"
                         + (", checkpointing" if parse_ac(self.activation_checkpointing).enabled else "")))
        t.add_column("part")
        t.add_column("bytes", justify="right")
        t.add_column("size", justify="right")
        for k, v in self.to_dict().items():
            t.add_row(k, f"{v:,}", format_bytes(v))
        if self.activations_analytic is not None:
            t.add_row("(activations, formula)", f"{self.activations_analytic:,}",
                      format_bytes(self.activations_analytic))
        return t

    def __rich__(self):
        return self.table()


def _largest_module_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if best is None or n > best[0]:
                best = (n, name, m)
    return None if best is None else (best[1], best[2])


def _largest_block_params(model: nn.Module) -> int:
    """Parameters of the largest unit FSDP would gather at once (a repeated block, else a leaf)."""
    found = _largest_module_list(model)
    if found is not None:
        return max(sum(p.numel() for p in b.parameters()) for b in found[1])
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


class ActivationRecorder(PassRecorder):
    """Records the bytes autograd saves for backward during a `record_pass` (forward + LM loss),
    deduplicated by storage, leaving out weights; per block for the children of the largest
    `nn.ModuleList`/`nn.Sequential`. `trace()` after the pass gives the ActivationTrace."""

    def __init__(self, model: nn.Module) -> None:
        found = _largest_module_list(model)
        self._blocks = list(found[1]) if found else []
        self._block_ids = {id(b): i for i, b in enumerate(self._blocks)}
        self._width = getattr(getattr(model, "config", None), "n_embd", 0)
        self._start()

    def _start(self) -> None:
        self._seen: dict[int, int] = {}
        self._keep: list[torch.Tensor] = []
        self._current: list[int] = []
        self._per_block = [0] * len(self._blocks)
        self._block_in = [0] * len(self._blocks)
        self._weight_keys: set[int] = set()
        self._loss_buffers = 0
        self._logits_shape: tuple[int, int] | None = None

    @contextlib.contextmanager
    def session(self, model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
        self._start()
        self._weight_keys = {t.untyped_storage()._cdata for t in state.values()}
        handles = []
        for b in self._blocks:
            handles.append(b.register_forward_pre_hook(self._pre))
            handles.append(b.register_forward_hook(self._post))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def forward_phase(self) -> AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def forward_done(self, out: Any, logits: torch.Tensor | None) -> None:
        if logits is not None:
            self._logits_shape = tuple(logits.shape)
            self._loss_buffers = 2 * logits.numel() * 4  # grad of log-softmax output and of the logits
        else:
            outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
            self._loss_buffers = sum(o.numel() * o.element_size() for o in outs)  # grad of the output

    def trace(self) -> ActivationTrace:
        return ActivationTrace(total=sum(self._seen.values()), loss_buffers=self._loss_buffers,
                               blocks=list(self._per_block), block_inputs=list(self._block_in),
                               logits_shape=self._logits_shape, hidden_width=self._width)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = st._cdata
        if key not in self._weight_keys and key not in self._seen:
            self._seen[key] = st.nbytes()
            self._keep.append(t)  # keeps the storage alive, so its key is not reused
            if self._current:
                self._per_block[self._current[-1]] += st.nbytes()
        return t

    def _pre(self, m: nn.Module, inp: Any) -> None:
        i = self._block_ids[id(m)]
        self._current.append(i)
        x = inp[0] if isinstance(inp, tuple) and inp else None
        if isinstance(x, torch.Tensor):
            self._block_in[i] = x.numel() * x.element_size()

    def _post(self, m: nn.Module, _inp: Any, _out: Any) -> None:
        if self._current:
            self._current.pop()


def trace_activations(model: nn.Module, input: InputSpec = None, *, input_size: Any = None,
                      dtype: torch.dtype = torch.float32, batch: int = 1, seq_len: int | None = None,
                      input_dtype: torch.dtype | None = None) -> ActivationTrace:
    """Bytes autograd saves for backward in one forward pass (plus the LM loss), on fake tensors.

    `dtype`: the activation dtype (floating weights and inputs are cast to it). Tensors are
    deduplicated by storage; parameters and buffers are not activations and are left out.
    Per-block figures are for the children of the largest `nn.ModuleList`/`nn.Sequential`.
    """
    args, kwargs = make_inputs(model, input, input_size, input_dtype, batch, seq_len)
    rec = ActivationRecorder(model)
    record_pass(model, args, kwargs, [rec], dtype=dtype)
    return rec.trace()


def selective_layer_elements(config: Any, batch: int, seq_len: int, gated: bool) -> int:
    """Elements one block keeps under selective checkpointing (matmul and attention outputs are
    saved, pointwise ops recomputed): its input, q/k/v, the attention output, the output
    projection, the MLP's input projections (1, or 2 when gated) and its output projection."""
    shape = transformer_shape(config)
    s, b, h, i = seq_len, batch, shape.n_embd, shape.intermediate_size
    q, kv = shape.q_width, shape.kv_width
    return s * b * (h + q + 2 * kv + q + h + (2 if gated else 1) * i + h)


def lm_loss_bytes(n_tokens: int, vocab: int, width: int, dtype_bytes: int, chunked_ce: int | None = None) -> int:
    """Logit-sized buffers of the LM loss in forward + backward (module docstring)."""
    if not chunked_ce:
        return 3 * n_tokens * vocab * 4  # log-softmax output + 2 gradient buffers, float32
    rows = min(chunked_ce, n_tokens)
    return 2 * rows * vocab * 4 + vocab * width * 4 + n_tokens * width * dtype_bytes


def analytic_activations(config: Any, batch: int, seq_len: int, dtype_bytes: int,
                         activation_checkpointing: bool | int = False, gated: bool = False,
                         lm: bool = True, chunked_ce: int | None = None) -> int | None:
    """The transformer activation formula (module docstring) for a config with transformer fields.

    `gated`: SwiGLU-style MLP (3 projections); `lm`: the output is vocabulary logits fed to a loss;
    `activation_checkpointing`: True / k (every k-th block); `chunked_ce`: rows per loss chunk.
    """
    shape = transformer_shape(config)
    if shape is None:
        return None
    s, b, h, L = seq_len, batch, shape.n_embd, shape.n_layer
    h_attn, i = shape.q_width, shape.intermediate_size
    k = 4 if gated else 2
    layer = s * b * (2 * h + 4 * h_attn) + s * b * (2 * h + k * i)
    mode = parse_ac(activation_checkpointing)
    n_ckpt = len(mode.checkpointed(L))  # blocks 0, k, 2k, ...
    if mode.selective:  # every block keeps its matmul / attention outputs
        sel = selective_layer_elements(config, b, s, gated)
        per_layers = L * sel + (layer - sel)  # + the pointwise tensors of the block being recomputed
    else:
        per_layers = n_ckpt * s * b * h + (L - n_ckpt) * layer + (layer if n_ckpt else 0)
    elements = per_layers + 2 * s * b * h
    total = elements * dtype_bytes
    if shape.vocab_size and lm:
        total += lm_loss_bytes(s * b, shape.vocab_size, h, dtype_bytes, chunked_ce)
    return int(total)


def estimate_memory(model: nn.Module, batch: int = 1, seq_len: int | None = None,
                    precision: str = "fp32", optimizer: str = "adamw", sharding: int = 1,
                    activation_checkpointing: bool | int = False, *, input: InputSpec = None,
                    input_size: Any = None, activations: Literal["traced", "analytic"] = "traced",
                    trace: ActivationTrace | None = None, chunked_ce: int | None = None) -> MemoryEstimate:
    """Per-device training memory of `model` (see the module docstring for the formula).

    `batch`, `seq_len`: per-device micro-batch (seq_len for token models, default `block_size`);
    models without a config need `input=` or `input_size=` (with the batch in it).
    `precision`: fp32; bf16 = bf16-mixed, fp16 = fp16-mixed (fp32 master weights, grads and
    optimizer states, 16-bit autocast activations); bf16-true, fp16-true (everything 16-bit).
    `optimizer`: adamw, adam, sgd (momentum), sgd-nomomentum. `sharding`: FSDP/ZeRO-3 world size.
    `trace`: an `ActivationTrace` made elsewhere (same batch, seq_len and precision) to use as is.
    `activation_checkpointing`: True (every block), k (every k-th block, as
    `distributed.parallel`'s `activation_checkpointing: k`) or "selective" (op-level: matmul and
    attention outputs kept; with traced activations the blocks' part comes from the formula). `chunked_ce`: rows per chunk of the
    chunked LM loss (`task: {name: lm, chunked_ce: n}`), None = plain cross-entropy.
    """
    prec = _choice("precision", precision, PRECISIONS)
    n_states = _choice("optimizer", optimizer, OPTIMIZER_STATES)
    if sharding < 1:
        raise InspectError(f"sharding must be >= 1 (number of devices the weights are split over), got {sharding}")
    if batch < 1:
        raise InspectError(f"batch must be >= 1, got {batch}")
    if activations not in ("traced", "analytic"):
        raise InspectError(f"activations must be 'traced' or 'analytic', got {activations!r}")
    params = list(model.parameters())
    n_all = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in params if p.requires_grad)
    S = sharding
    param_bytes, act_bytes = prec.param.itemsize, prec.compute.itemsize  # grads, optimizer states: as param
    cast_copy = act_bytes if prec.mixed else 0  # bytes per parameter of autocast's low-precision weight copies
    weights = -(-n_all * param_bytes // S)
    if S > 1:
        weights += 2 * _largest_block_params(model) * (act_bytes if cast_copy else param_bytes)
    else:
        weights += n_all * cast_copy
    grads = -(-n_train * param_bytes // S)
    opt = -(-n_train * n_states * param_bytes // S)

    cfg = getattr(model, "config", None)
    seq = None
    if cfg is not None and getattr(cfg, "vocab_size", None) and input is None and input_size is None:
        seq = seq_len or getattr(cfg, "block_size", None) or 128
    gated = any(hasattr(m, "gate_proj") for m in model.modules())
    lm = hasattr(model, "lm_head")  # decoder LMs (docs/architecture.md); None when tied
    analytic = (analytic_activations(cfg, batch, seq, act_bytes, activation_checkpointing, gated, lm,
                                     chunked_ce) if seq else None)

    if activations == "analytic":
        if analytic is None:
            raise InspectError("activations='analytic' needs a transformer config (n_layer, n_head, n_embd, "
                               "vocab_size) on model.config; use activations='traced'")
        act = analytic
    else:
        tr = trace or trace_activations(model, input, input_size=input_size, dtype=prec.activation,
                                        batch=batch, seq_len=seq)
        act = tr.total + tr.loss_buffers
        if chunked_ce and tr.logits_shape is not None:
            # the traced plain loss keeps the (N, V) log-softmax output and 2 gradient buffers
            n_tok, vocab = tr.logits_shape
            act += lm_loss_bytes(n_tok, vocab, tr.hidden_width, act_bytes, chunked_ce) - lm_loss_bytes(
                n_tok, vocab, tr.hidden_width, act_bytes)
        mode = parse_ac(activation_checkpointing)
        if mode.selective and tr.blocks:
            if seq is None or transformer_shape(cfg) is None:
                raise InspectError("activation_checkpointing='selective' needs a transformer config "
                                   "(n_layer, n_head, n_embd) on model.config")
            kept = selective_layer_elements(cfg, batch, seq, gated) * act_bytes
            act = act - sum(tr.blocks) + len(tr.blocks) * kept + max(tr.blocks) - kept
        elif mode.enabled and tr.blocks:
            # checkpointed blocks keep only their input; one of them is recomputed during backward
            ckpt = mode.checkpointed(len(tr.blocks))
            act = (act - sum(tr.blocks[i] for i in ckpt) + sum(tr.block_inputs[i] for i in ckpt)
                   + max(tr.blocks[i] for i in ckpt))
    return MemoryEstimate(weights=int(weights), gradients=int(grads), optimizer=int(opt), activations=int(act),
                          batch=batch, seq_len=seq, precision=precision, optimizer_name=optimizer,
                          sharding=S, activation_checkpointing=activation_checkpointing,
                          activations_method=activations, activations_analytic=analytic)


def measure_peak_memory(fn: Any) -> int:
    """Peak bytes of live tensors allocated by `fn()` on CPU (torch's own allocator accounting).

    Runs `fn` under `torch.profiler` with `profile_memory=True` and replays its allocation/free
    events in time order; the running sum's maximum is the peak. Only allocations made inside `fn`
    count, so build the model and optimizer inside it to measure a whole training run. Unlike RSS
    this ignores the allocator's cached pages, the Python heap and library code.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak

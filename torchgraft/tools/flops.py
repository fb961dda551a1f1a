"""FLOPs: measured with `torch.utils.flop_counter.FlopCounterMode` on meta tensors, and the analytic
per-token training cost of a transformer (nanoGPT / PaLM appendix B):

    flops_per_token = 6 * N + 12 * L * H * T

N: parameters that multiply activations (linear / conv weights and biases, including an output
head tied to the token embedding), i.e. every parameter except embedding lookups (token embeddings
that are not reused as the head, learned positions) and norm scales; in a mixture-of-experts model
only the active share (top_k / E) of the expert weights. For GPT-2 this is nanoGPT's
`get_num_params()` minus the 38,400 LayerNorm parameters (-0.03%). L layers, H = n_head * head_dim
(the attention width), T the sequence length. Causal masking is not discounted (as in nanoGPT).

The measured count includes only the ops FlopCounterMode knows (matmuls, convolutions, attention);
elementwise ops, norms and softmax are not counted, which is why measured / analytic is a bit
below 1 for transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from torchgraft.models.shape import transformer_shape
from torchgraft.tools.meta import InputSpec, PassRecorder, make_inputs, record_pass

_MATMUL_OPS = {
    "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution",
    "conv1d", "conv2d", "conv3d", "addmv", "mv", "einsum",
}


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,  # noqa: ANN001
                            out_shape=None, **kwargs) -> int:
    """Model FLOPs of attention's backward: twice the forward's (the math path's four products);
    the flash kernel's recomputation of the scores is not counted, as in 6N + 12LHT."""
    from torch.utils.flop_counter import sdpa_flop_count

    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


def _flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also knows the CPU flash-attention kernels SDPA picks on CPU tensors."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _MatmulParamRecorder(TorchDispatchMode):
    """Records the storages of tensors that enter matmul / convolution ops."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func.overloadpacket.__name__ in _MATMUL_OPS:
            for a in list(args) + list((kwargs or {}).values()):
                if isinstance(a, torch.Tensor):
                    self.keys.add(_storage_key(a))
        return func(*args, **(kwargs or {}))


@dataclass
class FlopCount:
    """FLOPs of one call on the given input (forward, forward+backward) and the matmul-parameter count."""

    forward: int
    forward_backward: int
    matmul_params: int  # N of the analytic formula: parameters that enter matmuls/convolutions
    batch: int
    by_module: dict[str, int] = field(default_factory=dict)  # forward+backward FLOPs per submodule

    def per_sample(self) -> "FlopCount":
        """The count of one sample (every counted op, matmuls, convolutions, attention, is linear
        in the batch, so this is exact)."""
        b = self.batch
        return FlopCount(self.forward // b, self.forward_backward // b, self.matmul_params, 1,
                         {k: v // b for k, v in self.by_module.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"forward": self.forward, "forward_backward": self.forward_backward,
                "matmul_params": self.matmul_params, "batch": self.batch, "by_module": dict(self.by_module)}


class FlopRecorder(PassRecorder):
    """Counts FLOPs of a `record_pass` (forward, and forward+backward when `backward`), per module
    too, and the weights that enter matmuls/convolutions (N of the analytic formula)."""

    def __init__(self, backward: bool = True) -> None:
        self.backward = backward
        self.counter = _flop_counter()
        self.matmuls = _MatmulParamRecorder()
        self.forward_flops = 0
        self.forward_by_module: dict[str, int] = {}
        self._state: dict[str, torch.Tensor] = {}

    def session(self, model: nn.Module, state: dict[str, torch.Tensor]) -> FlopCounterMode:
        self._state = state
        self.matmuls = _MatmulParamRecorder()
        return self.counter  # entering it clears its counts

    def forward_phase(self) -> _MatmulParamRecorder:
        return self.matmuls

    def forward_done(self, out: Any, logits: torch.Tensor | None) -> None:
        self.forward_flops = int(self.counter.get_total_flops())
        self.forward_by_module = _by_module(self.counter)

    def matmul_names(self) -> set[str]:
        """Names of the weights (state keys) that entered a matmul or convolution."""
        return {k for k, v in self._state.items() if _storage_key(v) in self.matmuls.keys}

    def count(self, model: nn.Module, batch: int) -> FlopCount:
        """The FlopCount of the pass (after it ran) for `model`, whose weights the pass used."""
        names = self.matmul_names()
        n_matmul = sum(p.numel() for name, p in model.named_parameters() if name in names)
        fb = int(self.counter.get_total_flops()) if self.backward else self.forward_flops
        return FlopCount(forward=self.forward_flops, forward_backward=fb, matmul_params=n_matmul,
                         batch=batch, by_module=_by_module(self.counter))


def _by_module(counter: FlopCounterMode) -> dict[str, int]:
    """FLOPs so far per submodule name ("GPT.blocks.0" -> "blocks.0"; the root is the total)."""
    return {name.split(".", 1)[1]: int(sum(c.values()))
            for name, c in counter.get_flop_counts().items() if "." in name}


def batch_size_of(args: tuple, kwargs: dict) -> int:
    """The leading dimension of the first non-scalar input tensor (1 if there is none)."""
    return int(next((a.shape[0] for a in list(args) + list(kwargs.values())
                     if isinstance(a, torch.Tensor) and a.dim() > 0), 1))


def measure_flops(model: nn.Module, input: InputSpec = None, *, input_size: Any = None,
                  dtype: torch.dtype | None = None, batch: int = 1, seq_len: int | None = None,
                  backward: bool = True) -> FlopCount:
    """Count FLOPs of a forward (and forward+backward) pass with FlopCounterMode on fake tensors.

    Works on any nn.Module (meta or real weights; nothing is allocated or modified). Backward
    differentiates the loss (an LM's cross-entropy, else the sum of the outputs) with respect to
    the trainable parameters, so frozen parameters cost no weight-gradient FLOPs, as in training.
    """
    args, kwargs = make_inputs(model, input, input_size, dtype, batch, seq_len)
    rec = FlopRecorder(backward)
    record_pass(model, args, kwargs, [rec])
    return rec.count(model, batch_size_of(args, kwargs))


def analytic_flops_per_token(n_params: int, n_layer: int, attn_dim: int, seq_len: int) -> int:
    """Training FLOPs per token, 6N + 12 L H T (forward 2N + 4LHT, backward twice that)."""
    return 6 * n_params + 12 * n_layer * attn_dim * seq_len


def transformer_dims(model: nn.Module) -> tuple[int, int] | None:
    """(n_layer, attention width n_head*head_dim) from `model.config`, or None if not a transformer."""
    shape = transformer_shape(getattr(model, "config", None))
    return (shape.n_layer, shape.q_width) if shape is not None else None


@dataclass
class FlopsReport:
    """Measured and (for transformers) analytic FLOPs, per token (token models) or per sample."""

    unit: str  # "token" or "sample"
    measured_forward: float  # per unit
    measured_training: float  # forward + backward, per unit
    analytic_training: float | None  # 6N + 12LHT per token (transformers only)
    n_params: int  # N in the formula
    seq_len: int | None
    count: FlopCount

    @property
    def ratio(self) -> float | None:
        """measured / analytic training FLOPs."""
        if not self.analytic_training:
            return None
        return self.measured_training / self.analytic_training

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "measured_forward": self.measured_forward,
                "measured_training": self.measured_training, "analytic_training": self.analytic_training,
                "measured_over_analytic": self.ratio, "n_params": self.n_params, "seq_len": self.seq_len}


def flops_report(model: nn.Module, input: InputSpec = None, *, input_size: Any = None,
                 dtype: torch.dtype | None = None, seq_len: int | None = None,
                 count: FlopCount | None = None) -> FlopsReport:
    """FLOPs per token (models whose config has `vocab_size`) or per sample (anything else).

    Measures one sequence of `seq_len` tokens (default `block_size`) or one sample; for transformer
    configs also computes 6N + 12LHT per token with the same N and T. `count`: a measurement made
    elsewhere (e.g. extrapolated over depth by `inspect_model`) to report instead of measuring.
    """
    cnt = count or measure_flops(model, input, input_size=input_size, dtype=dtype, batch=1, seq_len=seq_len)
    cfg = getattr(model, "config", None)
    dims = transformer_dims(model)
    if cfg is not None and getattr(cfg, "vocab_size", None) and input is None and input_size is None:
        t = seq_len or getattr(cfg, "block_size", None) or 128
        tokens = cnt.batch * t
        from torchgraft.nn.moe import inactive_expert_params

        n_active = cnt.matmul_params - inactive_expert_params(model)
        analytic = analytic_flops_per_token(n_active, dims[0], dims[1], t) if dims else None
        return FlopsReport("token", cnt.forward / tokens, cnt.forward_backward / tokens, analytic,
                           n_active, t, cnt)
    return FlopsReport("sample", cnt.forward / cnt.batch, cnt.forward_backward / cnt.batch, None,
                       cnt.matmul_params, None, cnt)

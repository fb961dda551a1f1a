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
from torchgraft.tools.meta import InputSpec, InspectError, make_inputs, run_on_meta

_MATMUL_OPS = {
    "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution",
    "conv1d", "conv2d", "conv3d", "addmv", "mv", "einsum",
}


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,  # noqa: ANN001
                            out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


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


def _scalar_loss(out: Any) -> torch.Tensor:
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


@dataclass
class FlopCount:
    """FLOPs of one call on the given input (forward, forward+backward) and the matmul-parameter count."""

    forward: int
    forward_backward: int
    matmul_params: int  # N of the analytic formula: parameters that enter matmuls/convolutions
    batch: int
    by_module: dict[str, int] = field(default_factory=dict)  # forward+backward FLOPs per submodule

    def to_dict(self) -> dict[str, Any]:
        return {"forward": self.forward, "forward_backward": self.forward_backward,
                "matmul_params": self.matmul_params, "batch": self.batch, "by_module": dict(self.by_module)}


def measure_flops(model: nn.Module, input: InputSpec = None, *, input_size: Any = None,
                  dtype: torch.dtype | None = None, batch: int = 1, seq_len: int | None = None,
                  backward: bool = True) -> FlopCount:
    """Count FLOPs of a forward (and forward+backward) pass with FlopCounterMode on meta tensors.

    Works on any nn.Module (meta or real weights; nothing is allocated or modified). Backward
    differentiates the sum of the outputs with respect to the trainable parameters, so frozen
    parameters cost no weight-gradient FLOPs, as in training.
    """
    args, kwargs = make_inputs(model, input, input_size, dtype, batch, seq_len)
    bsz = next((a.shape[0] for a in list(args) + list(kwargs.values())
                if isinstance(a, torch.Tensor) and a.dim() > 0), 1)

    def run(forward, state):  # noqa: ANN001, ANN202
        rec = _MatmulParamRecorder()
        counter = _flop_counter()
        with counter:
            with rec:
                out = forward()
            fwd = counter.get_total_flops()
            fb = fwd
            if backward:
                leaves = [t for t in state.values() if t.requires_grad]
                if leaves:
                    loss = _scalar_loss(out)
                    torch.autograd.grad(loss, leaves, allow_unused=True)
                fb = counter.get_total_flops()
        by_module = {}
        for name, counts in counter.get_flop_counts().items():
            if "." in name:  # "Global" and the root class name are the totals; "GPT.blocks.0" -> "blocks.0"
                by_module[name.split(".", 1)[1]] = int(sum(counts.values()))
        matmul_names = {k for k, v in state.items() if _storage_key(v) in rec.keys}
        return int(fwd), int(fb), matmul_names, by_module

    fwd, fb, matmul_names, by_module = run_on_meta(model, args, kwargs, run, dtype=None)
    params = dict(model.named_parameters())
    n_matmul = sum(p.numel() for name, p in params.items() if name in matmul_names)
    return FlopCount(forward=fwd, forward_backward=fb, matmul_params=n_matmul, batch=int(bsz),
                     by_module=by_module)


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

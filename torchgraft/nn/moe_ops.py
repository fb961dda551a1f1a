"""The sparse expert compute of `GroupedExperts` as one custom operator, `torchgraft::grouped_experts`,
with a hand-written backward (`torchgraft::grouped_experts_backward`).

    y = sum_j weights[:, j] * down_e(act(gate_e(x)) * up_e(x)),   e = experts[:, j]

Why an operator: `torch.compile` cannot trace data-dependent group sizes, so it used to run every
expert on every token (E / k times the FLOPs). As an opaque operator with a fixed output shape
(N, C), compiled graphs (e.g. the compiled decode step) keep the sparse compute. The backward is
written out (grouped matmuls for the input and weight gradients, each weight gradient one (E, ...)
tensor) instead of autograd's per-expert bookkeeping. Eager calls skip the operator dispatch (a
few hundred microseconds of Python per call, measured at decode): `torch.autograd.Function` when
a gradient is needed, the plain function otherwise; all three run the same two functions.

Forward, with the N*k assignments sorted by expert (`order`), `tok = order // k`, `S = N*k`:

    xs = x[tok]                      # (S, C)
    h  = gmm(xs, Wgu^T)              # (S, 2H) = [gate; up], each expert's rows against its weight
    a  = act(g) * u                  # (S, H)
    o  = gmm(a, Wd^T)                # (S, C)
    y  = index_add(tok, o * w_s)     # (N, C)

`gmm` is `torch._grouped_mm` (one call over all groups) where its CPU/CUDA kernel takes the
operands (16-byte aligned strides), else one `torch.mm` per expert that received rows.
"""
from __future__ import annotations

import torch

from torchgraft.nn.mlp import activation_fn


def _aligned(*ts: torch.Tensor) -> bool:
    """`torch._grouped_mm` needs every stride (but the unit one) a multiple of 16 bytes."""
    return all(all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride()) for t in ts)


class Groups:
    """The N*k assignments of (N, k) expert ids sorted by expert: `order` (S,), `tok` (S,) the token
    of each sorted assignment, `counts` (E,) rows per expert, `offs` their int32 cumulative sum."""

    def __init__(self, experts: torch.Tensor, n_experts: int):
        flat = experts.reshape(-1)
        self.order = flat.argsort(stable=True)
        self.tok = self.order // experts.shape[1]
        self.counts = torch.bincount(flat, minlength=n_experts)
        self.offs = self.counts.cumsum(0, dtype=torch.int32)
        self._sizes: list[int] | None = None

    @property
    def sizes(self) -> list[int]:
        if self._sizes is None:
            self._sizes = self.counts.tolist()
        return self._sizes

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Grouped matmul over the sorted rows: a (S, K) @ b (E, K, M) -> (S, M); or, with a (K, S)
        and b (S, M) (groups along S), -> (E, K, M) = a_e @ b_e per expert (0 for an empty one).
        `torch._grouped_mm` where its kernel takes the operands, else one `torch.mm` per expert."""
        if hasattr(torch, "_grouped_mm") and a.dtype == b.dtype and a.device.type in ("cpu", "cuda") \
                and _aligned(a, b):
            return torch._grouped_mm(a, b, offs=self.offs)
        if b.dim() == 3:
            out = a.new_empty(a.shape[0], b.shape[-1])
            for e, (part, o) in enumerate(zip(a.split(self.sizes), out.split(self.sizes))):
                if part.shape[0]:
                    torch.mm(part, b[e], out=o)
            return out
        out = a.new_zeros(len(self.sizes), a.shape[0], b.shape[-1])
        for e, (pa, pb) in enumerate(zip(a.split(self.sizes, dim=1), b.split(self.sizes))):
            if pb.shape[0]:
                torch.mm(pa, pb, out=out[e])
        return out


def _act_backward(name: str, grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad * act'(g) for the activations of `activation_fn` (autograd is off inside an operator)."""
    aten = torch.ops.aten
    if name in ("silu", "swish"):
        return aten.silu_backward(grad, g)
    if name in ("gelu_tanh", "gelu_new", "gelu_pytorch_tanh"):
        return aten.gelu_backward(grad, g, approximate="tanh")
    if name == "gelu":
        return aten.gelu_backward(grad, g)
    if name == "relu":
        return grad * (g > 0)
    if name == "quick_gelu":
        s = torch.sigmoid(1.702 * g)
        return grad * (s + 1.702 * g * s * (1 - s))
    raise ValueError(f"no backward for activation {name!r}")


def _forward(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
             down: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (N, C), h (S, 2H), o (S, C)): the output and, for the backward, the sorted projections."""
    gr = Groups(experts, gate_up.shape[0])
    h = gr.mm(x[gr.tok], gate_up.transpose(-2, -1))                       # (S, 2H)
    g, u = h.chunk(2, dim=-1)                                             # (S, H) each
    o = gr.mm(activation_fn(activation)(g) * u, down.transpose(-2, -1))   # (S, C)
    y = x.new_zeros(x.shape).index_add_(0, gr.tok, o * weights.reshape(-1)[gr.order, None].to(o.dtype))
    return y, h, o                                                        # y (N, C)


def _backward(dy: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
              gate_up: torch.Tensor, down: torch.Tensor, h: torch.Tensor, o: torch.Tensor,
              activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (N, C), dweights (N, k), dgate_up (E, 2H, C), ddown (E, C, H)) for the output gradient dy."""
    gr = Groups(experts, gate_up.shape[0])
    g, u = h.chunk(2, dim=-1)                                             # (S, H) each
    act_g = activation_fn(activation)(g)
    a = act_g * u                                                         # (S, H)
    dys = dy[gr.tok]                                                      # (S, C)
    dw = torch.zeros_like(weights.reshape(-1)).index_copy_(0, gr.order, (dys * o).sum(-1).to(weights.dtype))
    do = dys * weights.reshape(-1)[gr.order, None].to(dy.dtype)           # (S, C)
    ddown = gr.mm(do.t(), a)                                              # (E, C, H)
    da = gr.mm(do, down)                                                  # (S, H)
    dh = torch.cat([_act_backward(activation, da * u, g), da * act_g], dim=-1)  # (S, 2H)
    dgate_up = gr.mm(dh.t(), x[gr.tok])                                   # (E, 2H, C)
    dx = x.new_zeros(x.shape).index_add_(0, gr.tok, gr.mm(dh, gate_up))   # (N, C)
    return dx, dw.view_as(weights), dgate_up, ddown


# -- torch.compile: two opaque operators ----------------------------------------------------------

@torch.library.custom_op("torchgraft::grouped_experts", mutates_args=())
def _op(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
        down: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weights, experts, gate_up, down, activation)


@_op.register_fake
def _(x, weights, experts, gate_up, down, activation):  # noqa: ANN001, ANN202
    s = experts.numel()
    return x.new_empty(x.shape), x.new_empty(s, gate_up.shape[1]), x.new_empty(s, x.shape[1])


@torch.library.custom_op("torchgraft::grouped_experts_backward", mutates_args=())
def _op_backward(dy: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                 gate_up: torch.Tensor, down: torch.Tensor, h: torch.Tensor, o: torch.Tensor,
                 activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, x, weights, experts, gate_up, down, h, o, activation)


@_op_backward.register_fake
def _(dy, x, weights, experts, gate_up, down, h, o, activation):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape), weights.new_empty(weights.shape), gate_up.new_empty(gate_up.shape), \
        down.new_empty(down.shape)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weights, experts, gate_up, down, activation = inputs
    _, h, o = output
    ctx.save_for_backward(x, weights, experts, gate_up, down, h, o)
    ctx.activation = activation


def _op_grad(ctx, dy, _dh, _do):  # noqa: ANN001, ANN202
    dx, dw, dgu, dd = _op_backward(dy.contiguous(), *ctx.saved_tensors, ctx.activation)
    return dx, dw, None, dgu, dd, None


_op.register_autograd(_op_grad, setup_context=_setup_context)


# -- eager: the same functions without the operator dispatch --------------------------------------

class _Eager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, experts, gate_up, down, activation):  # noqa: ANN001, ANN205
        y, h, o = _forward(x, weights, experts, gate_up, down, activation)
        ctx.save_for_backward(x, weights, experts, gate_up, down, h, o)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        dx, dw, dgu, dd = _backward(dy.contiguous(), *ctx.saved_tensors, ctx.activation)
        return dx, dw, None, dgu, dd, None


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, activation: str) -> torch.Tensor:
    """x (N, C), weights (N, k), experts (N, k) long, gate_up (E, 2H, C), down (E, C, H) -> (N, C)."""
    if torch.compiler.is_compiling():
        return _op(x, weights, experts, gate_up, down, activation)[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, gate_up, down)):
        return _Eager.apply(x, weights, experts, gate_up, down, activation)
    return _forward(x, weights, experts, gate_up, down, activation)[0]

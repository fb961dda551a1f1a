"""The sparse expert compute of `GroupedExperts` as one custom operator, `torchgraft::grouped_experts`,
with a hand-written backward (`torchgraft::grouped_experts_backward`).

    y = sum_j weights[:, j] * down_e(act(gate_e(x)) * up_e(x)),   e = experts[:, j]

Why an operator: `torch.compile` cannot trace data-dependent group sizes, so it used to run every
expert on every token (E / k times the FLOPs). As an opaque operator with a fixed output shape
(N, C), compiled graphs (e.g. the compiled decode step) keep the sparse compute. And the backward
written out (grouped matmuls for the input and weight gradients, the weight gradients written into
one (E, ...) tensor) avoids autograd's per-expert bookkeeping (benchmarks/bench_moe.py).

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


def gmm(a: torch.Tensor, b: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Grouped matmul over groups of consecutive rows (`sizes[e]` rows for group e):
    a (S, K) @ b (E, K, M) -> (S, M), or, with a (K, S) and b (S, M) (groups along S),
    -> (E, K, M) = per group a_e @ b_e (the weight gradient; 0 for an empty group)."""
    if hasattr(torch, "_grouped_mm") and a.dtype == b.dtype and a.device.type in ("cpu", "cuda") and _aligned(a, b):
        offs = torch.tensor(sizes, device=a.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(a, b, offs=offs)
    if b.dim() == 3:
        out = a.new_empty(a.shape[0], b.shape[-1])
        for e, (part, o) in enumerate(zip(a.split(sizes), out.split(sizes))):
            if part.shape[0]:
                torch.mm(part, b[e], out=o)
        return out
    out = a.new_zeros(len(sizes), a.shape[0], b.shape[-1])
    for e, (pa, pb) in enumerate(zip(a.split(sizes, dim=1), b.split(sizes))):
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


def _sort(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(order, token of each sorted assignment, group sizes) of the (N, k) expert ids."""
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    sizes = torch.bincount(flat, minlength=n_experts).tolist()
    return order, order // experts.shape[1], sizes


@torch.library.custom_op("torchgraft::grouped_experts", mutates_args=())
def _grouped_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (N, C), h (S, 2H), o (S, C)): the output and, for the backward, the sorted projections."""
    order, tok, sizes = _sort(experts, gate_up.shape[0])
    h = gmm(x[tok], gate_up.transpose(-2, -1), sizes)                     # (S, 2H)
    g, u = h.chunk(2, dim=-1)                                             # (S, H) each
    o = gmm(activation_fn(activation)(g) * u, down.transpose(-2, -1), sizes)  # (S, C)
    y = x.new_zeros(x.shape).index_add_(0, tok, o * weights.reshape(-1)[order, None].to(o.dtype))  # (N, C)
    return y, h, o


@_grouped_experts.register_fake
def _(x, weights, experts, gate_up, down, activation):  # noqa: ANN001, ANN202
    s = experts.numel()
    return x.new_empty(x.shape), x.new_empty(s, gate_up.shape[1]), x.new_empty(s, x.shape[1])


@torch.library.custom_op("torchgraft::grouped_experts_backward", mutates_args=())
def _grouped_experts_backward(dy: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                              gate_up: torch.Tensor, down: torch.Tensor, h: torch.Tensor, o: torch.Tensor,
                              activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (N, C), dweights (N, k), dgate_up (E, 2H, C), ddown (E, C, H)) for the output gradient dy."""
    order, tok, sizes = _sort(experts, gate_up.shape[0])
    g, u = h.chunk(2, dim=-1)                                             # (S, H) each
    act_g = activation_fn(activation)(g)
    a = act_g * u                                                         # (S, H)
    dys = dy[tok]                                                         # (S, C)
    dw = torch.zeros_like(weights.reshape(-1)).index_copy_(0, order, (dys * o).sum(-1).to(weights.dtype))
    do = dys * weights.reshape(-1)[order, None].to(dy.dtype)              # (S, C)
    ddown = gmm(do.t(), a, sizes)                                         # (E, C, H)
    da = gmm(do, down, sizes)                                             # (S, H)
    dh = torch.cat([_act_backward(activation, da * u, g), da * act_g], dim=-1)  # (S, 2H)
    dgate_up = gmm(dh.t(), x[tok], sizes)                                 # (E, 2H, C)
    dx = x.new_zeros(x.shape).index_add_(0, tok, gmm(dh, gate_up, sizes))  # (N, C)
    return dx, dw.view_as(weights), dgate_up, ddown


@_grouped_experts_backward.register_fake
def _(dy, x, weights, experts, gate_up, down, h, o, activation):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape), weights.new_empty(weights.shape), gate_up.new_empty(gate_up.shape), \
        down.new_empty(down.shape)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weights, experts, gate_up, down, activation = inputs
    _, h, o = output
    ctx.save_for_backward(x, weights, experts, gate_up, down, h, o)
    ctx.activation = activation


def _backward(ctx, dy, _dh, _do):  # noqa: ANN001, ANN202
    x, weights, experts, gate_up, down, h, o = ctx.saved_tensors
    dx, dw, dgu, dd = _grouped_experts_backward(dy.contiguous(), x, weights, experts, gate_up, down, h, o,
                                                ctx.activation)
    return dx, dw, None, dgu, dd, None


_grouped_experts.register_autograd(_backward, setup_context=_setup_context)


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, activation: str) -> torch.Tensor:
    """x (N, C), weights (N, k), experts (N, k) long, gate_up (E, 2H, C), down (E, C, H) -> (N, C)."""
    return _grouped_experts(x, weights, experts, gate_up, down, activation)[0]

"""Mixture-of-experts feed-forward block (Mixtral, Qwen3-MoE, Qwen2-MoE's shared expert).

`MoE(gate, routing, experts, shared_expert=None, shared_gate=None)`:

    logits  = gate(x)                      # (N, E) router scores, one per expert
    w, idx  = routing(logits)              # (N, k) weights and expert ids of each token
    y       = experts(x, w, idx)           # sum_j w[:, j] * expert_idx[:, j](x)
    y      += sigmoid(shared_gate(x)) * shared_expert(x)      (only when given)

The expert compute never loops over tokens: the N*k (token, expert) assignments are sorted by
expert, each expert's contiguous slice of the sorted batch is multiplied by its weights (one
grouped matmul over all experts, `torch._grouped_mm`), and the outputs are added back into token
order. This runs as one custom operator (`torchgraft/nn/moe_ops.py`, with a written-out backward),
in eager mode and inside `torch.compile` alike (opaque there, with its static (N, C) output shape).
Exported graphs (torch.export / ONNX) take `GroupedExperts.dense` instead: every expert on every
token, weighted 0 where not chosen (same result, E / k times the FLOPs; see docs/moe.md for why).
On meta tensors (FLOP counting, memory tracing) routing is data-dependent and unknown, so every
expert is given an equal share of the assignments (`GroupedExperts.traced`): the counts are the
*active* compute.

State-dict names (the layout of transformers 5.x): `gate.weight` (E, C),
`experts.gate_up_proj.weight` (E, 2H, C) with [gate; up] stacked, `experts.down_proj.weight` (E, C, H),
and `shared_expert.{gate,up,down}_proj.weight`, `shared_gate.weight` (1, C) when present.

The block keeps the router logits of its last forward in `router_logits` (N, E) so that a task can
add the load-balancing loss (`load_balancing_loss(router_logits_of(model), top_k)`) without the
model's forward returning anything but logits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.nn.mlp import activation_fn
from torchgraft.nn.moe_ops import grouped_experts


class SoftmaxTopK(nn.Module):
    """Routing: softmax over all experts (float32), keep the top-k, optionally renormalise them to
    sum to 1 (Mixtral always does; Qwen3-MoE when `norm_topk_prob`, Qwen2-MoE does not)."""

    def __init__(self, top_k: int, renormalize: bool = True):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (N, E) -> (weights (N, k) float32, expert ids (N, k) long)."""
        probs = logits.float().softmax(-1)                      # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)       # (N, k)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, experts

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, renormalize={self.renormalize}"


class RouterJitter(nn.Module):
    """Mixtral's `router_jitter_noise`: in training mode the block's input is multiplied by noise
    drawn uniformly from [1 - eps, 1 + eps] (one draw per element), seen by the router and the
    experts alike, as transformers' `MixtralSparseMoeBlock`; in eval mode it is the identity."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.eps == 0:
            return x
        return x * torch.empty_like(x).uniform_(1.0 - self.eps, 1.0 + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class ExpertLinear(nn.Module):
    """E bias-free linear maps `in_features -> out_features` stored as one (E, out, in) weight
    (the layout of E stacked `nn.Linear` weights); initialised like a Linear by `normal_init_`."""

    normal_init = True  # `torchgraft.nn.init.normal_init_` draws `weight` from normal(0, std)

    def __init__(self, n_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """x (S, in), rows grouped by expert (`sizes[e]` consecutive rows for expert e) -> (S, out).
        One `F.linear` per expert that got rows: the differentiable path of meta/fake tensors
        (FLOP and memory tracing); real tensors go through `torchgraft::grouped_experts`."""
        active = [e for e, n in enumerate(sizes) if n]
        # for autograd unbind, not weight[e]: the backward of E selects adds E full-size zero gradients
        weights = self.weight.unbind(0) if torch.is_grad_enabled() and self.weight.requires_grad else self.weight
        pieces = [F.linear(xe, weights[e]) for e, xe in zip(active, x.split([sizes[e] for e in active]))]
        if not pieces:
            return x.new_zeros(0, self.out_features)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, in_features={self.in_features}, out_features={self.out_features}"


def group_sizes(expert_ids: torch.Tensor, n_experts: int) -> list[int]:
    """How many of the (sorted) assignments go to each expert. On meta tensors the assignments are
    unknown (also on fake tensors) and are spread evenly (what a balanced router does), so counted FLOPs are active FLOPs."""
    from torch._subclasses.fake_tensor import is_fake

    n = expert_ids.numel()
    if expert_ids.is_meta or is_fake(expert_ids):
        return [n // n_experts + (e < n % n_experts) for e in range(n_experts)]
    return torch.bincount(expert_ids, minlength=n_experts).tolist()


class GroupedExperts(nn.Module):
    """E gated MLPs (`down(act(gate(x)) * up(x))`, SwiGLU with "silu") computed over the tokens
    routed to each, one matmul per expert over a batch sorted by expert."""

    output_projection = "down_proj"  # the layer writing into the residual stream

    def __init__(self, n_experts: int, dim: int, hidden: int, activation: str = "silu"):
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.activation = activation
        self.act = activation_fn(activation)
        self.gate_up_proj = ExpertLinear(n_experts, dim, 2 * hidden)
        self.down_proj = ExpertLinear(n_experts, hidden, dim)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (N, C), weights (N, k), experts (N, k) -> (N, C) = sum_j weights[:, j] * expert_j(x)."""
        from torch._subclasses.fake_tensor import is_fake

        if torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self.dense(x, weights, experts)  # exported graphs: no data-dependent shapes
        if not torch.compiler.is_compiling() and (x.is_meta or is_fake(x)):
            return self.traced(x, weights, experts)  # FLOP / memory tracing: routing unknown
        # eager and torch.compile (an opaque operator of static output shape): sparse
        return grouped_experts(x, weights, experts, self.gate_up_proj.weight, self.down_proj.weight,
                               self.activation)

    def traced(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The same sorted compute in plain differentiable ops, one matmul per expert (for meta and
        fake tensors, where `group_sizes` spreads the assignments evenly)."""
        n, k = experts.shape
        flat = experts.reshape(-1)                                 # (N*k,) assignment -> expert
        order = flat.argsort(stable=True)                          # assignments grouped by expert
        sizes = group_sizes(flat, self.n_experts)
        xs = x[order // k]                                         # (N*k, C) token of each assignment
        gate, up = self.gate_up_proj(xs, sizes).chunk(2, dim=-1)   # (N*k, H) each
        out = self.down_proj(self.act(gate) * up, sizes)           # (N*k, C)
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        unsorted = torch.empty_like(out)
        unsorted[order] = out                                      # back to (token, j) order
        return unsorted.view(n, k, -1).sum(1)                      # (N, C)

    def dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The same sum with every expert run on every token and weighted 0 where not chosen: E / k
        times the FLOPs, but no data-dependent shapes, so exported graphs (ONNX, torch.export) and
        torch.compile (one graph, e.g. the compiled decode step) hold it."""
        w = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device)
        w = w.scatter(1, experts, weights.to(x.dtype))                              # (N, E)
        h = torch.einsum("nc,ehc->neh", x, self.gate_up_proj.weight)                # (N, E, 2H)
        gate, up = h.chunk(2, dim=-1)                                               # (N, E, H)
        out = torch.einsum("neh,ech->nec", self.act(gate) * up, self.down_proj.weight)  # (N, E, C)
        return (out * w[..., None]).sum(1)                                          # (N, C)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class MoE(nn.Module):
    """Sparse mixture-of-experts MLP: router `gate` (Linear C -> E), a `routing` rule (e.g.
    `SoftmaxTopK`), `experts` (`GroupedExperts`), and optionally a dense `shared_expert` added to
    every token, scaled by `sigmoid(shared_gate(x))` when a `shared_gate` (Linear C -> 1) is given.
    `jitter` (e.g. `RouterJitter`) transforms the input of router and experts (train-time noise)."""

    output_projection = "experts.down_proj"  # the layer writing into the residual stream

    def __init__(self, gate: nn.Module, routing: nn.Module, experts: GroupedExperts,
                 shared_expert: nn.Module | None = None, shared_gate: nn.Module | None = None,
                 jitter: nn.Module | None = None):
        super().__init__()
        self.gate = gate
        self.routing = routing
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_gate = shared_gate
        self.jitter = jitter
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last forward

    @property
    def n_experts(self) -> int:
        return self.experts.n_experts

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = x.reshape(b * t, c)                                    # (N, C)
        if self.jitter is not None:
            h = self.jitter(h)                                     # (N, C), noisy in training only
        logits = self.gate(h)                                      # (N, E)
        self.router_logits = logits
        weights, experts = self.routing(logits)                    # (N, k), (N, k)
        y = self.experts(h, weights, experts)                      # (N, C)
        if self.shared_expert is not None:
            shared = self.shared_expert(h)                         # (N, C)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(h)) * shared
            y = y + shared
        return y.view(b, t, c)


def router_logits_of(model: nn.Module) -> list[torch.Tensor]:
    """The router logits (N, E) of every `MoE` block of `model` from its last forward, in order."""
    return [m.router_logits for m in model.modules() if isinstance(m, MoE) and m.router_logits is not None]


def moe_blocks(model: nn.Module) -> list[MoE]:
    """Every `MoE` block of `model`, in order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def inactive_expert_params(model: nn.Module) -> int:
    """Expert parameters a token does not use: (1 - top_k / E) of every MoE block's experts. The
    analytic 6N FLOPs of a mixture-of-experts model count only the active N."""
    return sum(sum(p.numel() for p in m.experts.parameters()) * (m.n_experts - m.top_k) // m.n_experts
               for m in moe_blocks(model))


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss as transformers' `load_balancing_loss_func` computes it:
    `E * sum_e f_e * P_e`, with f_e the fraction of top-k assignments to expert e and P_e its mean
    router probability, both over all layers' tokens together (padding excluded by `attention_mask`
    (B, T), whose flattened order matches the logits' rows). Perfectly even routing gives `top_k`."""
    if not router_logits:
        raise ValueError("load_balancing_loss needs the router logits of at least one MoE block")
    n_experts = router_logits[0].shape[-1]
    counts = torch.zeros(n_experts, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros_like(counts)
    rows = counts.new_zeros(())
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(counts)  # (N,)
    for logits in router_logits:
        probs = logits.float().softmax(-1)                         # (N, E)
        selected = probs.topk(top_k, dim=-1).indices               # (N, k)
        w = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask
        counts = counts.scatter_add(0, selected.reshape(-1), w.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * w[:, None]).sum(0)
        rows = rows + w.sum()
    return n_experts * ((counts / rows) * (prob_sum / rows)).sum()

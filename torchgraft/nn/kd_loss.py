"""Knowledge-distillation loss: a divergence between teacher and student next-token distributions,
mixed with the hard-label cross-entropy, optionally computed a chunk of token rows at a time.

Per target token (labels != -100), with p = softmax(teacher / T) and q = softmax(student / T):

    loss = (1 - alpha) * CE(student, label) + alpha * T^2 * D(p, q)

- `forward_kl`: KL(p || q) (mean-seeking; torchtune's ForwardKLLoss up to the teacher's entropy, a
  constant; TRL GKD's beta=0);
- `reverse_kl`: KL(q || p) (mode-seeking; TRL GKD's beta=1);
- `symmetric`: (KL(p || q) + KL(q || p)) / 2 (torchtune's SymmetricKLLoss with ratio 0.5);
- `jsd`: the Jensen-Shannon divergence 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2 (TRL GKD's
  generalized JSD at beta=0.5).

T^2 scaling (Hinton et al. 2015): the soft term's gradients shrink as 1/T^2, so scaling by T^2 keeps
the mix with the hard loss comparable across temperatures. The CE term is always at T = 1.

`chunked_distill_loss` equals `distill_loss` on the full logits (loss and gradients) but holds only
`chunk_size` rows of student and teacher logits at a time: like `chunked_cross_entropy`
(`torchgraft.nn.losses`), one autograd function walks the rows, computes each chunk's logits from the
final hidden states and the output embedding, and right away the gradients with respect to the
student's hidden states and weight (through a local autograd pass over that chunk's logits only);
backward scales them by the incoming gradient. So neither (N, V) logits tensor ever exists.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from torchgraft.nn.losses import IGNORE_INDEX, HeadGrads, _compute_dtype

Divergence = Literal["forward_kl", "reverse_kl", "symmetric", "jsd"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "symmetric", "jsd")


class DistillLoss(NamedTuple):
    """Sums over target tokens: `loss` (the mix, differentiable), `kd` (D at temperature T, no T^2),
    `ce` (hard-label cross-entropy), `count` (target tokens)."""
    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    count: torch.Tensor


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Divergence,
               temperature: float = 1.0) -> torch.Tensor:
    """Per-row divergence (N,) between softmax(teacher / T) and softmax(student / T), in float32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V) log q
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V) log p
    if kind == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1)
    if kind == "symmetric":
        return 0.5 * ((t.exp() - s.exp()) * (t - s)).sum(-1)  # (KL(p||q) + KL(q||p)) / 2
    if kind == "jsd":
        m = torch.logaddexp(s, t) - math.log(2.0)  # log((p + q) / 2)
        return 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def _rows_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               kind: Divergence, temperature: float, alpha: float) -> DistillLoss:
    """The loss of rows (N, V) / (N, V) / (N,), summed over rows whose label is not ignored."""
    valid = labels != IGNORE_INDEX  # (N,)
    kd = torch.where(valid, divergence(student_logits, teacher_logits, kind, temperature), 0.0).sum()
    ce = F.cross_entropy(student_logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = (1.0 - alpha) * ce + (alpha * temperature ** 2) * kd
    return DistillLoss(loss, kd.detach(), ce.detach(), valid.sum())


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 kind: Divergence = "forward_kl", temperature: float = 1.0, alpha: float = 0.5) -> DistillLoss:
    """The distillation loss on full logits (..., V) (the reference the chunked version equals)."""
    v = student_logits.shape[-1]
    if teacher_logits.shape[-1] != v:
        raise ValueError(f"student has {v} logits per token but the teacher {teacher_logits.shape[-1]}")
    return _rows_loss(student_logits.reshape(-1, v), teacher_logits.reshape(-1, v), labels.reshape(-1),
                      kind, temperature, alpha)


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, t_hidden: torch.Tensor, t_weight: torch.Tensor,
                labels: torch.Tensor, chunk_size: int, kind: str, temperature: float, alpha: float,
                dtype: torch.dtype, need_grad: bool):
        n = hidden.shape[0]
        w, tw = weight.to(dtype), t_weight.to(dtype)  # (V, C), (V, Ct)
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)  # loss, kd, ce
        grads = HeadGrads(ctx, hidden, weight, need_grad)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                h = hidden[start:start + chunk_size].to(dtype)  # (n_c, C)
                y = labels[start:start + chunk_size]  # (n_c,)
                t_logits = (t_hidden[start:start + chunk_size].to(dtype) @ tw.t()).float()  # (n_c, V)
                z = (h @ w.t()).float().detach()  # (n_c, V), a leaf of the local autograd pass
                with torch.enable_grad():
                    z.requires_grad_(grads.wanted)
                    part = _rows_loss(z, t_logits, y, kind, temperature, alpha)
                    if z.requires_grad:
                        (g,) = torch.autograd.grad(part.loss, z)  # (n_c, V) d loss / d logits
                sums += torch.stack([part.loss.detach(), part.kd, part.ce])
                if z.requires_grad:
                    grads.add(start, g, h, w)
        grads.save(ctx, weight)
        kd, ce = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(kd, ce)
        return sums[0].clone(), kd, ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_kd: torch.Tensor, _grad_ce: torch.Tensor):
        return (*HeadGrads.scaled(ctx, grad_loss), None, None, None, None, None, None, None, None, None)


def chunked_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                         teacher_weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024,
                         kind: Divergence = "forward_kl", temperature: float = 1.0,
                         alpha: float = 0.5) -> DistillLoss:
    """`distill_loss(hidden @ weight.T, teacher_hidden @ teacher_weight.T, labels, ...)`, `chunk_size`
    token rows at a time. hidden (..., C), weight (V, C), teacher_hidden (..., Ct), teacher_weight
    (V, Ct), labels (...). Gradients flow to `hidden` and `weight` only (the teacher is frozen)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"student has {weight.shape[0]} output rows but the teacher {teacher_weight.shape[0]}")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()  # (N, Ct)
    y = labels.reshape(-1)  # (N,)
    if not h.shape[0] == th.shape[0] == y.shape[0]:
        raise ValueError(f"rows differ: student {h.shape[0]}, teacher {th.shape[0]}, labels {y.shape[0]}")
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, kd, ce = _ChunkedDistill.apply(h, weight, th, teacher_weight.detach(), y, chunk_size, kind,
                                         float(temperature), float(alpha), _compute_dtype(h), need_grad)
    return DistillLoss(loss, kd, ce, (y != IGNORE_INDEX).sum())

"""Chunked cross-entropy over a vocabulary projection, without the full (N, V) logits tensor.

`chunked_cross_entropy(hidden, weight, labels, chunk_size)` equals
`F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction=...)` (loss and gradients),
but only ever holds `chunk_size` rows of logits at a time. For a 128k vocabulary the full fp32
logits (and their gradient) of a 12 x 1024-token batch are 2 x 6 GiB; chunked they are
`chunk_size x V` floats, reused.

How: one autograd function whose forward walks the rows in chunks, computes each chunk's logits
(in the autocast dtype if autocast is on, as the plain projection would), its log-sum-exp in
float32, the loss and, right away, the gradients with respect to the hidden states and the weight
(softmax - one-hot, the usual CE gradient). Backward only scales the stored gradients by the
incoming grad, so the projection runs once, never twice (the approach of Liger-Kernel's fused
linear cross-entropy, written here in plain PyTorch).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the plain `F.linear` would run in: the autocast dtype when autocast is on."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


class HeadGrads:
    """Gradients of a chunked vocabulary head `hidden @ weight.T`, accumulated chunk by chunk during the
    forward pass (so the (N, V) logits never exist at once) and scaled by the upstream gradient in
    backward. Shared by the chunked cross-entropy and the chunked distillation loss."""

    def __init__(self, ctx, hidden: torch.Tensor, weight: torch.Tensor, need_grad: bool):
        self.grad_h = torch.empty_like(hidden) if need_grad and ctx.needs_input_grad[0] else None  # (N, C)
        self.grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if need_grad and ctx.needs_input_grad[1] else None)  # (V, C) fp32 accumulator

    @property
    def wanted(self) -> bool:
        return self.grad_h is not None or self.grad_w is not None

    def add(self, start: int, g: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        """One chunk: g (n_c, V) = d loss / d logits of rows `start:start + n_c`, h (n_c, C) and w (V, C)
        in the compute dtype."""
        g = g.to(w.dtype)
        if self.grad_h is not None:
            self.grad_h[start:start + g.shape[0]] = (g @ w).to(self.grad_h.dtype)
        if self.grad_w is not None:
            self.grad_w += (g.t() @ h).float()

    def save(self, ctx, weight: torch.Tensor) -> None:
        ctx.save_for_backward(self.grad_h if self.grad_h is not None else torch.empty(0),
                              self.grad_w if self.grad_w is not None else torch.empty(0))
        ctx.has = (self.grad_h is not None, self.grad_w is not None)
        ctx.weight_dtype = weight.dtype

    @staticmethod
    def scaled(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(d hidden, d weight) for the upstream gradient `grad_out` of the summed loss."""
        grad_h, grad_w = ctx.saved_tensors
        has_h, has_w = ctx.has
        gh = grad_h * grad_out.to(grad_h.dtype) if has_h else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if has_w else None
        return gh, gw


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                ignore_index: int, dtype: torch.dtype, need_grad: bool) -> torch.Tensor:
        n = hidden.shape[0]
        w = weight.to(dtype)  # (V, C)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = HeadGrads(ctx, hidden, weight, need_grad)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                h = hidden[start:start + chunk_size].to(dtype)  # (n_c, C)
                y = labels[start:start + chunk_size]  # (n_c,)
                logits = (h @ w.t()).float()  # (n_c, V)
                valid = y != ignore_index
                target = torch.where(valid, y, 0)
                lse = torch.logsumexp(logits, dim=-1)  # (n_c,)
                picked = logits.gather(1, target[:, None])[:, 0]
                loss += torch.where(valid, lse - picked, 0.0).sum()
                if not grads.wanted:
                    continue
                # d(sum CE)/d logits = softmax - onehot, zero on ignored rows; reuse the logits buffer
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, target[:, None], torch.full_like(picked[:, None], -1.0))
                g.mul_(valid[:, None])
                grads.add(start, g, h, w)
        grads.save(ctx, weight)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return (*HeadGrads.scaled(ctx, grad_out), None, None, None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX,
                          reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels` computed `chunk_size` rows at a time.

    hidden (..., C), weight (V, C) (an `nn.Linear` weight or a tied embedding), labels (...) with
    `ignore_index` for rows without a target. `reduction`: "sum" (what `Task.loss_sum` returns) or
    "mean" (over non-ignored rows). Loss and gradients match the unchunked
    `F.cross_entropy(F.linear(hidden, weight).float(), labels)` up to float rounding; no (N, V)
    tensor is ever allocated.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    y = labels.reshape(-1)  # (N,)
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} rows but labels has {y.shape[0]}")
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss = _ChunkedCE.apply(h, weight, y, chunk_size, ignore_index, _compute_dtype(h), need_grad)
    if reduction == "mean":
        loss = loss / (y != ignore_index).sum().clamp(min=1)
    return loss


def cross_entropy_peak_bytes(n_rows: int, vocab_size: int, chunk_size: int | None = None,
                             bytes_per_logit: int = 4) -> int:
    """Bytes of logit-sized temporaries one CE step holds at its peak: the plain path keeps the
    fp32 logits (N, V) and their gradient; the chunked path one (chunk, V) fp32 buffer plus its
    compute-dtype copy. Used by `tools/memory.py`."""
    rows = n_rows if chunk_size is None else min(chunk_size, n_rows)
    return 2 * rows * vocab_size * bytes_per_logit


@torch.no_grad()
def chunked_cross_entropy_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluation statistics without the full logits: (summed CE as float64, target count,
    correct argmax predictions), `chunk_size` rows at a time."""
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    y = labels.reshape(-1)
    dtype = _compute_dtype(h)
    w = weight.to(dtype)
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    correct = torch.zeros((), dtype=torch.long, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, h.shape[0], chunk_size):
            logits = (h[start:start + chunk_size].to(dtype) @ w.t()).float()  # (n_c, V)
            yc = y[start:start + chunk_size]
            valid = yc != ignore_index
            loss += torch.nn.functional.cross_entropy(logits, yc, ignore_index=ignore_index,
                                                      reduction="sum").double()
            correct += ((logits.argmax(-1) == yc) & valid).sum()
    return loss, (y != ignore_index).sum(), correct

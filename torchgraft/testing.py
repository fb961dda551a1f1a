"""Float tolerances derived from the computation, for tests that compare two floating-point results.

    from torchgraft.testing import assert_close_computed, model_tol, tolerance, transformer_tol

    assert_close_computed(cached, full, transformer_tol(model.config, seq_len=T))
    assert_close_computed(big(x), small(x), model_tol(big))
    assert_close_computed(mine, ref, tolerance(reduction=1600, depth=4))

The rule (docs/testing.md):
- "identical" (same inputs, same ops, same shapes, so the same kernels): compare exactly,
  `torch.equal` or `assert_close(..., rtol=0, atol=0)`. No tolerance at all.
- "close" (the same maths computed by another path: a KV cache vs a full forward, padded vs
  unpadded, ours vs transformers, or another CPU's kernels: AVX-512 blocks sums differently from
  AVX2): allow the worst-case rounding error of that maths, `tolerance()`. A sum of n products in
  any order is within n*u*sum|terms| of the exact sum (u = eps/2; Higham's gamma_n), so two orders
  differ by at most n*eps*sum|terms|; every layer a value passes through adds its own such error
  (`depth`). Rounding errors scale with the terms summed, not with each output element, so the
  bound is absolute, `tol * scale`, with `scale` the largest magnitude compared (or one you know).
Never a literal picked from what one machine printed.
"""
from __future__ import annotations

from typing import Any

import torch


def tolerance(reduction: int, depth: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Relative worst-case difference between two evaluation orders of a `depth`-layer computation
    whose longest reduction (dot product, sum, conv window) has `reduction` terms.

    Products accumulate in fp32 (CPU kernels do, for bf16/fp16 too; fp64 in fp64); a
    lower-precision `dtype` adds one rounding of the output per layer:
    `depth * (reduction * eps(accumulation) + eps(dtype))`.
    """
    if reduction < 1 or depth < 1:
        raise ValueError(f"reduction and depth must be >= 1, got {reduction} and {depth}")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.finfo(dtype).eps if dtype.itemsize < 4 else 0.0
    return depth * (reduction * torch.finfo(acc).eps + out)


def transformer_tol(config: Any, seq_len: int, dtype: torch.dtype = torch.float32) -> float:
    """`tolerance` of a transformer's output: the longest reduction is the hidden width, the MLP
    width or the attention's `seq_len` keys; depth is one per layer plus the output head."""
    width = getattr(config, "n_embd", None) or config.hidden_size  # torchgraft or transformers names
    mlp = getattr(config, "intermediate_size", None) or 4 * width
    n_layer = getattr(config, "n_layer", None) or config.num_hidden_layers
    return tolerance(max(width, mlp, seq_len), n_layer + 1, dtype)


def model_tol(model: torch.nn.Module, seq_len: int | None = None, dtype: torch.dtype = torch.float32) -> float:
    """`tolerance` of a model's output. A transformer (its `config` has layers and a width):
    `transformer_tol(config, seq_len or block_size)`. Anything else, a stack of Linear / Conv layers
    (an MLP, LeNet, a ResNet): the longest sum is the widest layer input (in_features, or
    in_channels x kernel window), depth the number of such layers (an upper bound when branching)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and any(getattr(cfg, k, None) for k in ("n_layer", "num_hidden_layers")) and \
            any(getattr(cfg, k, None) for k in ("n_embd", "hidden_size")):
        return transformer_tol(cfg, seq_len or getattr(cfg, "block_size", None) or 1, dtype)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layers; use tolerance()")
    terms = [m.in_features if isinstance(m, torch.nn.Linear) else m.weight[0].numel() for m in layers]
    return tolerance(max(terms), len(layers), dtype)


def assert_close_computed(actual: torch.Tensor, expected: torch.Tensor, tol: float, *,
                          scale: float | None = None, msg: str = "") -> None:
    """Assert `|actual - expected| <= tol * scale` everywhere (`scale`: the largest |value| of the
    two, unless given); the message names the worst difference and the bound."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{msg + ': ' if msg else ''}shapes differ: {tuple(actual.shape)} vs "
                             f"{tuple(expected.shape)}")
    a, e = actual.detach().double(), expected.detach().double()
    if scale is None:
        scale = float(torch.maximum(a.abs().max(), e.abs().max())) if a.numel() else 0.0
    bound = tol * scale
    diff = float((a - e).abs().max()) if a.numel() else 0.0
    if not diff <= bound:  # also catches NaN
        raise AssertionError(f"{msg + ': ' if msg else ''}max |diff| {diff:.3e} > {bound:.3e} "
                             f"(tol {tol:.3e} x scale {scale:.3g})")

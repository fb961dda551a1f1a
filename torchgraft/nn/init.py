"""Weight-initialisation helpers shared by the model families."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def normal_init_(module: nn.Module, std: float) -> None:
    """GPT-2/BERT scheme over every submodule: normal(0, std) Linear and Embedding weights, zero
    biases, and norms (LayerNorm, or anything with `eps` and `weight`) reset to ones/zeros.
    Modules declaring `normal_init = True` (stacked expert weights) get a normal(0, std) `weight`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) or getattr(m, "normal_init", False):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.LayerNorm) or (hasattr(m, "eps") and hasattr(m, "weight")):
            m.reset_parameters()


class SkipInitOnMeta(torch.overrides.TorchFunctionMode):
    """Inside it, random initialisers (`nn.init.normal_`, `Tensor.uniform_`, ...) called on meta
    tensors return the tensor untouched: a meta tensor holds no values, so there is nothing to fill.
    Why: torch implements several of them on meta with Python reference kernels whose first call
    imports torch._dynamo (~1.5 s of CPU), which building a model on meta would otherwise pay.
    Initialisers on real tensors run as usual (`materialize` initialises after allocating)."""

    _SKIP = frozenset({
        nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, nn.init.kaiming_normal_,
        nn.init.kaiming_uniform_, nn.init.xavier_normal_, nn.init.xavier_uniform_, nn.init.orthogonal_,
        nn.init.sparse_, torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_,
        torch.Tensor.bernoulli_, torch.Tensor.exponential_, torch.Tensor.geometric_,
        torch.Tensor.log_normal_, torch.Tensor.cauchy_,
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in self._SKIP:
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)

"""What every frozen quantised linear shares: its shape, its compute dtype and a way back to floats.

The LoRA wrapper, the merge (dequantise, then fold the adapter in) and the planner only rely on this
interface, so a new base format is one new file with a `QuantizedLinear` subclass and a converter.
"""
from __future__ import annotations

import torch
from torch import nn

from torchgraft.errors import ConfigError


class DequantMatmul(torch.autograd.Function):
    """`x @ layer.dequantize().T`, dequantising again in backward instead of saving a float copy.

    Backward computes `grad @ W` with W laid out transposed (a (out, in) view of an (in, out)
    buffer): for bf16 on CPUs without AVX-512, PyTorch's matmul with a plain row-major right-hand
    side takes a scalar path ~70x slower (measured: 11 s vs 0.17 s for 16 x 5632 @ 5632 x 2048).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return torch.nn.functional.linear(x, layer.dequantize().to(x.dtype))  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.layer.dequantize().to(grad.dtype).t().contiguous().t()  # (out, in), column-major
        return grad @ w, None  # (..., in)


def require_torchao(what: str) -> None:
    """Raise a one-line ConfigError when torchao is not importable."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs torchao; install it with `pip install 'torchgraft[qlora]'` "
                          "(or pick another option)") from None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantised; `forward(x)` computes in `x`'s dtype.

    Subclasses store the weight under the name `weight` (so state-dict names stay those of the
    nn.Linear they replace) and define `dequantize()`; the bias, if any, stays a frozen float tensor.
    """

    fmt: str  # "nf4", "int8"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = dtype
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def dequantize(self) -> torch.Tensor:
        """The (out, in) weight in `compute_dtype`."""
        raise NotImplementedError

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantised weight (for merging and for PEFT / transformers)."""
        dtype = dtype or self.compute_dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.dequantize().to(dtype), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return lin

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, " \
               f"bias={self.bias is not None}"


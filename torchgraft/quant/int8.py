"""int8 weight-only base: one symmetric scale per output row, as torchao's `Int8WeightOnlyConfig`
(`choose_qparams_affine` / `quantize_affine` / `dequantize_affine` with per-row blocks, used here).

Half the memory of bf16 and a smaller error than NF4; the weight is stored as plain int8 + scale
tensors (`weight`, `weight_scale`), dequantised per call by `DequantMatmul`, so that backward
recomputes it instead of keeping a float copy for every layer.
"""
from __future__ import annotations

import torch
from torch import nn

from torchgraft.quant.base import DequantMatmul, QuantizedLinear


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (out, in), scale (out, 1) in weight's dtype): torchao's symmetric per-row int8."""
    from torchao.quantization import MappingType, choose_qparams_affine, quantize_affine

    w = weight.detach()
    block = (1, w.shape[1])
    scale, zero = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, -128, 127,
                                     eps=torch.finfo(torch.float32).eps, scale_dtype=w.dtype)
    codes = quantize_affine(w, block, scale, zero, torch.int8, -128, 127)  # zero point is 0 (symmetric)
    return codes, scale.reshape(-1, 1)


class Int8Linear(QuantizedLinear):
    """Frozen int8 weight-only linear (per-row scales); gradients flow to `x` only."""

    fmt = "int8"

    def __init__(self, linear: nn.Linear, name: str = "linear"):
        super().__init__(linear.in_features, linear.out_features, linear.bias, linear.weight.dtype)
        codes, scale = quantize_int8(linear.weight)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return (self.weight.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype))  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(DequantMatmul.apply(x, self))  # (..., out)

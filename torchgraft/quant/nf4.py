"""NF4 (4-bit NormalFloat, QLoRA paper) weights: blocks of 64 values share an absmax scale, and the
scales are themselves quantised to int8 in blocks of 256 around their mean ("double quantisation").

Storage is torchao's `NF4Tensor` (its dequantise is used as is; the matmul is `DequantMatmul`, like
torchao's `linear_nf4` but with a backward layout that is fast on CPUs without AVX-512). The 4-bit codes are computed here in float32 against the exact NF4 levels (nearest level, ties
to the lower one), which is what bitsandbytes does, so codes and first-level absmax agree with
`bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")` bit for bit; torchao's own `to_nf4`
rounds the levels to four decimals and scales in the weight's dtype, so a few codes per 10^4 that
sit on a level midpoint differ from it (tests/test_quant_nf4.py measures both).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.quant.base import DequantMatmul, QuantizedLinear

BLOCK = 64          # values per absmax scale (QLoRA, torchao, bitsandbytes)
SCALER_BLOCK = 256  # scales per int8 block of the second quantisation
# the 16 NF4 levels (quantiles of N(0, 1) normalised to [-1, 1]), float32, as bitsandbytes stores them
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
_CHUNK_BLOCKS = 16384  # blocks quantised at once: bounds the float32 temporaries to 4 MiB


def check_blockable(name: str, shape: tuple[int, ...]) -> None:
    """ConfigError naming the layer when its weight cannot be cut into NF4 blocks of 64."""
    numel = math.prod(shape)
    if numel % BLOCK:
        raise ConfigError(f"layer {name!r} has a {tuple(shape)} weight ({numel} values), not a multiple of "
                          f"the NF4 block of {BLOCK}; leave it out of the LoRA targets or use "
                          "quantize_base=int8")


def scaler_block_size(n_blocks: int) -> int:
    """256 scales per int8 block when the block count allows, else the largest power of two dividing it."""
    return math.gcd(n_blocks, SCALER_BLOCK)


def nf4_codes(weight: torch.Tensor, block_size: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes uint8 (numel/2,), absmax float32 (numel/block,)): two codes per byte, first value
    in the high nibble. Computed in chunks of blocks, in float32."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=weight.device)
    bounds = (levels[:-1] + levels[1:]) / 2  # (15,) decision thresholds
    blocks = weight.reshape(-1, block_size)  # (n_blocks, 64)
    packed = torch.empty(weight.numel() // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(blocks.shape[0], dtype=torch.float32, device=weight.device)
    half = block_size // 2
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = blocks[start:start + _CHUNK_BLOCKS].float()  # (b, 64)
        amax = chunk.abs().amax(dim=1)  # (b,)
        absmax[start:start + len(chunk)] = amax
        scaled = torch.clamp(chunk * (1.0 / amax.clamp(min=1e-38)).unsqueeze(1), -1, 1)
        q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8).reshape(-1)  # (b*64,)
        packed[start * half:(start + len(chunk)) * half] = (q[::2] << 4) | q[1::2]
    return packed, absmax


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK) -> torch.Tensor:
    """`weight` (any float dtype, numel a multiple of `block_size`) as a torchao `NF4Tensor` with
    double-quantised scales; dequantising gives back `weight`'s dtype."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, SubclassTensorArgs

    weight = weight.detach().contiguous()
    n_blocks = weight.numel() // block_size
    sblock = scaler_block_size(n_blocks)
    codes, _ = nf4_codes(weight, block_size)
    qscalers, qfactor, smean = NF4Tensor.double_quantize_scalers(weight.flatten(), block_size, sblock)
    meta = SubclassTensorArgs(weight.size(), weight.stride(), weight.storage_offset(), weight.dtype,
                              weight.device, False)
    levels = torch.tensor(NF4_LEVELS, dtype=weight.dtype, device=weight.device)
    return NF4Tensor(meta, block_size, n_blocks, sblock, qscalers, qfactor, smean, codes, levels)


class NF4Linear(QuantizedLinear):
    """Frozen NF4 linear: `y = x @ dequant(W).T + b`, the weight dequantised per call (forward and
    backward) and never kept in high precision; gradients flow to `x` only."""

    fmt = "nf4"

    def __init__(self, linear: nn.Linear, name: str = "linear"):
        check_blockable(name, tuple(linear.weight.shape))
        super().__init__(linear.in_features, linear.out_features, linear.bias, linear.weight.dtype)
        self.weight = nn.Parameter(quantize_nf4(linear.weight), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return self.weight.get_original_weight()  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(DequantMatmul.apply(x, self))  # (..., out)

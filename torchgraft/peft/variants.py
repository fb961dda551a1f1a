"""What a LoRA layer does with its low-rank branch, as a variant object the layer delegates to
(PEFT's `LoraVariant` idea): plain LoRA adds it; DoRA also rescales every output unit to a learned
magnitude. One DoRA variant per layer type, because the norm runs over a different axis each.

A variant is created per wrapped layer (DoRA keeps the weight norm it merged with, to unmerge
exactly); its parameters live on the layer (`lora_magnitude_vector.default`), so state-dict names
stay PEFT's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER = "default"  # the PEFT adapter name used in state-dict keys


class LoRAVariant:
    """Plain LoRA: `y = base(x) + lora`; merging adds `s * B @ A` to W."""

    dora = False

    def init(self, layer: nn.Module) -> None:
        """Create the variant's parameters on `layer` (after its A and B exist)."""

    def merged(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight, given `W + delta` (float32)."""
        return weight

    def unmerged(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """Undo `merged`: from the merged weight back to `W + delta` (float32)."""
        return weight

    def update(self, layer: nn.Module, h: torch.Tensor, result: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """What the layer adds to `result = base(x)`, given the dropped-out input `h` and `lora`."""
        return lora


class DoRAVariant(LoRAVariant):
    """DoRA: `y = m / ||W + s*B@A|| * (W + s*B@A) x + bias`, the norm detached, `m` initialised to
    the norms of W per output unit. Subclasses give the norm axis and the forward update."""

    dora = True

    def __init__(self) -> None:
        self._merged_norm: torch.Tensor | None = None

    def weight_norm(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """Norm of `weight` per output unit, shaped like the magnitude vector."""
        raise NotImplementedError

    def scale_shape(self, layer: nn.Module) -> tuple[int, ...]:
        """Shape that broadcasts the magnitude against the base weight."""
        raise NotImplementedError

    @staticmethod
    def magnitude(layer: nn.Module) -> torch.Tensor:
        return layer.lora_magnitude_vector[ADAPTER]

    def init(self, layer: nn.Module) -> None:
        with torch.no_grad():
            norm = self.weight_norm(layer, layer.base_layer.weight.float() + layer.delta_weight().float())
        layer.lora_magnitude_vector = nn.ParameterDict(
            {ADAPTER: nn.Parameter(norm.to(layer.base_layer.weight.dtype))})

    def merged(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        self._merged_norm = norm = self.weight_norm(layer, weight)
        return (self.magnitude(layer).float() / norm).reshape(self.scale_shape(layer)) * weight

    def unmerged(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        scale = (self.magnitude(layer).float() / self._merged_norm).reshape(self.scale_shape(layer))
        self._merged_norm = None
        return weight / scale


class DoRALinear(DoRAVariant):
    """Norm over each output row of the (out, in) weight (transformers' Conv1D stores (in, out))."""

    def weight_norm(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(layer.w_out_in(weight), dim=1)  # (out,)

    def scale_shape(self, layer: nn.Module) -> tuple[int, ...]:
        return (1, -1) if layer.fan_in_fan_out else (-1, 1)

    def update(self, layer: nn.Module, h: torch.Tensor, result: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        A, B = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        w = layer.w_out_in(layer.base_layer.weight).to(h.dtype)  # (out, in)
        with torch.no_grad():
            lora_w = (B.weight @ A.weight) * layer.scaling
        norm = torch.linalg.norm(w + lora_w, dim=1).detach()  # (out,)
        scale = (self.magnitude(layer) / norm).view(1, -1)
        if isinstance(layer.lora_dropout, nn.Identity) or not layer.training:
            base = result if layer.base_layer.bias is None else result - layer.base_layer.bias
        else:
            base = F.linear(h, w)
        return (scale - 1) * base + scale * lora


class DoRAConv2d(DoRAVariant):
    """Norm over each output channel's (in, kh, kw) kernel."""

    def weight_norm(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.norm(p=2, dim=(1, 2, 3), keepdim=True).transpose(1, 0)  # (1, out, 1, 1)

    def scale_shape(self, layer: nn.Module) -> tuple[int, ...]:
        return (-1, 1, 1, 1)

    def update(self, layer: nn.Module, h: torch.Tensor, result: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        c = layer.base_layer
        w = c.weight.to(h.dtype)
        with torch.no_grad():
            lora_w = layer.delta_weight()
        scale = self.magnitude(layer) / self.weight_norm(layer, w + lora_w).detach()  # (1, out, 1, 1)
        if isinstance(layer.lora_dropout, nn.Identity) or not layer.training:
            base = result if c.bias is None else result - c.bias.view(1, -1, 1, 1)
        else:
            base = F.conv2d(h, w, None, c.stride, c.padding, c.dilation, c.groups)
        return (scale - 1) * base + scale * lora


class DoRAEmbedding(DoRAVariant):
    """Norm per embedding dimension (over the vocabulary), as PEFT."""

    def weight_norm(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight, dim=0)  # (C,)

    def scale_shape(self, layer: nn.Module) -> tuple[int, ...]:
        return (1, -1)

    def update(self, layer: nn.Module, h: torch.Tensor, result: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            norm = self.weight_norm(layer, layer.base_layer.weight + layer.delta_weight())
        scale = self.magnitude(layer) / norm.detach()  # (C,)
        return (scale - 1) * result + scale * lora

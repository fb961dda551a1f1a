"""LeNet-style CNN from the seed document (input 1x32x32)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchgraft.models.parts import ModelParts, image_inputs
from torchgraft.models.registry import register_family, register_preset


@dataclass
class LeNetConfig:
    num_classes: int = 10
    in_chans: int = 1
    image_size: int = 32
    conv_channels: tuple[int, int] = (20, 64)
    hidden: int = 1024


class LeNet(nn.Module):
    """conv(1->20, 5x5) -> ReLU -> pool -> conv(20->64, 5x5) -> ReLU -> pool -> fc 1024 -> ReLU -> fc."""

    def __init__(self, config: LeNetConfig):
        super().__init__()
        self.config = config
        c1, c2 = config.conv_channels
        self.conv1 = nn.Conv2d(config.in_chans, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        side = ((config.image_size - 4) // 2 - 4) // 2  # 32 -> 28 -> 14 -> 10 -> 5
        self.fc1 = nn.Linear(c2 * side * side, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.num_classes)  # the head

    def parts(self) -> ModelParts:
        """No repeated blocks; `conv1` sees the image, `fc2` is the head."""
        return ModelParts(input_layer="conv1", classifier="fc2", example_inputs=self.example_inputs)

    def example_inputs(self, batch_size: int = 1, seq_len: int | None = None) -> tuple[torch.Tensor]:
        """`(images,)` (batch_size, in_chans, image_size, image_size); `seq_len` is ignored."""
        return image_inputs(self, self.config.in_chans, self.config.image_size, batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)  # (B, 20, 14, 14)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, 64, 5, 5)
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, 1024)
        return self.fc2(x)  # (B, num_classes)


register_family("lenet", LeNetConfig, LeNet)
register_preset("lenet", "lenet", description="classic small CNN for 1x32x32 digits")

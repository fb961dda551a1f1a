"""ResNet family with torchvision's state-dict names (`conv1`, `bn1`, `layer1.0.conv1`, ...,
`layerN.0.downsample.0/1`, `fc`), so torchvision weights load as they are."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.models.parts import ModelParts, image_inputs
from torchgraft.models.registry import register_family, register_preset
from torchgraft.nn.conv import BasicBlock, Bottleneck, downsample


@dataclass
class ResNetConfig:
    block: Literal["basic", "bottleneck"] = "basic"
    layers: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_classes: int = 1000  # 0 = no fc (forward returns pooled features)
    in_chans: int = 3
    width: int = 64  # channels of the stem and layer1
    zero_init_residual: bool = False

    def __post_init__(self):
        if any(n < 1 for n in self.layers):
            raise ConfigError(f"model.layers must be four positive block counts, got {self.layers}")


class ResNet(nn.Module):
    """`forward(x (B, C, H, W)) -> logits (B, num_classes)`."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = c = config
        block = BasicBlock if c.block == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(c.in_chans, c.width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c.width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = c.width
        for i, n in enumerate(c.layers):
            width = c.width * 2 ** i
            stride = 1 if i == 0 else 2
            cout = width * block.expansion
            ds = downsample(cin, cout, stride) if stride != 1 or cin != cout else None
            blocks = [block(cin, width, stride, ds)] + [block(cout, width) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.num_features = cin
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, c.num_classes) if c.num_classes > 0 else nn.Identity()
        if not self.conv1.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """torchvision: kaiming_normal(fan_out, relu) convs, unit BN; optional zero-init of the last BN
        in each residual branch; fc keeps nn.Linear's default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
        if self.config.zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def parts(self) -> ModelParts:
        """Blocks are the residual blocks of every stage; their last BatchNorm (bn2 / bn3, the one
        `zero_init_residual` zeroes) is what writes into the residual stream."""
        blocks = tuple(f"layer{i + 1}.{j}" for i, n in enumerate(self.config.layers) for j in range(n))
        last_bn = "bn3" if self.config.block == "bottleneck" else "bn2"
        return ModelParts(blocks=blocks, input_layer="conv1",
                          classifier="fc" if self.config.num_classes > 0 else None,
                          residual_projections=tuple(f"{b}.{last_bn}" for b in blocks),
                          example_inputs=self.example_inputs)

    def example_inputs(self, batch_size: int = 1, seq_len: int | None = None) -> tuple[torch.Tensor]:
        """`(images,)` (batch_size, in_chans, 224, 224) (ImageNet size); `seq_len` is ignored."""
        return image_inputs(self, self.config.in_chans, 224, batch_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, num_features)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


register_family("resnet", ResNetConfig, ResNet)
register_preset("resnet18", "resnet", description="ResNet-18", block="basic", layers=(2, 2, 2, 2))
register_preset("resnet34", "resnet", description="ResNet-34", block="basic", layers=(3, 4, 6, 3))
register_preset("resnet50", "resnet", description="ResNet-50 (torchvision v1.5)", block="bottleneck",
                layers=(3, 4, 6, 3))

"""CIFAR-style ResNets (He et al. 2016, "Deep Residual Learning", section 4.2).

Depth ``6n + 2``: a 3x3 stem, three stages of ``n`` BasicBlocks with 16/32/64 channels (the first
block of stages 2 and 3 halves the resolution), global average pooling and a Linear classifier.

Shortcuts follow *option B*: when the shape changes the identity is replaced by a 1x1 conv + BN
projection (option A, the zero-padded identity used for the paper's 0.27M resnet20, has no
parameters; option B adds 2,752 to resnet20: 272,474 instead of 269,722).

The graph is written for torch.fx (our quantization pass): every ReLU is its own non-inplace
``nn.ReLU`` module, called once; the residual add is a plain ``out + identity``; no
data-dependent control flow.
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.errors import ModelError

__all__ = ["BasicBlock", "ResNetCifar", "resnet8", "resnet20", "resnet32", "resnet56"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResNetCifar(nn.Module):
    """ResNet of depth ``6n + 2`` for 32x32 inputs (any size >= 8 works: pooling is global)."""

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth}")
        _check_positive(num_classes=num_classes, in_channels=in_channels)
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        stages = []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, w, stride))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _check_positive(**values: int) -> None:
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ModelError(f"{key} must be a positive integer, got {v!r}")


def resnet8(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    return ResNetCifar(8, num_classes=num_classes, in_channels=in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    return ResNetCifar(20, num_classes=num_classes, in_channels=in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    return ResNetCifar(32, num_classes=num_classes, in_channels=in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    return ResNetCifar(56, num_classes=num_classes, in_channels=in_channels)

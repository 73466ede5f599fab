"""Small CNNs for tiny inputs (sklearn digits, 1x8x8).

torch.fx traceable: one non-inplace ``nn.ReLU`` module per activation, no control flow.
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.models.resnet_cifar import _check_positive

__all__ = ["DigitsCNN", "digits_cnn"]


class DigitsCNN(nn.Module):
    """conv(w)-BN-ReLU, conv(2w)-BN-ReLU, maxpool2, conv(2w)-BN-ReLU, global avg pool, Linear.

    With ``width=32`` the channels are 32/64/64 (56,554 parameters for 10 classes).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        w1, w2 = width, 2 * width
        self.conv1 = nn.Conv2d(in_channels, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(w2, w2, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w2)
        self.relu3 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> DigitsCNN:
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, width=width)

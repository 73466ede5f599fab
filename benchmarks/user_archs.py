"""Eight user-style CIFAR-10 networks for the "user models" benchmark, written the way users write them
(not taken from edgec's zoo): the constructs that broke or slowed quantization in the field.

Each factory takes ``num_classes`` (and ignores ``in_channels``: all take 3-channel 32x32 images).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin, cout, k=3, s=1, g=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ConvReluBN(nn.Module):
    """conv -> ReLU -> BatchNorm -> max-pool blocks (the BN follows the ReLU and cannot fold into the conv),
    as in CREPE-style audio nets; the BN output is signed although a ReLU precedes it."""

    def __init__(self, num_classes=10):
        super().__init__()
        chans = [3, 32, 64, 96]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(b), nn.MaxPool2d(2))
            for a, b in zip(chans, chans[1:]))
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Frames1D(nn.Module):
    """1-D frame input: each image row-major as 3 x 1024 samples, Conv1d with explicit padding and pooling."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.c1 = nn.Conv1d(3, 32, 9, stride=2)
        self.b1 = nn.BatchNorm1d(32)
        self.c2 = nn.Conv1d(32, 64, 5)
        self.b2 = nn.BatchNorm1d(64)
        self.c3 = nn.Conv1d(64, 96, 5)
        self.b3 = nn.BatchNorm1d(96)
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x):
        x = x.flatten(2)  # (N, 3, 1024)
        x = F.max_pool1d(F.relu(self.b1(self.c1(F.pad(x, (4, 4))))), 2)
        x = F.max_pool1d(F.relu(self.b2(self.c2(F.pad(x, (2, 2))))), 2)
        x = F.max_pool1d(F.relu(self.b3(self.c3(F.pad(x, (2, 2))))), 2)
        return self.fc(x.mean(-1))


def channel_shuffle(x, groups: int):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.stride = stride
        half = c // 2
        cin = c if stride == 2 else half
        self.branch = nn.Sequential(_cbr(cin, half, 1), nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False),
                                    nn.BatchNorm2d(half), _cbr(half, half, 1))
        if stride == 2:
            self.short = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False), nn.BatchNorm2d(c),
                                       _cbr(c, half, 1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.branch(b)], 1)
        else:  # one tensor feeds both branches
            out = torch.cat([self.short(x), self.branch(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    """ShuffleNetV2-style: channel split / shuffle, a max-pool output feeding two branches."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = _cbr(3, 48)
        self.pool = nn.MaxPool2d(2)
        self.units = nn.Sequential(ShuffleUnit(48, 2), ShuffleUnit(48, 1), ShuffleUnit(48, 2), ShuffleUnit(48, 1))
        self.head = _cbr(48, 128, 1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.units(self.pool(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(self.head(x), 1).flatten(1))


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class MBV3Block(nn.Module):
    def __init__(self, cin, exp, cout, stride, se=True):
        super().__init__()
        self.res = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(exp, exp, 3, stride, 1, groups=exp, bias=False), nn.BatchNorm2d(exp),
                                nn.Hardswish())
        self.se = SE(exp) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.res else y


class MobileNetV3Small(nn.Module):
    """Hard-swish + squeeze-excite (hard-sigmoid gating), MobileNetV3-small style."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(MBV3Block(16, 64, 24, 2), MBV3Block(24, 72, 24, 1), MBV3Block(24, 96, 40, 2),
                                    MBV3Block(40, 120, 40, 1), MBV3Block(40, 160, 48, 2))
        self.head = nn.Sequential(nn.Conv2d(48, 128, 1), nn.Hardswish())
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseNet(nn.Module):
    """Dense blocks (each layer's output concatenated to its input), transition convs and average pooling."""

    def __init__(self, num_classes=10, growth=12, layers=4):
        super().__init__()
        c = 24
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False)
        self.stages = nn.ModuleList()
        for i in range(3):
            block = nn.ModuleList()
            for _ in range(layers):
                block.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1, bias=False)))
                c += growth
            trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False)) if i < 2 else None
            self.stages.append(nn.ModuleDict({"block": block, **({"trans": trans} if trans else {})}))
            if trans:
                c //= 2
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for st in self.stages:
            for layer in st["block"]:
                x = torch.cat([x, layer(x)], 1)
            if "trans" in st:
                x = F.avg_pool2d(st["trans"](x), 2)
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ResNeXtBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups=8):
        super().__init__()
        mid = cout // 2
        self.body = nn.Sequential(_cbr(cin, mid, 1), _cbr(mid, mid, 3, stride, groups),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class ResNeXt(nn.Module):
    """Grouped 3x3 convolutions in bottleneck residual blocks."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = _cbr(3, 32)
        self.layers = nn.Sequential(ResNeXtBlock(32, 64, 2), ResNeXtBlock(64, 128, 2), ResNeXtBlock(128, 128, 1))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.c1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.c2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.short(out) if self.short is not None else x
        out = self.c2(F.relu(self.bn2(self.c1(out))))
        return out + short


class PreActResNet(nn.Module):
    """Pre-activation residuals: BN -> ReLU -> conv, the identity path carrying un-normalised sums."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.layers = nn.Sequential(PreActBlock(32, 32, 2), PreActBlock(32, 64, 2), PreActBlock(64, 96, 1))
        self.bn = nn.BatchNorm2d(96)
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t=4):
        super().__init__()
        mid = cin * t
        self.res = stride == 1 and cin == cout
        self.body = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                                  nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                  nn.ReLU6(), nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.body(x) if self.res else self.body(x)


class MobileNetV2(nn.Module):
    """Inverted residuals with ReLU6; ``forward(x, embed=False)`` returns the pooled embedding on request
    and resizes inputs that are not 32x32 (Python branches on a flag and on the input's shape)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1),
                                    InvertedResidual(24, 48, 2), InvertedResidual(48, 48, 1),
                                    InvertedResidual(48, 96, 2))
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x, embed=False):
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        z = F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)
        return z if embed else self.fc(z)


ARCHS = {
    "conv-relu-bn": (ConvReluBN, "conv -> ReLU -> unfoldable BN -> max-pool"),
    "frames-1d": (Frames1D, "1-D frames: Conv1d, explicit pad, max-pool"),
    "shufflenet": (ShuffleNet, "channel split/shuffle, one tensor feeds two branches"),
    "mobilenetv3-se": (MobileNetV3Small, "hard-swish + squeeze-excite (hard-sigmoid)"),
    "densenet": (DenseNet, "dense concat blocks, avg-pool transitions"),
    "resnext": (ResNeXt, "grouped 3x3 convs, bottleneck residuals"),
    "preact-resnet": (PreActResNet, "pre-activation residuals"),
    "mobilenetv2-flag": (MobileNetV2, "inverted residual ReLU6, forward(x, embed=False), shape branch"),
}


def build(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ARCHS[name][0](num_classes=num_classes)


# `--model benchmarks/user_archs.py:<factory>` entry points (edgec passes num_classes / in_channels)
def conv_relu_bn(num_classes=10, in_channels=3):
    return ConvReluBN(num_classes)


def frames_1d(num_classes=10, in_channels=3):
    return Frames1D(num_classes)


def shufflenet(num_classes=10, in_channels=3):
    return ShuffleNet(num_classes)


def mobilenetv3_se(num_classes=10, in_channels=3):
    return MobileNetV3Small(num_classes)


def densenet(num_classes=10, in_channels=3):
    return DenseNet(num_classes)


def resnext(num_classes=10, in_channels=3):
    return ResNeXt(num_classes)


def preact_resnet(num_classes=10, in_channels=3):
    return PreActResNet(num_classes)


def mobilenetv2_flag(num_classes=10, in_channels=3):
    return MobileNetV2(num_classes)

"""User-style architectures for the channel-pruning tests (written as a user would, not from edgec's zoo)."""
import torch
from torch import nn
import torch.nn.functional as F


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expand, stride):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(inplace=True),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(inplace=True),
            nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2ish(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 4, 1), InvertedResidual(16, 24, 4, 2),
                                    InvertedResidual(24, 24, 4, 1))
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNetish(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.dense = nn.Sequential(DenseLayer(16, 12), DenseLayer(28, 12), DenseLayer(40, 12))
        self.trans = nn.Sequential(nn.BatchNorm2d(52), nn.ReLU(), nn.Conv2d(52, 32, 1, bias=False), nn.AvgPool2d(2))
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.trans(self.dense(self.conv0(x)))))
        return self.fc(x.mean((2, 3)))


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.gelu(self.fc1(s))))


class GroupedSENet(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.se = SE(32)
        self.conv3 = nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(48)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = F.gelu(self.bn1(self.conv1(x)))
        x = self.se(F.gelu(self.bn2(self.conv2(x))))
        x = F.gelu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvLNNet(nn.Module):
    """Conv1d over time with LayerNorm over channels (transpose in and out), as audio / keyword nets do."""

    def __init__(self, num_classes=10, in_channels=8):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, 32, 3, padding=1)
        self.ln1 = nn.LayerNorm(32)
        self.conv2 = nn.Conv1d(32, 32, 3, padding=1)
        self.ln2 = nn.LayerNorm(32)
        self.conv3 = nn.Conv1d(32, 48, 1)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = F.gelu(self.ln1(self.conv1(x).transpose(1, 2)).transpose(1, 2))
        x = F.gelu(self.ln2(self.conv2(x).transpose(1, 2)).transpose(1, 2))
        return self.fc(F.gelu(self.conv3(x)).mean(2))


class HardCodedView(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8, num_classes)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.adaptive_avg_pool2d(x, (2, 4))
        return self.fc(x.view(x.size(0), 32, 8).flatten(1))


def mobilenet_digits(num_classes=10, in_channels=1):
    """The user-model-file factory of the end-to-end test (``tests/prune_channels_models.py:mobilenet_digits``)."""
    return MobileNetV2ish(num_classes=num_classes, in_channels=in_channels)

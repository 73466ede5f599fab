"""BC-ResNet (broadcasted residual learning) for keyword spotting, and BC-ResNet-ASC.

docs/methods.md, BC-ResNet. Input: log-mel features ``(B, 1, F, T)``; for keyword spotting 16 kHz audio
padded to 1 s, n_fft 512, win 480, hop 160, 40 mels -> ``(B, 1, 40, 101)``.

``BCResBlock(cin, cout, stride, dilation)``::

    f2 = [1x1 conv + BN + ReLU   if cin != cout]  -> depthwise (3x1) frequency conv, stride (s, 1)
         -> SubSpectralNorm (S = 5)
    z  = mean over frequency of f2(x)                                   (B, C, 1, T)
    f1 = depthwise (1x3) temporal conv, dilation d -> BN -> SiLU -> 1x1 conv -> Dropout2d(0.1)
    out = ReLU(f1(z) broadcast over F + f2(x) [+ x when cin == cout])

``BCResNet(tau)`` (b = 8*tau channels, the authors' layout): 5x5 conv stride (2, 1) 1 -> 2b, BN,
ReLU; four stages of [2, 2, 4, 4] blocks with widths [b, 1.5b, 2b, 2.5b] (``int`` of the
products), frequency stride 2 in the first block of stages 1 and 2 (0-based), temporal dilations
1, 2, 4, 8; head depthwise 5x5 conv (padding (0, 2)) -> 1x1 conv to 4b -> BN -> ReLU -> global
average pool -> 1x1 conv with bias -> logits. Only that last conv has a bias; every other conv is
followed by BN/SSN. With 12 classes this gives exactly 9,232 (tau 1), 17,154 (1.5), 27,284 (2),
54,168 (3), 187,812 (6) and 321,068 (8) parameters.

``BCResNetASC`` (BC-ResNet-Mod, DCASE2021 Task 1A; layout per docs/methods.md, block as above without
dilation): 5x5 conv stride 2 -> 2c, BN, ReLU; Transition(2c->c) + BC(c); MaxPool 2;
Transition(c->1.5c) + BC(1.5c); MaxPool 2; Transition(1.5c->2c) + BC(2c);
Transition(2c->2.5c) + 2 x BC(2.5c); 1x1 conv (bias) -> classes; global average pool. A frequency
normalization (``norm``: ResNorm, RFN or none) sits at the network input and after each of the
four stages. c = 80 gives 317,610 parameters with 10 classes (the paper reports 315k; ResNorm
and layer-norm RFN add none, batch-norm RFN adds 2 per normalized channel).
Frequency bins must stay divisible by 5 at every block: 40 mels -> 20 -> 10 -> 5, so the number
of mel bins must be a multiple of 40 (80 works; 256 does not). The zoo default input is
``(1, 40, 1001)``: 10-s scenes with the keyword-spotting front end (40 mels, 10 ms hop); any number
of frames works (the head pools globally). Lambda: ResNorm 0.1 (docs/methods.md), RFN 0.5 [our choice];
both are ``lam`` arguments of ``BCResNetASC``, as is ``rfn_base`` (``layer`` | ``batch``).

Written for torch.fx (the quantization pass): one non-inplace module per activation, residual
adds as plain ``+``, mean over frequency as ``Tensor.mean``; SSN's BatchNorm sits on a reshaped
tensor, so it cannot be folded into the conv before it and stays a float op between Q/DQ pairs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from edgec.errors import ModelError
from edgec.models.freqnorm import SubSpectralNorm, build_freq_norm
from edgec.models.resnet_cifar import _check_positive

__all__ = [
    "BCResBlock",
    "BCResNet",
    "BCResNetASC",
    "bcresnet",
    "bcresnet1",
    "bcresnet1_5",
    "bcresnet2",
    "bcresnet3",
    "bcresnet6",
    "bcresnet8",
    "bcresnet_asc",
    "bcresnet_asc_nonorm",
    "bcresnet_asc_rfn",
]

SUB_BANDS = 5


class BCResBlock(nn.Module):
    """One broadcasted-residual block (a *transition* block when ``cin != cout``)."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1, dropout: float = 0.1,
                 sub_bands: int = SUB_BANDS):
        super().__init__()
        _check_positive(cin=cin, cout=cout, stride=stride, dilation=dilation)
        self.transition = cin != cout
        if stride != 1 and not self.transition:
            raise ModelError(f"a BC-ResBlock with stride {stride} must change the channel count (got {cin} -> {cout})",
                             hint="the identity shortcut cannot follow a frequency stride; use stride only in "
                                  "transition blocks")
        if self.transition:
            self.pw_in = nn.Conv2d(cin, cout, 1, bias=False)
            self.bn_in = nn.BatchNorm2d(cout)
            self.relu_in = nn.ReLU()
        # f2: frequency-wise depthwise conv + SubSpectralNorm
        self.freq_dw = nn.Conv2d(cout, cout, (3, 1), stride=(stride, 1), padding=(1, 0), groups=cout, bias=False)
        self.ssn = SubSpectralNorm(cout, sub_bands)
        # f1: temporal depthwise (dilated) conv + BN + SiLU + pointwise conv + channel dropout
        self.temp_dw = nn.Conv2d(cout, cout, (1, 3), padding=(0, dilation), dilation=(1, dilation), groups=cout,
                                 bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.silu = nn.SiLU()
        self.pw = nn.Conv2d(cout, cout, 1, bias=False)
        self.drop = nn.Dropout2d(dropout)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu_in(self.bn_in(self.pw_in(x))) if self.transition else x
        aux = self.ssn(self.freq_dw(y))  # f2(x): (B, C, F, T)
        z = aux.mean(2, keepdim=True)  # (B, C, 1, T)
        z = self.drop(self.pw(self.silu(self.bn(self.temp_dw(z)))))
        out = z + aux  # broadcast over frequency
        if not self.transition:
            out = out + x
        return self.relu(out)


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BCResNet(nn.Module):
    """BC-ResNet-tau for keyword spotting (input ``(B, in_channels, 40, T)``)."""

    blocks_per_stage = (2, 2, 4, 4)
    stride_stages = (1, 2)

    def __init__(self, tau: float = 1.0, *, num_classes: int = 12, in_channels: int = 1, dropout: float = 0.1):
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels)
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or int(8 * tau) < 1:
            raise ModelError(f"BC-ResNet width multiplier tau must be a number >= 0.125, got {tau!r}",
                             hint="the published models use tau in {1, 1.5, 2, 3, 6, 8}")
        self.tau = tau
        b = int(8 * tau)
        widths = [2 * b, b, int(1.5 * b), 2 * b, int(2.5 * b), 4 * b]
        self.stem = nn.Conv2d(in_channels, widths[0], 5, stride=(2, 1), padding=2, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        self.stem_relu = nn.ReLU()
        stages = []
        for i, n in enumerate(self.blocks_per_stage):
            blocks = []
            for j in range(n):
                stride = 2 if (i in self.stride_stages and j == 0) else 1
                cin = widths[i] if j == 0 else widths[i + 1]
                blocks.append(BCResBlock(cin, widths[i + 1], stride=stride, dilation=2**i, dropout=dropout))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        c = widths[-2]
        self.head_dw = nn.Conv2d(c, c, 5, padding=(0, 2), groups=c, bias=False)
        self.head_pw = nn.Conv2d(c, widths[-1], 1, bias=False)
        self.head_bn = nn.BatchNorm2d(widths[-1])
        self.head_relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(widths[-1], num_classes, 1, bias=True)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        x = self.stages(x)
        x = self.head_relu(self.head_bn(self.head_pw(self.head_dw(x))))
        x = self.classifier(self.pool(x))
        return torch.flatten(x, 1)


class BCResNetASC(nn.Module):
    """BC-ResNet-ASC / BC-ResNet-Mod for acoustic scene classification (``norm``: resnorm | rfn | none)."""

    def __init__(self, c: int = 80, *, num_classes: int = 10, in_channels: int = 1, norm: str = "resnorm",
                 lam: float | None = None, rfn_base: str = "layer", dropout: float = 0.1):
        super().__init__()
        _check_positive(c=c, num_classes=num_classes, in_channels=in_channels)
        self.c = c
        self.norm = norm
        w = [2 * c, c, int(1.5 * c), 2 * c, int(2.5 * c)]
        self.norm_in = build_freq_norm(norm, in_channels, lam=lam, rfn_base=rfn_base)
        self.stem = nn.Conv2d(in_channels, w[0], 5, stride=2, padding=2, bias=False)
        self.stem_bn = nn.BatchNorm2d(w[0])
        self.stem_relu = nn.ReLU()

        def stage(cin: int, cout: int, extra: int) -> nn.Sequential:
            return nn.Sequential(BCResBlock(cin, cout, dropout=dropout),
                                 *(BCResBlock(cout, cout, dropout=dropout) for _ in range(extra)))

        self.stage1 = stage(w[0], w[1], 1)
        self.norm1 = build_freq_norm(norm, w[1], lam=lam, rfn_base=rfn_base)
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = stage(w[1], w[2], 1)
        self.norm2 = build_freq_norm(norm, w[2], lam=lam, rfn_base=rfn_base)
        self.pool2 = nn.MaxPool2d(2)
        self.stage3 = stage(w[2], w[3], 1)
        self.norm3 = build_freq_norm(norm, w[3], lam=lam, rfn_base=rfn_base)
        self.stage4 = stage(w[3], w[4], 2)
        self.norm4 = build_freq_norm(norm, w[4], lam=lam, rfn_base=rfn_base)
        self.classifier = nn.Conv2d(w[4], num_classes, 1, bias=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[2] % (8 * SUB_BANDS):
            raise ModelError(
                f"BC-ResNet-ASC needs a number of frequency bins divisible by {8 * SUB_BANDS} "
                f"(stride 2 and two 2x max-pools, then {SUB_BANDS} sub-bands), got {x.shape[2]}",
                hint="use 40 or 80 mel bins")
        x = self.norm_in(x)
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        x = self.pool1(self.norm1(self.stage1(x)))
        x = self.pool2(self.norm2(self.stage2(x)))
        x = self.norm3(self.stage3(x))
        x = self.norm4(self.stage4(x))
        x = self.pool(self.classifier(x))
        return torch.flatten(x, 1)


def bcresnet(tau: float, num_classes: int = 12, in_channels: int = 1) -> BCResNet:
    return BCResNet(tau, num_classes=num_classes, in_channels=in_channels)


def bcresnet1(num_classes: int = 12, in_channels: int = 1) -> BCResNet:
    return BCResNet(1, num_classes=num_classes, in_channels=in_channels)


def bcresnet1_5(num_classes: int = 12, in_channels: int = 1) -> BCResNet:
    return BCResNet(1.5, num_classes=num_classes, in_channels=in_channels)


def bcresnet2(num_classes: int = 12, in_channels: int = 1) -> BCResNet:
    return BCResNet(2, num_classes=num_classes, in_channels=in_channels)


def bcresnet3(num_classes: int = 12, in_channels: int = 1) -> BCResNet:
    return BCResNet(3, num_classes=num_classes, in_channels=in_channels)


def bcresnet6(num_classes: int = 12, in_channels: int = 1) -> BCResNet:
    return BCResNet(6, num_classes=num_classes, in_channels=in_channels)


def bcresnet8(num_classes: int = 12, in_channels: int = 1) -> BCResNet:
    return BCResNet(8, num_classes=num_classes, in_channels=in_channels)


def bcresnet_asc(num_classes: int = 10, in_channels: int = 1) -> BCResNetASC:
    return BCResNetASC(80, num_classes=num_classes, in_channels=in_channels, norm="resnorm")


def bcresnet_asc_rfn(num_classes: int = 10, in_channels: int = 1) -> BCResNetASC:
    return BCResNetASC(80, num_classes=num_classes, in_channels=in_channels, norm="rfn")


def bcresnet_asc_nonorm(num_classes: int = 10, in_channels: int = 1) -> BCResNetASC:
    return BCResNetASC(80, num_classes=num_classes, in_channels=in_channels, norm="none")

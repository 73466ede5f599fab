"""Quantizers and graph-mode preparation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edgec.errors import InputError
from edgec.quant.modules import ActQuant, QConv2d, QLinear
from edgec.quant.prepare import QuantSpec, calibrate, quantize_model, unsupported_layers
from edgec.quant.quantizers import LSQQuantizer, RangeQuantizer, fake_quant, sqnr_db
from edgec.targets import get_target


@pytest.mark.parametrize("bits,floor_db", [(8, 38.0), (6, 27.0), (4, 15.0)])
def test_weight_sqnr_floor_per_channel(bits, floor_db):
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3) * torch.linspace(0.1, 2, 32).view(-1, 1, 1, 1)
    qmax = 2 ** (bits - 1) - 1
    q = RangeQuantizer(qmin=-qmax, qmax=qmax, per_channel=True, channels=32, method="minmax")
    assert sqnr_db(w, q(w)) > floor_db


def test_fake_quant_values_on_grid_and_clipped():
    x = torch.tensor([-10.0, -0.26, 0.0, 0.24, 0.26, 10.0])
    y = fake_quant(x, torch.tensor(0.5), -4, 3)
    assert y.tolist() == [-2.0, -0.5, 0.0, 0.0, 0.5, 1.5]


def test_lsq_step_and_input_get_gradients():
    torch.manual_seed(0)
    q = LSQQuantizer(qmin=0, qmax=15, per_channel=False)
    x = torch.rand(64, requires_grad=True)
    q(x).pow(2).sum().backward()
    assert q.step.grad is not None and q.step.grad.abs() > 0
    assert x.grad is not None and (x.grad != 0).any()
    assert bool(q.initialized)


def test_ema_range_updates_in_training_only():
    q = RangeQuantizer(qmin=-127, qmax=127, per_channel=False, method="ema", momentum=0.5)
    q.train()
    q(torch.tensor([1.0]))
    q(torch.tensor([3.0]))
    assert q.absmax.item() == pytest.approx(2.0)
    q.eval()
    q(torch.tensor([100.0]))
    assert q.absmax.item() == pytest.approx(2.0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.r1(self.b1(self.c1(x)))
        x = self.r2(self.b2(self.c2(x)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def test_quantize_model_folds_bn_and_places_quantizers():
    torch.manual_seed(0)
    m = _Net().eval()
    for bn in (m.b1, m.b2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    gm, report = quantize_model(m, QuantSpec(weight_quantizer="minmax", act_quantizer="ema"), get_target("x86"))
    assert not any(isinstance(x, nn.BatchNorm2d) for x in gm.modules())
    assert sum(isinstance(x, QConv2d) for x in gm.modules()) == 2
    assert sum(isinstance(x, QLinear) for x in gm.modules()) == 1
    # input, conv1+relu, conv2, add+relu, pool, fc
    assert report.act_points == 6
    x = torch.randn(32, 1, 8, 8)
    calibrate(gm, [(x, None)])
    with torch.no_grad():
        ref, out = m(x), gm(x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.9
    assert (ref - out).abs().max() < 0.2 * ref.abs().max()
    # x86 profile: 7-bit weight range, u8 activations; post-ReLU tensors unsigned with zero point 0,
    # the others asymmetric with the zero point calibration put where their minimum was
    assert gm.c1.wq.qmax == 63
    aqs = [a for a in gm.modules() if isinstance(a, ActQuant)]
    assert {a.container for a in aqs} == {"uint8"}
    for a in aqs:
        assert a.q.qmax - a.q.qmin == 255 and a.q.qmin == -a.zero_point
        if float(a.lo) >= 0:
            assert a.zero_point == 0
        else:
            assert a.zero_point == round(-float(a.lo) / ((float(a.hi) - float(a.lo)) / 255))


def test_bits_and_targets():
    t = get_target("arm64")
    assert t.weight_range(8) == (-127, 127) and t.weight_range(4) == (-7, 7)
    assert get_target("x86").weight_range(8) == (-63, 63)
    assert get_target("tensorrt").act_range(8, signed=False) == (0, 127)
    gm, _ = quantize_model(_Net().eval(), QuantSpec(weight_bits=4, act_bits=4), t)
    assert gm.c2.wq.qmax == 7
    assert all(a.q.qmax in (7, 15) for a in gm.modules() if isinstance(a, ActQuant))


class _WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.up = nn.ConvTranspose2d(4, 4, 2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.up(self.conv(x)).mean((2, 3)))


def test_unsupported_layers_named_then_float_or_error():
    m = _WithLSTM()
    assert unsupported_layers(m) == ["up (ConvTranspose2d)"]
    gm, report = quantize_model(m, QuantSpec(unsupported="float"), get_target("x86"))
    assert report.left_float == ["up (ConvTranspose2d)"]
    assert isinstance(gm.up, nn.ConvTranspose2d)
    with pytest.raises(InputError, match=r"up \(ConvTranspose2d\)"):
        quantize_model(m, QuantSpec(unsupported="error"), get_target("x86"))


def test_untraceable_model_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(InputError, match="torch.fx"):
        quantize_model(Branchy(), QuantSpec(), get_target("x86"))

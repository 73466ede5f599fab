"""Pruning primitives (schedule, exact sparsity, masks survive QAT) and KD / calibration."""
from __future__ import annotations

import pytest
import torch

from edgec import masks as P
from edgec.kd import ace, calibration_metrics, ece, fit_temperature, kd_loss, kd_objective
from edgec.models import create_model
from edgec.quant.prepare import QuantSpec, quantize_model
from edgec.targets import get_target


def test_cubic_schedule():
    assert P.cubic_sparsity(0, 100, 0.8) == 0.0
    assert P.cubic_sparsity(50, 100, 0.8) == pytest.approx(0.8 - 0.8 * 0.5**3)
    assert P.cubic_sparsity(100, 100, 0.8) == 0.8
    assert P.cubic_sparsity(500, 100, 0.8) == 0.8
    vals = [P.cubic_sparsity(t, 100, 0.8) for t in range(101)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_exact_sparsity(scope):
    torch.manual_seed(0)
    m = create_model("resnet8")
    layers = P.prunable_layers(m)
    P.update_masks(layers, 0.7, scope=scope)
    P.apply_masks(m)
    total = sum(l.weight.numel() for _, l in layers)
    zeros = sum(int((l.weight == 0).sum()) for _, l in layers)
    if scope == "global":
        assert zeros == round(0.7 * total)
    else:
        for _, l in layers:
            assert int((l.weight == 0).sum()) == round(0.7 * l.weight.numel())
    # first conv and classifier are left dense by default
    assert int((m.conv1.weight == 0).sum()) == 0 and int((m.fc.weight == 0).sum()) == 0


def test_pruned_weights_stay_pruned_as_sparsity_grows():
    torch.manual_seed(0)
    m = create_model("resnet8")
    layers = P.prunable_layers(m)
    P.update_masks(layers, 0.3)
    before = [l.weight_mask.clone() for _, l in layers]
    P.apply_masks(m)
    P.update_masks(layers, 0.6)
    for b, (_, l) in zip(before, layers):
        assert bool(((b == 0) <= (l.weight_mask == 0)).all())


def test_masks_survive_quantization():
    torch.manual_seed(0)
    m = create_model("resnet8").eval()
    layers = P.prunable_layers(m)
    P.update_masks(layers, 0.5)
    P.apply_masks(m)
    gm, _ = quantize_model(m, QuantSpec(weight_quantizer="minmax"), get_target("x86"))
    masked = P.masked_layers(gm)
    assert len(masked) == len(layers)
    for mod in masked:
        assert bool((mod.quantized_weight()[mod.weight_mask == 0] == 0).all())
    assert P.sparsity_stats(gm)["prunable_sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_kd_loss_properties():
    z = torch.randn(16, 10)
    assert kd_loss(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    zs = torch.randn(16, 10, requires_grad=True)
    zt = torch.randn(16, 10, requires_grad=True)
    kd_objective(zs, zt, torch.randint(0, 10, (16,)), tau=2.0, alpha=0.5).backward()
    assert zs.grad is not None and zt.grad is None  # teacher side detached


def test_temperature_scaling_recovers_overconfidence():
    torch.manual_seed(0)
    n, k = 4000, 5
    true_logits = torch.randn(n, k) * 2
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    over = true_logits * 3  # an overconfident teacher: true temperature 3
    t = fit_temperature(over, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    before, after = calibration_metrics(over, labels), calibration_metrics(over, labels, t)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] and after["ace"] < before["ace"]


def test_ece_ace_zero_for_perfect_confident_predictions():
    labels = torch.arange(10).repeat(10)
    probs = torch.nn.functional.one_hot(labels, 10).float()
    assert ece(probs, labels) == pytest.approx(0.0)
    assert ace(probs, labels) == pytest.approx(0.0)

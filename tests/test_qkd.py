"""QKD: phase split, the loss of each phase, teacher trained only in co-studying, end to end on digits."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cli_util import run_cli
from edgec.stages.qkd import qkd_losses, split_epochs, teacher_l2


def test_split_epochs():
    assert split_epochs(200, (30, 100, 70)) == (30, 100, 70)
    assert split_epochs(20, (30, 100, 70)) == (3, 10, 7)
    assert split_epochs(3, (30, 100, 70)) == (1, 1, 1)
    for total in range(3, 40):
        parts = split_epochs(total, (30, 100, 70))
        assert sum(parts) == total and min(parts) >= 1


def _kl(p_logits, q_logits, tau):  # tau^2 * KL(softmax(p/tau) || softmax(q/tau)), batch mean
    p = F.softmax(p_logits / tau, 1)
    return tau**2 * (p * (p.log() - F.log_softmax(q_logits / tau, 1))).sum(1).mean()


def test_losses_of_each_phase_and_detached_targets():
    torch.manual_seed(0)
    y = torch.randint(0, 5, (8,))
    zs = torch.randn(8, 5, requires_grad=True)
    zt = torch.randn(8, 5, requires_grad=True)
    a, b, tau = 0.3, 0.6, 2.0
    l_s, l_t = qkd_losses("ss", zs, None, y, alpha=a, beta=b, tau=tau)
    assert l_t is None and l_s.item() == pytest.approx(F.cross_entropy(zs, y).item(), rel=1e-6)
    l_s, l_t = qkd_losses("cs", zs, zt, y, alpha=a, beta=b, tau=tau)
    want_s = (1 - a) * F.cross_entropy(zs, y) + a * _kl(zt, zs, tau)
    want_t = (1 - b) * F.cross_entropy(zt, y) + b * _kl(zs, zt, tau)
    assert l_s.item() == pytest.approx(want_s.item(), rel=1e-5)
    assert l_t.item() == pytest.approx(want_t.item(), rel=1e-5)
    gs = torch.autograd.grad(l_s, [zs, zt], allow_unused=True)
    assert gs[1] is None  # the student loss does not move the teacher
    gt = torch.autograd.grad(l_t, [zs, zt], allow_unused=True)
    assert gt[0] is None  # the teacher loss does not move the student
    l_s_tu, l_t = qkd_losses("tu", zs, zt, y, alpha=a, beta=b, tau=tau)
    assert l_t is None and l_s_tu.item() == pytest.approx(want_s.item(), rel=1e-5)


@pytest.mark.integration
def test_qkd_end_to_end_teacher_changes_only_in_cs(tmp_path, capsys):
    from edgec.models import create_model, load_weights
    from test_cli_e2e import train_digits

    w = train_digits(tmp_path / "fp32.pt")
    t0 = teacher_l2(load_weights(create_model("digits_cnn"), w))
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--weights", w, "--data", "digits", "--recipe", "qkd",
                  "--set", "stages.0.phase_epochs=[1,1,1]", "--set", "stages.0.kd.calibrate=true",
                  "--set", "bench.runs=5", "--out", tmp_path / "run", "--device", "cpu",
                  "--set", "stages.0.precision.keep_slow_float=false")
    assert res.code == 0, res.err
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    phases = {e["phase"]: e for e in events if e.get("event") == "qkd_phase"}
    assert list(phases) == ["ss", "cs", "tu"]
    assert phases["ss"]["teacher_l2"] == pytest.approx(t0, rel=1e-12)
    assert phases["cs"]["teacher_l2"] != pytest.approx(t0, rel=1e-9)
    assert phases["tu"]["teacher_l2"] == pytest.approx(phases["cs"]["teacher_l2"], rel=1e-12)
    assert phases["tu"]["teacher_temperature"] != 1.0
    assert any(e.get("event") == "teacher_calibration" for e in events)
    rows = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert rows[1]["bits"] == "w4a4" and rows[1]["accuracy"] > 0.8
    check = json.loads((tmp_path / "run" / "export" / "model_compressed.check.json").read_text())
    bits = sorted(t["bits"] for t in check["weights"].values())
    assert bits.count(4) == len(bits) - 2  # first conv and classifier at 8 bits (7-bit range on x86)

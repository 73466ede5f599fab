"""PQK (docs/methods.md, PQK): shared weights, gradient routing, BN per path, exact student export."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cli_util import run_cli
from edgec import masks as P
from edgec.quant.prepare import QuantSpec, calibrate, quantize_model
from edgec.stages.pqk import (DualBatchNorm, PQKConv2d, _TwoPath, build_two_path, global_magnitude_masks,
                              pqk_loss, set_path, student_state)
from edgec.targets import get_target


def _kl(p_logits, q_logits, tau):  # tau^2 * KL(softmax(p/tau) || softmax(q/tau)), batch mean
    p = F.softmax(p_logits / tau, 1)
    return tau * tau * (p * (p.log() - F.log_softmax(q_logits / tau, 1))).sum(1).mean()


def _two_path(*, route=True, teacher_quantized=False, sparsity=0.5, seed=0):
    from edgec.models import create_model

    torch.manual_seed(seed)
    model = create_model("resnet8")
    for m in model.modules():  # non-trivial BN statistics so that folding is a real test
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    float_model = model.eval()
    spec = QuantSpec(weight_bits=8, act_bits=8, fold_bn=False)
    gm, _ = quantize_model(float_model, spec, get_target("x86"))
    x = torch.randn(64, 3, 32, 32)
    calibrate(gm, [(x, None)])
    gm = build_two_path(gm, route=route, teacher_quantized=teacher_quantized)
    layers = [m for _, m in P.prunable_layers(gm)]
    P.ensure_masks([(str(i), m) for i, m in enumerate(layers)])
    global_magnitude_masks(layers, sparsity)
    return float_model, gm, layers, x


def test_teacher_reads_the_student_weight_storage():
    float_model, gm, layers, x = _two_path()
    n_float = sum(m.weight.numel() for m in float_model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert layers and all(isinstance(m, PQKConv2d) for m in layers)
    for m in layers:
        tw = m.teacher_weight()  # grad enabled: the routed view
        assert tw.untyped_storage().data_ptr() == m.weight.untyped_storage().data_ptr()
        with torch.no_grad():
            assert m.teacher_weight() is m.weight
    # no second copy of any weight anywhere in the network
    ptrs = [p.untyped_storage().data_ptr() for p in gm.parameters()]
    assert len(ptrs) == len(set(ptrs))
    conv_weights = [n for n, _ in gm.named_parameters() if n.endswith(".weight") and ".student." not in n
                    and ".teacher." not in n]
    assert n_float == sum(gm.get_parameter(n).numel() for n in conv_weights)


def _grads(gm, layers, x, teacher: bool):
    gm.zero_grad()
    gm.train()
    set_path(gm, teacher)
    try:
        gm(x[:16]).logsumexp(1).sum().backward()
    finally:
        set_path(gm, False)
    return [m.weight.grad.clone() for m in layers]


@pytest.mark.parametrize("route", [True, False])
def test_gradient_routing(route):
    _, gm, layers, x = _two_path(route=route)
    for g, m in zip(_grads(gm, layers, x, teacher=False), layers):
        assert g[m.weight_mask == 0].abs().max() == 0  # the student moves only the kept weights
        assert g[m.weight_mask == 1].abs().max() > 0
    for g, m in zip(_grads(gm, layers, x, teacher=True), layers):
        assert g[m.weight_mask == 0].abs().max() > 0  # the teacher moves the pruned-away weights
        kept = g[m.weight_mask == 1].abs().max()
        assert (kept == 0) if route else (kept > 0)  # ... and the kept ones only with the switch on


def test_each_path_has_its_own_batchnorm_statistics():
    _, gm, _, x = _two_path()
    dual = [m for m in gm.modules() if isinstance(m, DualBatchNorm)]
    assert dual
    before = [(d.student.running_mean.clone(), d.teacher.running_mean.clone()) for d in dual]
    gm.train()
    set_path(gm, True)
    with torch.no_grad():
        gm(x)
    set_path(gm, False)
    for d, (s0, t0) in zip(dual, before):
        assert torch.equal(d.student.running_mean, s0) and not torch.equal(d.teacher.running_mean, t0)
    with torch.no_grad():
        gm(x)
    assert any(not torch.equal(d.student.running_mean, s0) for d, (s0, _) in zip(dual, before))


def test_teacher_path_is_the_dense_full_precision_network():
    float_model, gm, layers, x = _two_path()
    gm.eval()
    set_path(gm, True)
    with torch.no_grad():
        zt = gm(x)
    set_path(gm, False)
    with torch.no_grad():
        assert torch.allclose(zt, float_model(x), atol=1e-4)  # pruned weights kept their values
        zs = gm(x)
    assert not torch.allclose(zs, zt, atol=1e-2)


def test_teacher_quantized_choice_uses_q_of_kept_weights():
    _, gm, layers, _ = _two_path(teacher_quantized=True)
    m = layers[0]
    with torch.no_grad():
        want = m.quantized_weight() + m.weight * (1 - m.weight_mask)
        assert torch.equal(m.teacher_weight(), want)


def test_student_export_folds_bn_exactly():
    float_model, gm, layers, x = _two_path()
    standard, _ = quantize_model(float_model, QuantSpec(weight_bits=8, act_bits=8, fold_bn=True), get_target("x86"))
    P.ensure_masks(P.prunable_layers(standard))
    standard.load_state_dict(student_state(gm, standard))
    P.apply_masks(standard)
    gm.eval()
    standard.eval()
    with torch.no_grad():
        zs, zf = gm(x), standard(x)
    assert (zs.argmax(1) == zf.argmax(1)).float().mean() == 1.0
    assert (zs - zf).abs().max() < 0.05 * zs.abs().max()
    # the exported student's integer weights are exactly the two-path student's (BN scale absorbed)
    for name, q in standard.named_modules():
        if isinstance(q, PQKConv2d) or not hasattr(q, "wq") or not hasattr(q, "weight_mask"):
            continue
        s = gm.get_submodule(name)
        codes_s = torch.round(s.weight * s.weight_mask / s.wq.scale().view(-1, 1, 1, 1))
        codes_f = torch.round(q.weight / q.wq.scale().view(-1, 1, 1, 1))
        codes_s, codes_f = codes_s.clamp(-63, 63), codes_f.clamp(-63, 63)
        sign = torch.sign((codes_f * codes_s).flatten(1).sum(1)).view(-1, 1, 1, 1)  # sign of gamma per channel
        assert torch.equal(codes_s * sign, codes_f)
        assert int((q.weight == 0).sum()) >= int((q.weight_mask == 0).sum())


def test_global_masks_are_exact_and_let_weights_come_back():
    _, gm, layers, _ = _two_path(sparsity=0.3)
    n = sum(m.weight.numel() for m in layers)
    assert sum(int((m.weight_mask == 0).sum()) for m in layers) == round(0.3 * n)
    m0 = layers[0]
    idx = (m0.weight_mask == 0).nonzero()[0]
    with torch.no_grad():
        m0.weight[tuple(idx)] = 10.0  # a pruned weight that grew: the next threshold keeps it
    global_magnitude_masks(layers, 0.3)
    assert m0.weight_mask[tuple(idx)] == 1
    assert sum(int((m.weight_mask == 0).sum()) for m in layers) == round(0.3 * n)


def test_two_path_loss_is_the_stated_one_with_detached_targets():
    torch.manual_seed(0)
    zs = torch.randn(8, 5, requires_grad=True)
    zt = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    loss, parts = pqk_loss(zs, zt, y, 2.0)
    want = F.cross_entropy(zs, y) + F.cross_entropy(zt, y) + _kl(zt, zs, 2.0) + _kl(zs, zt, 2.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    g_t = torch.autograd.grad(parts["kl_t_s"], zt, allow_unused=True)[0]
    g_s = torch.autograd.grad(parts["kl_s_t"], zs, allow_unused=True)[0]
    assert g_t is None and g_s is None  # each KL's target side is detached


@pytest.mark.integration
def test_pqk_end_to_end_exports_only_the_student_at_exact_sparsity(tmp_path, capsys):
    from edgec.runs import rebuild_model
    from test_cli_e2e import train_digits

    w = train_digits(tmp_path / "fp32.pt")
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--weights", w, "--data", "digits", "--recipe", "pqk",
                  "--set", "stages.0.target_sparsity=0.6", "--set", "stages.0.epochs=2",
                  "--set", "stages.0.kd_epochs=1", "--set", "bench.runs=5", "--out", tmp_path / "run",
                  "--device", "cpu")
    assert res.code == 0, res.err
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mask = next(e for e in events if e.get("event") == "pqk_mask")
    assert mask["pruned"] == round(0.6 * mask["prunable"])
    teacher = next(e for e in events if e.get("event") == "pqk_teacher")
    assert teacher["eval_acc"] > 0.9
    student = rebuild_model(tmp_path / "run", "final")
    assert not any(isinstance(m, (_TwoPath, DualBatchNorm)) for m in student.modules())  # the student only
    layers = [m for _, m in P.prunable_layers(student)]
    zeros = sum(int((m.weight_mask == 0).sum()) for m in layers)
    assert zeros == round(0.6 * sum(m.weight.numel() for m in layers))
    assert all(torch.equal(m.weight * m.weight_mask, m.weight) for m in layers)
    rows = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert rows[1]["bits"] == "w8a8" and rows[1]["accuracy"] > 0.9
    check = json.loads((tmp_path / "run" / "export" / "model_compressed.check.json").read_text())
    assert check["parity"]["top1_agreement"] >= 0.99

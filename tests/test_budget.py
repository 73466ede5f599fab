"""Size budgets: ``prune.target_bytes`` -> sparsity (edgec.budget), counted like the exported model;
quantized unfoldable norms (QChannelAffine) and how ``onnx_weight_stats`` counts norms."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from cli_util import run_cli
from edgec import masks as P
from edgec.bench import onnx_weight_stats
from edgec.budget import plan_bytes
from edgec.errors import RecipeError
from edgec.export.check import check_export
from edgec.export.onnx_export import export_onnx
from edgec.models.freqnorm import SubSpectralNorm
from edgec.quant.modules import QChannelAffine
from edgec.quant.prepare import QuantSpec, calibrate, quantize_model
from edgec.recipe import validate_recipe
from edgec.targets import get_target


class SSNNet(nn.Module):
    """A hand-countable net with every kind of part the budget distinguishes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)  # first: not prunable, BN folds -> 4 biases
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)  # prunable, no bias (SSN cannot fold)
        self.ssn = SubSpectralNorm(8, 2)  # BatchNorm2d(16), left in the graph
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 1, bias=False)  # prunable, BN folds -> 8 biases
        self.bn3 = nn.BatchNorm2d(8)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)  # last: not prunable, 3 biases

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.ssn(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def trained_net(seed: int = 0) -> SSNNet:
    """Random weights plus non-trivial BN statistics (from a few batches in train mode)."""
    torch.manual_seed(seed)
    net = SSNNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(16, 1, 8, 8))
    return net.eval()


PRUNABLE = 8 * 4 * 9 + 8 * 8  # conv2 + conv3
OTHER = 4 * 9 + 3 * 8  # conv1 + fc
BIASES = 4 + 8 + 3
SSN_FEATURES = 16


def test_plan_counts_each_part_by_hand():
    net = trained_net()
    plan = plan_bytes(net, target_bytes=600, deployed_bits=8)
    assert plan.prunable_weights == PRUNABLE
    assert plan.fixed_bytes == {"other_weights": OTHER, "biases": 4 * BIASES, "unfolded_norms": 4 * 4 * SSN_FEATURES}
    assert plan.unfoldable_bn == ["ssn.bn"] and plan.foldable_bn == 2 and plan.traced
    room = 600 - (OTHER + 4 * BIASES + 16 * SSN_FEATURES)
    assert plan.kept_weights == room == 224 and plan.predicted_bytes == 600
    assert round(plan.target_sparsity * PRUNABLE) == PRUNABLE - room
    q = plan_bytes(net, target_bytes=400, deployed_bits=8, norm_bits=8)
    assert q.fixed_bytes["unfolded_norms"] == 2 * SSN_FEATURES and q.kept_weights == 400 - 152
    f = plan_bytes(net, target_bytes=1500, deployed_bits=32, norm_bits=8)  # float export: norm_bits irrelevant
    assert f.norm_bits is None and f.fixed_bytes == {"other_weights": 4 * OTHER, "biases": 4 * BIASES,
                                                     "unfolded_norms": 16 * SSN_FEATURES}
    assert f.kept_weights == (1500 - sum(f.fixed_bytes.values())) // 4 == 236
    big = plan_bytes(net, target_bytes=10**6, deployed_bits=8)
    assert big.kept_weights == PRUNABLE and big.target_sparsity == 0.0
    both = plan_bytes(net, target_bytes=600, deployed_bits=8, include_first_last=True)
    assert both.prunable_weights == PRUNABLE + OTHER and both.fixed_bytes["other_weights"] == 0


def test_infeasible_budget_names_what_takes_the_bytes():
    with pytest.raises(RecipeError) as info:
        plan_bytes(trained_net(), target_bytes=300, deployed_bits=8)
    text = str(info.value)
    assert "unfolded norms 256 B" in text and "biases 60 B" in text and "norm_bits: 8" in text


def _export_bytes(net: nn.Module, sparsity: float, *, norm_bits: int | None, quantize: bool, tmp: Path):
    net = copy.deepcopy(net)
    layers = P.prunable_layers(net)
    P.update_masks(layers, sparsity)
    P.apply_masks(net)
    x = torch.randn(64, 1, 8, 8)
    if quantize:
        net, report = quantize_model(net, QuantSpec(act_quantizer="ema", weight_quantizer="minmax",
                                                    norm_bits=norm_bits), get_target("x86"))
        assert report.left_float == ([] if norm_bits else ["ssn.bn (BatchNorm2d)"])
        calibrate(net, [(x, None)])
    path = export_onnx(net, (1, 8, 8), tmp / f"m{quantize}{norm_bits}.onnx").path
    parity = check_export(net, path, x.numpy())
    assert parity.top1_agreement >= 0.98
    return onnx_weight_stats(path), path


@pytest.mark.parametrize("deployed_bits,norm_bits,target", [(8, None, 550), (8, 8, 350), (32, None, 1500)])
def test_exported_model_meets_the_budget(tmp_path, deployed_bits, norm_bits, target):
    net = trained_net()
    plan = plan_bytes(net, target_bytes=target, deployed_bits=deployed_bits, norm_bits=norm_bits)
    assert 0.2 < plan.target_sparsity < 0.9
    stats, path = _export_bytes(net, plan.target_sparsity, norm_bits=norm_bits, quantize=deployed_bits == 8,
                                tmp=tmp_path)
    got = stats["weight_bytes_deployed"]
    # never above the budget; below it only by weights/biases that quantize to exactly zero
    assert target * 0.97 <= got <= target, (got, plan.as_dict())
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ("BatchNormalization" in ops) == (norm_bits is None)


def test_quantized_norm_is_stored_as_int8_and_matches_the_batchnorm(tmp_path):
    net = trained_net()
    x = torch.randn(32, 1, 8, 8)
    gm, report = quantize_model(net, QuantSpec(act_quantizer="ema", weight_quantizer="minmax", norm_bits=8),
                                get_target("x86"))
    assert report.quantized_norms == ["ssn.bn"]
    aff = gm.get_submodule("ssn.bn")
    assert isinstance(aff, QChannelAffine)
    bn = net.ssn.bn
    z = torch.randn(4, 16, 3, 3)
    with torch.no_grad():  # before quantization (quantizers calibrating = pass-through) it is the BN, exactly
        for q in (aff.aq, aff.bq):
            q.calibrating = True
        torch.testing.assert_close(aff(z), bn(z), atol=1e-5, rtol=1e-5)
        for q in (aff.aq, aff.bq):
            q.calibrating = False
    calibrate(gm, [(x, None)])
    with torch.no_grad():
        a, b = aff.quantized_scale(), aff.quantized_shift()
        for t, q in ((a, aff.aq), (b, aff.bq)):  # on a symmetric int8 grid, one scale per tensor
            k = t / q.scale().reshape(())
            assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= 127
        # 8-bit per-tensor grid: the affine stays within half a step of the float BatchNorm's
        ref_a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        assert (a - ref_a).abs().max() <= aff.aq.scale().item() / 2 + 1e-6
    path = export_onnx(gm, (1, 8, 8), tmp_path / "q.onnx").path
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    for t in ("a", "b"):
        assert inits[f"ssn.bn.{t}_quantized"].data_type == onnx.TensorProto.INT8
        assert f"ssn.bn.{t}" not in inits  # no float copy left in the file
    rep = check_export(gm, path, x.numpy())
    assert rep.top1_agreement == 1.0 and rep.max_abs_diff < 1e-3
    stats = onnx_weight_stats(path)
    assert stats["bits"]["ssn.bn.a_quantized"] == 8 and stats["bits"]["ssn.bn.b_quantized"] == 8


def test_norm_channels_of_a_pruned_kernel_do_not_set_the_grid():
    """A conv2 output channel pruned away feeds SSN zeros: its two BN channels get running variance
    ~0 and a = gamma/sqrt(var+eps) ~300x the others. Calibration folds them into the shift (exact for
    a constant input), so the per-tensor grid of ``a`` is set by the live channels."""
    torch.manual_seed(0)
    net = SSNNet()
    with torch.no_grad():
        net.conv2.weight[3].zero_()  # channel 3 -> SSN channels 6 and 7 (S = 2 bands)
    net.train()
    with torch.no_grad():
        for _ in range(200):  # running_var of the dead channels decays to ~0
            net(torch.randn(16, 1, 8, 8))
    net.eval()
    dead = [6, 7]  # SubSpectralNorm reshapes (N, C, F, T) -> (N, C*S, F/S, T): channel c, band s -> c*S + s
    a_float = net.ssn.bn.weight / torch.sqrt(net.ssn.bn.running_var + net.ssn.bn.eps)
    live = [c for c in range(16) if c not in dead]
    assert a_float[dead].abs().min() > 20 * a_float[live].abs().max()
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        ref = net(x)
    gm, _ = quantize_model(net, QuantSpec(act_quantizer="ema", weight_quantizer="minmax", norm_bits=8),
                           get_target("x86"))
    calibrate(gm, [(x[:32], None), (x[32:], None)])
    aff = gm.get_submodule("ssn.bn")
    with torch.no_grad():
        a = aff.quantized_scale()
        assert torch.all(a[dead] == 0)
        assert aff.aq.scale().item() <= a_float[live].abs().max().item() / 127 * 1.0001  # grid from live channels
        assert (a[live] - a_float[live]).abs().max() <= aff.aq.scale().item() / 2 + 1e-6
        shift = net.ssn.bn.bias - net.ssn.bn.running_mean * a_float  # the dead channels' constant output
        assert torch.allclose(aff.quantized_shift()[dead], shift[dead], atol=aff.bq.scale().item())
        out = gm(x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


def test_float_norm_parameters_are_counted_as_stored(tmp_path):
    net = trained_net()
    path = export_onnx(net, (1, 8, 8), tmp_path / "f.onnx").path
    stats = onnx_weight_stats(path)
    bn = [n for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]
    assert len(bn) == 1  # the conv BNs were folded by the exporter, SSN's was not
    nz = sum(int(np.count_nonzero(t.detach().numpy())) for t in (net.ssn.bn.weight, net.ssn.bn.bias,
                                                                  net.ssn.bn.running_mean, net.ssn.bn.running_var))
    assert stats["weight_bytes_deployed"] == 4 * (PRUNABLE + OTHER + BIASES) + 4 * nz


# ---------------------------------------------------------------------------------------- recipes
def _recipe(prune: dict, quant: bool = True) -> dict:
    stages = [{"method": "prune", "epochs": 1, **prune}]
    if quant:
        stages.append({"method": "qat", "epochs": 1})
    return {"version": 1, "stages": stages}


def test_recipe_exactly_one_target_and_deployed_bits():
    assert validate_recipe(_recipe({"target_bytes": 5000}), []).stages[0].deployed_bits == 8
    assert validate_recipe(_recipe({"target_sparsity": 0.5}), []).stages[0].target_bytes is None
    for bad, msg in (({}, "exactly one of target_sparsity"),
                     ({"target_sparsity": 0.5, "target_bytes": 100}, "got both"),
                     ({"target_bytes": 100, "deployed_bits": 4}, "deployed_bits must be 8")):
        with pytest.raises(RecipeError, match=msg):
            validate_recipe(_recipe(bad), [])
    with pytest.raises(RecipeError, match=r"set stages.0.deployed_bits=32"):
        validate_recipe(_recipe({"target_bytes": 100}, quant=False), [])
    with pytest.raises(RecipeError, match=r"set stages.0.deployed_bits=8"):
        validate_recipe(_recipe({"target_bytes": 100, "deployed_bits": 32}), [])
    # switching a shipped recipe from sparsity to bytes on the command line
    r = validate_recipe(_recipe({"target_sparsity": 0.5}), ["stages.0.target_sparsity=null",
                                                            "stages.0.target_bytes=4000"])
    assert r.stages[0].target_bytes == 4000


BYTES_RECIPE = """\
version: 1
name: bytes
stages:
  - method: prune
    target_bytes: {target}
    epochs: 1
    batch_size: 32
    optimizer: adam
    lr: 0.001
    weight_decay: 0.0
    update_every: 4
  - method: qat
    epochs: 1
    batch_size: 32
    optimizer: adam
    lr: 0.0005
    weight_decay: 0.0
bench: {{runs: 3, warmup: 1}}
export: {{parity_samples: 100}}
"""


@pytest.mark.integration
def test_compress_prunes_to_the_byte_budget_through_the_cli(tmp_path, capsys):
    """digits_cnn width 8 (3,922 conv/linear weights): the exported int8 model lands on the budget."""
    target = 3000
    recipe = tmp_path / "bytes.yaml"
    recipe.write_text(BYTES_RECIPE.format(target=target))
    factory = tmp_path / "net.py"
    factory.write_text("from edgec.models.small import DigitsCNN\n"
                       "def build(num_classes=10, in_channels=1):\n"
                       "    return DigitsCNN(num_classes, in_channels, width=8)\n")
    res = run_cli(capsys, "compress", "--model", f"{factory}:build", "--data", "digits", "--recipe", recipe,
                  "--out", tmp_path / "run", "--device", "cpu")
    assert res.code == 0, res.err
    rows = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    got = rows[1]["weight_bytes_deployed"]
    assert 0.97 * target <= got <= target, got
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    budget = next(e for e in events if e.get("event") == "byte_budget")
    assert budget["target_bytes"] == target and budget["predicted_bytes"] == target
    done = next(e for e in events if e.get("event") == "stage_done" and e["metrics"].get("byte_budget"))
    assert done["metrics"]["target_sparsity"] == budget["target_sparsity"]
    from edgec.runs import rebuild_model

    model = rebuild_model(tmp_path / "run", "final")
    masked = P.masked_layers(model)
    kept = sum(int(m.weight_mask.sum()) for m in masked)
    assert kept == budget["kept_weights"]

    # a budget the fixed parts already exceed: refused before any training, saying what takes the bytes
    recipe.write_text(BYTES_RECIPE.format(target=200))
    res = run_cli(capsys, "compress", "--model", f"{factory}:build", "--data", "digits", "--recipe", recipe,
                  "--out", tmp_path / "run2", "--device", "cpu")
    assert res.code == 2 and "stages.0.target_bytes" in res.err and "biases" in res.err
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


def test_bias_of_a_layer_fed_by_a_dead_activation_exports_without_wrapping(tmp_path):
    """Heavy pruning can leave an activation constant zero (input scale clamps to 1e-8): the int32 bias
    then saturates at 2**31 - 1, which must not wrap around to -2**31 in the file."""
    net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU(), nn.Conv2d(2, 3, 1, bias=True),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net[0].weight.fill_(-1.0)  # positive inputs -> ReLU output is exactly zero
        net[2].bias.copy_(torch.tensor([0.5, -0.25, 0.1]))
    x = torch.rand(16, 1, 4, 4) + 0.1
    gm, _ = quantize_model(net, QuantSpec(act_quantizer="ema", weight_quantizer="minmax"), get_target("x86"))
    calibrate(gm, [(x, None)])
    path = export_onnx(gm, (1, 4, 4), tmp_path / "dead.onnx").path
    rep = check_export(gm, path, x.numpy())
    assert rep.top1_agreement == 1.0 and rep.max_abs_diff < 1e-3 * 0.5

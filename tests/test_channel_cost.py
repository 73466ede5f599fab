"""Latency-aware channel selection (edgec.channel_cost, prune_channels ``select: latency``): the measured
per-channel cost of every Torch-Pruning group, how it re-orders a global ranking, and the stage end to end."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cli_util import run_cli
from edgec import channel_cost as K
from edgec import channels as C
from edgec.models import create_model

pytest.importorskip("torch_pruning")


def test_split_shares_a_layers_time_by_the_relative_change_of_its_two_sides():
    # only the outputs shrank: all of it per removed output channel
    assert K._split(10.0, (16, 16), (8, 16)) == (10.0 / 8, None)
    # both halved: half the time each, over 8 channels each
    assert K._split(10.0, (16, 16), (8, 8)) == (5.0 / 8, 5.0 / 8)
    # outputs 64 -> 32 (a half), inputs 32 -> 24 (a quarter): 2/3 and 1/3 of the time
    out, inp = K._split(12.0, (64, 32), (32, 24))
    assert out == pytest.approx(12.0 * 2 / 3 / 32) and inp == pytest.approx(12.0 * 1 / 3 / 8)
    # a layer that got slower keeps its negative cost; an unchanged one has none
    assert K._split(-4.0, (16, 16), (8, 16))[0] == -0.5
    assert K._split(3.0, (16, 16), (16, 16)) == (None, None)


def _resnet():
    torch.manual_seed(0)
    m = create_model("resnet20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    ignored, names = C.protected_layers(m, x, prune_first_last=False)
    return m, x, ignored, names


def _pruner(m, x, ignored, importance):
    return C.build_pruner(m, x, importance, ignored=ignored, global_pruning=True, round_to=None,
                          max_layer_ratio=0.5, resolution=4)


def test_group_gains_are_the_profiled_time_differences_split_over_each_groups_layers(tmp_path):
    """Real exports and a real ORT profile (FP32, small input): every group gets its cost, and the cost
    is the layer-time arithmetic of the module docstring on the recorded layer times."""
    m, x, ignored, names = _resnet()
    pr = _pruner(m, x, ignored, C.make_importance("l2"))
    res = K.group_gains(pr, m, x, names, export=lambda mod, p: K.deployed_export(mod, (3, 16, 16), p), runs=20,
                        slim=0.5, round_to=8)
    roots = set(K.root_names(pr, m).values())
    assert set(res["gains"]) == roots and len(roots) > 5
    layers = res["layers"]
    assert layers["layer1.0.conv1"]["full"] == (16, 16) and layers["layer1.0.conv1"]["slim"] == (8, 16)
    assert layers["layer3.1.conv1"]["slim"] == (32, 32)
    assert "conv1" in layers and layers["conv1"]["slim"] == layers["conv1"]["full"]  # protected: unchanged
    # the group rooted at layer2.1.conv1 prunes that conv's outputs and layer2.1.conv2's inputs
    a, b = layers["layer2.1.conv1"], layers["layer2.1.conv2"]
    expect = (K._split(a["full_us"] - a["slim_us"], a["full"], a["slim"])[0]
              + K._split(b["full_us"] - b["slim_us"], b["full"], b["slim"])[1])
    assert res["gains"]["layer2.1.conv1"] == pytest.approx(expect)
    assert set(res["run_us"]) == {"full", "slim"} and all(v > 0 for v in res["run_us"].values())


def test_latency_aware_importance_prunes_where_the_time_is():
    """With every group's importance divided by its cost, one global step takes channels only from the
    groups whose channels cost time (here: layer3's), none from those measured as saving nothing."""
    m, x, ignored, names = _resnet()
    imp = K.LatencyAwareImportance(C.make_importance("l2"))
    pr = _pruner(m, x, ignored, imp)
    roots = K.root_names(pr, m)
    imp.set_gains({mod: (5.0 if name.startswith("layer3") else -1.0) for mod, name in roots.items()})
    before = C._shapes(m)
    for group in pr.step(interactive=True):
        group.prune()
    after = C._shapes(m)
    shrunk = {n for n in before if after[n][0] < before[n][0]}
    assert shrunk and all(n.startswith("layer3") for n in shrunk), shrunk
    # without gains it is the plain importance: the same step on a fresh model prunes other stages too
    m2, x2, ignored2, _ = _resnet()
    pr2 = _pruner(m2, x2, ignored2, K.LatencyAwareImportance(C.make_importance("l2")))
    b2 = C._shapes(m2)
    for group in pr2.step(interactive=True):
        group.prune()
    assert any(not n.startswith("layer3") and C._shapes(m2)[n][0] < b2[n][0] for n in b2)


RECIPE = """\
version: 1
name: t
stages:
  - method: prune_channels
    target_macs: 0.5
    select: latency
    measure_as: {measure_as}
    cost_runs: 20
    steps: 1
    epochs: 1
    batch_size: 32
    optimizer: adam
    lr: 0.001
{more}bench: {{runs: 5, warmup: 1, rounds: 1}}
"""
QAT = "  - method: qat\n    epochs: 1\n    batch_size: 32\n"


def test_select_latency_end_to_end_measures_the_quantized_graph(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(measure_as="auto", more=QAT))
    out = tmp_path / "run"
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--data", "digits", "--recipe", recipe, "--out", out,
                  "--device", "cpu")
    assert res.code == 0, res.err + res.out
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    cost = [e for e in events if e.get("event") == "prune_channels_cost"]
    assert len(cost) == 1 and cost[0]["measured_as"] == "W8A8" and set(cost[0]["us_per_channel"]) == {"conv2", "conv3"}
    summary = next(e for e in events if e.get("event") == "prune_channels")
    assert summary["select"] == "latency" and summary["macs_after"] <= 0.5 * summary["macs_before"]
    # the report's section: the rounds and what a channel of each group cost
    md = (out / "report.md").read_text()
    section = md[md.index("## Channel pruning"):]
    assert "channels selected by latency" in section and "us one channel costs (W8A8)" in section
    assert f"{summary['macs_before']:,} -> {summary['macs_after']:,}" in section
    doc = json.loads((out / "report.json").read_text())["pruning"]
    assert doc["stages"][0]["costs"][0]["us_per_channel"] == cost[0]["us_per_channel"]


def test_measure_as_quantized_without_a_quantizing_stage_is_a_recipe_error(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(measure_as="quantized", more=""))
    out = tmp_path / "run"
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--data", "digits", "--recipe", recipe, "--out", out,
                  "--device", "cpu")
    assert res.code == 2, res.err
    assert "measure_as: quantized needs a quantizing stage" in res.err and "stages.0.measure_as=fp32" in res.err
    assert not out.exists()  # refused when the recipe is read: no run directory


def test_next_macs_follows_the_measured_secant_and_is_clamped():
    from edgec.stages.prune_channels import _next_macs

    r0 = {"macs": 1000, "latency_ms": 1.0}
    # one round: no slope yet, MACs scaled by (goal / latency) ** (1 / rounds left)
    assert _next_macs([r0], 0.81, 2) == pytest.approx(1000 * 0.9)
    # two rounds: 200 MACs bought 0.05 ms, 0.02 ms more is 80 MACs more
    r1 = {"macs": 800, "latency_ms": 0.95}
    assert _next_macs([r0, r1], 0.93, 1) == pytest.approx(720)
    # a flat or inverted slope (noise) falls back to the power rule
    r1_flat = {"macs": 800, "latency_ms": 1.0}
    assert _next_macs([r0, r1_flat], 0.9, 1) == pytest.approx(800 * 0.9)
    # never more than 30 % at once, never less than 2 %
    assert _next_macs([r0, {"macs": 800, "latency_ms": 0.999}], 0.5, 1) == pytest.approx(0.7 * 800)
    assert _next_macs([r0], 0.9999, 1) == pytest.approx(0.98 * 1000)


def test_costs_inside_the_noise_leave_the_importance_order_alone():
    """A model whose latency does not depend on its channels (every gain 0 within its noise) is pruned
    exactly as by importance alone; the divisor follows the significance of each gain."""
    def step(with_costs: bool):
        m, x, ignored, _ = _resnet()
        imp = K.LatencyAwareImportance(C.make_importance("l2"))
        pr = _pruner(m, x, ignored, imp)
        if with_costs:
            roots = K.root_names(pr, m)
            imp.set_gains({mod: 0.0 for mod in roots}, {mod: 0.2 for mod in roots})
        for group in pr.step(interactive=True):
            group.prune()
        return C._shapes(m)

    assert step(True) == step(False)
    imp = K.LatencyAwareImportance(C.make_importance("l2"))
    a, b, c = nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 1)
    d = nn.Linear(1, 1)
    imp.set_gains({a: 0.5, b: -0.3, c: 0.05, d: 0.15}, {a: 0.1, b: 0.1, c: 0.1, d: 0.05})
    # a saves beyond its noise: its gain; b costs beyond it: a quarter of the median noise; c is inside
    # its noise: the median noise (0.1); d (0.15 > 2 x 0.05) is significant too: its gain
    assert imp.divisors == {a: pytest.approx(0.5), b: pytest.approx(0.025), c: pytest.approx(0.1), d: pytest.approx(0.15)}
    assert K.noise_us(10.0) == 1.0 and K.noise_us(100.0) == pytest.approx(3.0)

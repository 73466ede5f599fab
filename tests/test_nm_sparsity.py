"""N:M (2:4) semi-structured sparsity: masks, the prune stage's pattern, masks through QAT, the export's
verification of the pattern on the ONNX weights (exit 4 when broken), TensorRT's sparse-weights decision."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cli_util import run_cli
from edgec import masks as P
from edgec.errors import ExportError, RecipeError
from edgec.recipe import load_recipe

PATTERNS = [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (8, 16)]


def _groups_along_input(t: torch.Tensor, m: int) -> torch.Tensor:
    """Independent of edgec: [O, I, *k] -> per (o, kernel position), input channels in runs of m."""
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1)  # ASP / TensorRT: [O, kh, kw, I]
    return t.reshape(-1, m)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(PATTERNS), st.integers(1, 5), st.integers(1, 3), st.sampled_from([0, 1, 3]),
       st.integers(0, 2**31 - 1), st.booleans())
def test_mask_has_exactly_m_minus_n_zeros_per_group(nm, out_ch, groups_in, k, seed, ties):
    n, m = nm
    shape = (out_ch, groups_in * m) + ((k, k) if k else ())
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 2, shape, generator=g).float() if ties else torch.rand(shape, generator=g)
    mask = P.nm_mask(scores, n, m)
    assert mask.shape == scores.shape
    zeros = (_groups_along_input(mask, m) == 0).sum(1)
    assert bool((zeros == m - n).all())
    # the kept entries are the group's highest scores
    sg, mg = _groups_along_input(scores, m), _groups_along_input(mask, m)
    kept_min = torch.where(mg == 1, sg, torch.inf).min(1).values
    pruned_max = torch.where(mg == 0, sg, -torch.inf).max(1).values
    assert bool((kept_min >= pruned_max).all())


def test_mask_groups_run_along_input_channels_per_kernel_position():
    scores = torch.zeros(1, 4, 1, 2)
    scores[0, :, 0, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # kernel position 0: keep channels 0, 1
    scores[0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # kernel position 1: keep channels 2, 3
    mask = P.nm_mask(scores, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [1, 1, 0, 0] and mask[0, :, 0, 1].tolist() == [0, 0, 1, 1]


def test_update_nm_masks_lists_dense_layers_and_keeps_old_zeros():
    torch.manual_seed(0)
    a, b, c = nn.Conv2d(8, 4, 3), nn.Conv2d(3, 8, 3), nn.Linear(16, 2)
    layers = [("a", a), ("b", b), ("c", c)]
    P.ensure_masks(layers)
    a.weight_mask[0, :3, 0, 0] = 0  # pruned before: stays pruned (a group may hold more zeros)
    patterned, dense = P.update_nm_masks(layers, 2, 4)
    assert patterned == ["a", "c"] and dense == ["b"]
    assert bool((b.weight_mask == 1).all())
    assert bool((a.weight_mask[0, :3, 0, 0] == 0).all())
    zeros = (_groups_along_input(a.weight_mask, 4) == 0).sum(1)
    assert bool((zeros >= 2).all()) and int(zeros.max()) == 3
    assert bool(((_groups_along_input(c.weight_mask, 4) == 0).sum(1) == 2).all())


@pytest.mark.parametrize("text,why", [("2:5", "one of"), ("4:4", "0 < N < M"), ("0:4", "0 < N < M"),
                                      ("2-4", "integers"), ("a:b", "integers")])
def test_pattern_validation(text, why):
    with pytest.raises(ValueError, match=why):
        P.parse_pattern(text)
    with pytest.raises(RecipeError, match="stages.0.pattern|stages.0"):
        load_recipe("prune-24-int8", [f"stages.0.pattern={text}"])


@pytest.mark.parametrize("override,why", [("stages.0.target_sparsity=0.5", "remove target_sparsity"),
                                          ("stages.0.target_bytes=1000", "remove target_bytes"),
                                          ("stages.0.schedule_kind=oneshot", "schedule_kind have no effect")])
def test_pattern_refuses_targets_and_schedules(override, why):
    with pytest.raises(RecipeError, match=why):
        load_recipe("prune-24-int8", [override])


def test_shipped_recipe():
    r = load_recipe("prune-24-int8")
    assert r.stages[0].pattern == "2:4" and r.stages[0].target_sparsity is None
    assert [s.method for s in r.stages] == ["prune", "qat"]


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def run24(tmp_path_factory) -> Path:
    """digits_cnn (trained 2 epochs) through prune-24-int8 with one epoch per stage, via the CLI."""
    from test_cli_e2e import train_digits

    from edgec.cli import main

    work = tmp_path_factory.mktemp("nm")
    weights = train_digits(work / "fp32.pt", epochs=2)
    out = work / "run"
    old = sys.argv
    sys.argv = ["edgec", "compress", "--model", "digits_cnn", "--weights", str(weights), "--data", "digits",
                "--recipe", "prune-24-int8", "--out", str(out), "--device", "cpu",
                "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1", "--set", "bench.runs=20",
                "--set", "bench.rounds=2"]
    try:
        with pytest.raises(SystemExit) as info:
            main()
    finally:
        sys.argv = old
    assert info.value.code == 0
    return out


def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "model_final.pt", map_location="cpu", weights_only=True)["model"]


def test_pattern_survives_fine_tuning_and_qat(run24):
    from edgec.runs import rebuild_model

    state = _final_state(run24)
    inp = torch.load(run24 / "model_input.pt", map_location="cpu", weights_only=True)["model"]
    model = rebuild_model(run24)
    conv2 = model.conv2
    assert hasattr(conv2, "wq"), "the qat stage quantizes conv2"
    # fine-tuned (weights moved) with the 2:4 mask held, and the quantized weights obey it
    assert not torch.equal(state["conv2.weight"], inp["conv2.weight"])
    zeros = (_groups_along_input(conv2.weight_mask, 4) == 0).sum(1)
    assert bool((zeros == 2).all())
    qw = conv2.quantized_weight().detach()
    assert bool(((_groups_along_input(qw, 4) != 0).sum(1) <= 2).all())
    assert getattr(model.conv1, "weight_mask", None) is None  # first layer: protected, dense
    events = [json.loads(line) for line in (run24 / "metrics.jsonl").read_text().splitlines()]
    nm = next(e for e in events if e.get("event") == "nm_masks")
    assert nm["pattern_layers"] == ["conv2", "conv3"] and nm["dense_layers"] == []


def test_export_check_records_pattern_and_report_says_speed_not_measured(run24):
    check = json.loads((run24 / "export/model_compressed.check.json").read_text())
    nm = check["nm_sparsity"]
    assert nm["ok"] and nm["pattern"] == "2:4" and nm["expected_layers"] == nm["verified_layers"] == 2
    holds = {r["node"]: r["holds"] for r in nm["layers"]}
    assert list(holds.values()).count(True) == 2 and holds["/conv1/Conv"] is None
    assert "nm_sparsity" not in json.loads((run24 / "export/model_fp32.check.json").read_text())
    report = (run24 / "report.md").read_text()
    assert "2:4 sparsity: pattern verified on 2 layers" in report and "not measured here" in report


def _tamper_onnx(src: Path, dst: Path) -> None:
    """Make one pruned int8 weight of conv3 non-zero in the file."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    init = next(i for i in proto.graph.initializer if i.name == "conv3.weight_quantized")
    w = numpy_helper.to_array(init).copy()
    groups = np.moveaxis(w, 1, -1)  # view [O, kh, kw, I]
    o, y, x = 0, 0, 0
    i = int(np.flatnonzero(groups[o, y, x, :4] == 0)[0])
    w[o, i, y, x] = 7
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(dst))


def test_tampered_onnx_fails_verification_with_exit_4(run24, tmp_path):
    from edgec.export.sparsity import check_nm, expected_layers, verify_nm
    from edgec.runs import read_run, rebuild_model, run_recipe

    exp = expected_layers(run_recipe(read_run(run24)), rebuild_model(run24))
    good = run24 / "export/model_compressed.onnx"
    assert verify_nm(good, exp)["ok"]
    bad = tmp_path / "tampered.onnx"
    _tamper_onnx(good, bad)
    rep = verify_nm(bad, exp)
    assert not rep["ok"] and rep["verified_layers"] == 1 and "conv3" in rep["failing"][0]
    with pytest.raises(ExportError, match="do not follow the pattern") as info:
        check_nm(rep, bad)
    assert info.value.exit_code == 4


def test_export_command_exits_4_when_a_weight_breaks_the_pattern(run24, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run24, run)
    ckpt = torch.load(run / "model_final.pt", map_location="cpu", weights_only=True)
    state = ckpt["model"]
    state["conv3.weight_mask"].fill_(1.0)  # the mask no longer holds the pattern, and a pruned weight lives
    state["conv3.weight"][0, :4, 0, 0] = 0.5
    torch.save(ckpt, run / "model_final.pt")
    res = run_cli(capsys, "export", run)
    assert res.code == 4, res.out + res.err
    assert "2:4" in res.out + res.err and "do not follow the pattern" in res.out + res.err
    check = json.loads((run / "export/model_compressed.check.json").read_text())
    assert check["nm_sparsity"]["ok"] is False  # recorded before the export failed


def test_tensorrt_sparse_weights_decision(run24, tmp_path):
    import onnx
    from onnx import numpy_helper

    from edgec.export.sparsity import sparse_weights_wanted

    assert sparse_weights_wanted(run24 / "export/model_compressed.onnx")
    assert not sparse_weights_wanted(run24 / "export/model_fp32.onnx")
    # every 2:4 weight broken -> no flag
    proto = onnx.load(str(run24 / "export/model_compressed.onnx"))
    for init in proto.graph.initializer:
        if init.name in ("conv2.weight_quantized", "conv3.weight_quantized"):
            w = numpy_helper.to_array(init).copy()
            w[w == 0] = 1
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    dense = tmp_path / "dense.onnx"
    onnx.save(proto, str(dense))
    assert not sparse_weights_wanted(dense)


def test_float_export_of_a_pattern_run_verifies(tmp_path):
    """A prune-only recipe (float export, BatchNorm folded into renamed weights): verified by shape."""
    from edgec.export.onnx_export import export_onnx
    from edgec.export.sparsity import NMExpectation, verify_nm, sparse_weights_wanted
    from edgec.models import create_model

    torch.manual_seed(0)
    m = create_model("resnet8").eval()
    layers = P.prunable_layers(m)
    patterned, _ = P.update_nm_masks(layers, 2, 4)
    P.apply_masks(m)
    shapes = [tuple(mod.weight.shape) for name, mod in layers if name in patterned]
    path = export_onnx(m, (3, 32, 32), tmp_path / "m.onnx").path
    rep = verify_nm(path, NMExpectation(2, 4, shapes))
    assert rep["ok"] and rep["verified_layers"] == len(shapes) > 3
    assert sparse_weights_wanted(path)

"""`edgec analyze`: per-layer quantization sensitivity (only layer i quantized / only layer i float)."""
from __future__ import annotations

import json

import pytest
import torch

from cli_util import run_cli
from edgec.data import load_data
from edgec.models import save_weights
from edgec.sensitivity import analyze_model

from test_precision import train


@pytest.fixture(scope="module")
def fragile():
    """digits_cnn (trained) whose conv2 is destroyed by any weight quantization, the FP32 function unchanged:
    conv1's channel 0 is made dead (ReLU output exactly 0), and conv2's weights on that input channel are
    set to 1000. They add nothing in FP32, but they set every output channel's per-channel weight grid, on
    which all of conv2's real weights (~0.05) round to zero."""
    model = train("digits_cnn", epochs=2)
    with torch.no_grad():
        model.conv1.weight[0].zero_()
        model.bn1.weight[0] = 0.0
        model.bn1.bias[0] = -1.0
        model.conv2.weight[:, 0] = 1000.0
    return model.eval()


def test_the_fragile_layer_comes_out_most_sensitive(fragile):
    data = load_data("digits")
    res = analyze_model(fragile, data, recipe="ptq-int8", samples=360, calibration_samples=128)
    rows = {r.layer: r for r in res.rows}
    assert list(rows) == ["conv1", "conv2", "conv3", "fc"]
    assert res.fp32_accuracy > 0.85
    assert res.most_sensitive()[0] == "conv2"
    assert rows["conv2"].drop_only_quantized > 0.5  # near chance with conv2 alone quantized
    assert all(abs(rows[n].drop_only_quantized) < 0.05 for n in ("conv1", "conv3", "fc"))
    assert rows["conv2"].kl_only_quantized > 10 * max(rows[n].kl_only_quantized for n in ("conv1", "conv3", "fc"))
    # leaving conv2 alone float repairs the model; leaving any other layer float does not
    assert rows["conv2"].drop_only_float < 0.05
    assert all(rows[n].drop_only_float > 0.5 for n in ("conv1", "conv3", "fc"))
    assert res.quantized_accuracy < res.fp32_accuracy - 0.5
    assert all(r.int8_vs_float_time is None for r in res.rows)  # no per-layer profile yet
    assert res.measured_in == "pytorch simulation"


def test_ort_measurement_agrees_with_the_simulation(fragile):
    data = load_data("digits")
    sim = analyze_model(fragile, data, samples=200, calibration_samples=64, layers="conv[23]")
    ort = analyze_model(fragile, data, samples=200, calibration_samples=64, layers="conv[23]", ort=True)
    assert [r.layer for r in ort.rows] == ["conv2", "conv3"] and ort.measured_in == "onnxruntime"
    for a, b in zip(sim.rows, ort.rows):
        assert abs(a.drop_only_quantized - b.drop_only_quantized) <= 0.02
        assert abs(a.drop_only_float - b.drop_only_float) <= 0.02


@pytest.mark.integration
def test_analyze_cli_on_a_model_and_on_a_run(tmp_path, fragile, capsys):
    weights = save_weights(fragile, tmp_path / "fragile.pt")
    out = tmp_path / "an"
    res = run_cli(capsys, "analyze", "--model", "digits_cnn", "--weights", weights, "--data", "digits",
                  "--samples", 200, "--calibration-samples", 64, "--out", out)
    assert res.code == 0, res.err
    assert "conv2" in res.out and "pytorch simulation" in " ".join(res.out.split())
    doc = json.loads((out / "sensitivity.json").read_text())
    assert doc["most_sensitive"][0] == "conv2" and len(doc["rows"]) == 4
    assert set(doc["rows"][0]) >= {"layer", "drop_only_quantized", "kl_only_quantized", "drop_only_float",
                                   "kl_only_float", "int8_vs_float_time"}
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    # on a run directory: its input model, data and recipe (W4A8 here)
    run = tmp_path / "run"
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--weights", weights, "--data", "digits",
                  "--recipe", "ptq-int8", "--set", "stages.0.weight_bits=4", "--set", "stages.0.calibration_samples=64",
                  "--out", run, "--device", "cpu", "--no-export")
    assert res.code == 0, res.err
    res = run_cli(capsys, "analyze", run, "--samples", 200, "--calibration-samples", 64, "--layers", "conv*",
                  "--out", tmp_path / "an2")
    assert res.code == 0, res.err
    doc = json.loads((tmp_path / "an2" / "sensitivity.json").read_text())
    assert [r["layer"] for r in doc["rows"]] == ["conv1", "conv2", "conv3"] and doc["spec"]["weight_bits"] == 4
    assert doc["most_sensitive"][0] == "conv2"


def test_analyze_bad_inputs(tmp_path, capsys):
    res = run_cli(capsys, "analyze", tmp_path / "nope")
    assert res.code == 2 and "not an edgec run directory" in res.err
    res = run_cli(capsys, "analyze", "--model", "digits_cnn", "--data", "digits", "--samples", 50,
                  "--calibration-samples", 16, "--layers", "layer9.*")
    assert res.code == 2 and "'layer9.*'" in res.err and "conv1" in res.err
    res = run_cli(capsys, "analyze")
    assert res.code == 2 and "RUN_DIR or --model" in res.err
    res = run_cli(capsys, "analyze", "--model", "digits_cnn", "--data", "digits", "--recipe", "no-such-recipe")
    assert res.code == 2

"""Precision chosen by measurement (edgec.mixed_precision, issue 14 item 4): the decision file, what the
export keeps float or at 8 bits, replay on rebuild and --resume, max_drop, pqk, foreign targets.

Which layers come out slower differs per CPU, so no test names them: the tests check that the decision,
the exported graph (file and ORT-optimized) and the rebuild agree, and the invariants of the rules."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from cli_util import run_cli
from edgec import mixed_precision
from edgec.data import indices_sha256, load_data
from edgec.export.check import fused_ops
from edgec.models import save_weights
from edgec.targets import get_target

from test_precision import train

pytestmark = pytest.mark.integration  # compress / export runs end to end, in-process

LAYERS = ["conv1", "conv2", "conv3", "fc"]  # digits_cnn's conv/linear layers
QUICK = ["--set", "bench.runs=5", "--set", "bench.warmup=1", "--set", "bench.rounds=1",
         "--set", "export.parity_samples=200", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained():
    return train("digits_cnn", epochs=2)


@pytest.fixture(scope="module")
def weights(trained, tmp_path_factory):
    return save_weights(trained, tmp_path_factory.mktemp("w") / "fp32.pt")


def _fragile(trained, k: float, path):
    """digits_cnn with conv2 fragile, its FP32 function unchanged: conv1's channel 0 is dead (ReLU output
    0) and conv2's weights on it are ``k`` x the largest real weight of each output channel, which sets the
    per-channel weight grid. k=16: on the 4-bit grid (step 16/7 of that) every real weight rounds to zero,
    on the 8-bit one (step 16/63) they survive (uniform W4A4 at chance, conv2 at 8 bits ~92 %); k=1e4:
    conv2 breaks at any bits (as in tests/test_sensitivity.py) and only float repairs it."""
    import copy

    m = copy.deepcopy(trained)
    with torch.no_grad():
        m.conv1.weight[0].zero_()
        m.bn1.weight[0] = 0.0
        m.bn1.bias[0] = -1.0
        big = m.conv2.weight[:, 1:].abs().flatten(1).max(1).values
        m.conv2.weight[:, 0] = (k * big)[:, None, None]
    return save_weights(m.eval(), path)


@pytest.fixture(scope="module")
def fragile_weights(trained, tmp_path_factory):
    return _fragile(trained, 16, tmp_path_factory.mktemp("w") / "fragile4.pt")


@pytest.fixture(scope="module")
def very_fragile_weights(trained, tmp_path_factory):
    return _fragile(trained, 1e4, tmp_path_factory.mktemp("w") / "fragile_any.pt")


@pytest.fixture
def refuse(monkeypatch):
    """``refuse(bench=..., latency=...)``: from then on the test fails if this process profiles or times
    an artifact (``latency``: also the whole-model timing, which a run's own bench uses) or builds a
    candidate for a decision (``bench``)."""
    import edgec.bench.compare
    import edgec.bench.profile

    def fail(*a, **k):
        raise AssertionError("measured: a recorded decision must be replayed / a foreign target not timed")

    def go(*, bench: bool = True, latency: bool = True):
        monkeypatch.setattr(edgec.bench.profile, "profile_models", fail)
        if bench:
            monkeypatch.setattr(mixed_precision, "_Bench", fail)
        if latency:
            monkeypatch.setattr(edgec.bench.compare, "compare_latency", fail)

    return go


def _compress(capsys, out, *args):
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--data", "digits", "--out", out, *QUICK, *args)
    assert res.code == 0, res.err
    return res


def _decision(run_dir, index=0) -> dict:
    return json.loads((run_dir / "stages" / f"stage{index}.precision.json").read_text())


def _check(onnx_path) -> dict:
    return json.loads(onnx_path.with_suffix(".check.json").read_text())


def _float_weights(path) -> set[str]:
    """Conv/Gemm whose weight is a float initializer in the file (not int8 + DequantizeLinear)."""
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    return {n.input[1] for n in m.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits
            and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT}


def _assert_export_keeps_float(path, floats: set[str]) -> None:
    """The exported file and its ORT-optimized graph keep exactly ``floats`` float; the rest integer."""
    check = _check(path)
    lp = check["layer_precision"]
    if floats == set(LAYERS):  # every layer float: the artifact is the float model
        assert lp == {} and not check["quantized"]
    else:
        assert {n for n, p in lp.items() if p["float"]} == floats and set(lp) == set(LAYERS)
    assert _float_weights(path) == {f"{n}.weight" for n in floats}
    compute, integer, float_left = fused_ops(path)
    assert compute == len(LAYERS) and float_left == len(floats)
    assert sum(v for k, v in integer.items() if k in ("QLinearConv", "QGemm", "MatMulInteger", "QLinearMatMul")) \
        == len(LAYERS) - len(floats)


def _outputs(path, x) -> np.ndarray:
    from edgec.runtime import load_session, predict

    return predict(load_session(path, threads=1), x)


# ------------------------------------------------------------------------------------- default rule


def test_default_run_decision_matches_export_and_rebuild_replays_it(capsys, tmp_path, weights, refuse):
    out = tmp_path / "run"
    _compress(capsys, out, "--weights", weights, "--recipe", "ptq-int8")
    doc = _decision(out)
    assert doc["schema"] == "edgec.precision/1" and doc["policy"]["keep_slow_float"] is True
    assert list(doc["layers"]) == LAYERS and doc["user_fixed"] == []
    floats = {n for n, v in doc["layers"].items() if v == "float"}
    assert {o["match"] for o in doc["chosen_overrides"] if o["keep_float"]} == floats
    assert all(o["reason"] for o in doc["chosen_overrides"])
    measured, _ = mixed_precision.measurable(get_target("x86"))
    if measured:
        # whatever this CPU measured: the recorded rows obey the policy, the chosen artifact is not
        # measured slower than uniform, and the slower layers are float unless that was rejected
        assert doc["latency"].startswith("measured on this host")
        for r in doc["slow_layers"]:
            assert r["slower_share"] >= doc["policy"]["slower_share"]
            assert r["int8_us"] - r["fp32_us"] >= doc["policy"]["min_us"] - 0.011  # rounded to 0.01 us
        assert doc["chosen_speedup"] >= doc["uniform_speedup"] > 0
        if "per_layer_rejected" not in doc:
            assert {r["layer"] for r in doc["slow_layers"]} <= floats
        if floats and not doc.get("more_float_tried"):  # floated for speed: only for a gain beyond the noise
            assert doc["chosen_speedup"] > doc["uniform_speedup"] * (1 + doc["policy"]["min_gain"])
        delta = doc["int8_minus_float_us"]
        assert set(delta) <= set(LAYERS) and {r["layer"] for r in doc["slow_layers"]} <= set(delta)
        if doc["chosen_speedup"] < 1.0:  # still slower than FP32: more layers were tried float, if any was slower
            assert doc.get("more_float_tried") or all(delta.get(n, 0) <= 0 for n in set(LAYERS) - floats)
    else:
        assert "not this host" in doc["latency"] and floats == set()
    exported = out / "export" / "model_compressed.onnx"
    _assert_export_keeps_float(exported, floats)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ev = [e for e in events if e.get("event") == "precision"]
    assert len(ev) == 1 and set(ev[0]["kept_float"]) == floats

    # rebuild: the decision is read back, nothing is measured, the same graph comes out
    refuse()
    before = (out / "stages" / "stage0.precision.json").read_bytes()
    again = tmp_path / "again.onnx"
    res = run_cli(capsys, "export", out, "--out", again)
    assert res.code == 0, res.err
    assert (out / "stages" / "stage0.precision.json").read_bytes() == before
    assert _check(again)["layer_precision"] == _check(exported)["layer_precision"]
    _assert_export_keeps_float(again, floats)
    from edgec.data import to_numpy

    x, _ = to_numpy(load_data("digits").eval, limit=200)
    np.testing.assert_array_equal(_outputs(again, x), _outputs(exported, x))


def test_keep_slow_float_false_is_uniform(capsys, tmp_path, weights):
    out = tmp_path / "run"
    _compress(capsys, out, "--weights", weights, "--recipe", "ptq-int8",
              "--set", "stages.0.precision.keep_slow_float=false")
    assert not (out / "stages" / "stage0.precision.json").exists()  # neither rule on: nothing decided
    _assert_export_keeps_float(out / "export" / "model_compressed.onnx", set())
    assert not any(json.loads(line).get("event") == "precision"
                   for line in (out / "metrics.jsonl").read_text().splitlines())


def test_a_target_that_is_not_this_host_measures_nothing(capsys, tmp_path, weights, refuse):
    for name in ("tensorrt", "x86", "arm64"):
        ok, why = mixed_precision.measurable(get_target(name))
        assert ok == (name == mixed_precision._host()) and (ok or "not this host" in why)
    other = "arm64" if mixed_precision._host() == "x86" else "x86"
    refuse(bench=False)  # nothing may be profiled or timed (the decision is still made and recorded)
    out = tmp_path / "run"
    _compress(capsys, out, "--weights", weights, "--recipe", "ptq-int8", "--set", f"target={other}", "--no-export")
    doc = _decision(out)
    assert "not this host" in doc["latency"] and other in doc["latency"]
    assert doc["chosen_overrides"] == [] and set(doc["layers"].values()) == {"uniform"}
    assert "slow_layers" not in doc and "chosen_speedup" not in doc


# ------------------------------------------------------------------------------------- max_drop


W4A4 = ["--set", "stages.0.weight_bits=4", "--set", "stages.0.act_bits=4", "--set", "stages.0.calibration_samples=256"]
TOLERANCE = ["--set", "stages.0.precision.keep_slow_float=false", "--set", "stages.0.precision.max_drop=0.1",
             "--set", "stages.0.precision.eval_samples=400"]


def _assert_promoted_to_8_bits(doc: dict, check: dict, at_8: tuple = ()) -> list[str]:
    """Every promotion is to 8 bits (none float); the export has exactly those layers (and ``at_8``, the
    stage's own 8-bit layers) on the 8-bit grid, the rest on the 4-bit one."""
    promoted = [o["match"] for o in doc["chosen_overrides"]]
    assert promoted and all(not o["keep_float"] and o["weight_bits"] == 8 and o["act_bits"] == 8
                            for o in doc["chosen_overrides"])
    assert all(doc["layers"][n] == ("8 bit" if n in promoted else "uniform") for n in LAYERS)
    assert not any(p["float"] for p in check["layer_precision"].values())
    for n in LAYERS:
        assert check["layer_precision"][n]["weight_bits"] == (8 if n in promoted or n in at_8 else 4)
    w8, w4 = get_target("x86").weight_range(8), get_target("x86").weight_range(4)
    for n in LAYERS:
        info = check["weights"][f"{n}.weight"]
        assert (info["qmin"], info["qmax"]) == (w8 if n in promoted or n in at_8 else w4), n
    return promoted


def test_max_drop_promotes_to_8_bits_until_met_on_training_samples(capsys, tmp_path, fragile_weights):
    out = tmp_path / "run"
    _compress(capsys, out, "--weights", fragile_weights, "--recipe", "ptq-int8", *W4A4, *TOLERANCE)
    doc = _decision(out)
    acc = doc["accuracy"]
    assert acc["fp32"] > 0.9
    assert acc["fp32"] - acc["steps"][0]["accuracy"] > 0.5  # uniform W4A4: broken
    assert acc["met"] and acc["fp32"] - acc["accuracy"] <= 0.1 and acc["onnxruntime"]["drop"] <= 0.1
    assert [s["promoted"] for s in acc["steps"][1:]] == [o["match"] for o in doc["chosen_overrides"]]
    assert doc["chosen_overrides"][0]["match"] == "conv2"  # the one layer that breaks is the first promoted
    assert "after_training" not in doc  # ptq does not train
    _assert_after_export(out, doc)
    check = _check(out / "export" / "model_compressed.onnx")
    _assert_promoted_to_8_bits(doc, check)
    assert "latency" in doc and "slow_layers" not in doc  # keep_slow_float off: nothing timed
    # the samples: training-split indices outside the calibration set, recorded by count and sha256
    data = load_data("digits")
    manifest = json.loads((out / "calibration" / "stage0.json").read_text())
    idx = mixed_precision.eval_indices(len(data.train), 400, 0, manifest)
    assert acc["eval_samples"] == len(idx) == 400 and acc["split"] == "train"
    assert acc["indices_sha256"] == indices_sha256(idx)
    assert not set(idx) & set(manifest["indices"]) and max(idx) < len(data.train)
    from edgec.runs import rebuild_model

    fp32 = rebuild_model(out, "input")
    xs = torch.stack([data.train[i][0] for i in idx])
    ys = torch.as_tensor([int(data.train[i][1]) for i in idx])
    with torch.no_grad():
        assert int((fp32(xs).argmax(1) == ys).sum()) / len(ys) == pytest.approx(acc["fp32"], abs=1e-12)
    # the same model without max_drop stays broken
    plain = tmp_path / "plain"
    _compress(capsys, plain, "--weights", fragile_weights, "--recipe", "ptq-int8", *W4A4,
              "--set", "stages.0.precision.keep_slow_float=false", "--no-export")
    assert not (plain / "stages" / "stage0.precision.json").exists()
    q = rebuild_model(plain, "final")
    with torch.no_grad():
        assert float((q(xs).argmax(1) == ys).float().mean()) < acc["fp32"] - 0.5


def test_pqk_promotes_to_8_bits_never_float(capsys, tmp_path, fragile_weights, refuse):
    refuse(bench=False, latency=False)  # pqk cannot keep layers float: nothing is profiled for speed
    out = tmp_path / "run"
    _compress(capsys, out, "--weights", fragile_weights, "--recipe", "pqk", *W4A4,
              "--set", "stages.0.precision.max_drop=0.1", "--set", "stages.0.precision.eval_samples=400",
              "--set", "stages.0.epochs=0", "--set", "stages.0.kd_epochs=0", "--set", "stages.0.target_sparsity=0.0",
              "--set", "stages.0.weight_quantizer=minmax", "--set", "stages.0.act_quantizer=ema")
    doc = _decision(out)
    assert "cannot keep layers float" in doc["latency"] and doc["accuracy"]["met"]
    _assert_promoted_to_8_bits(doc, _check(out / "export" / "model_compressed.onnx"))


def test_qkd_promotes_the_broken_middle_layer(capsys, tmp_path, fragile_weights):
    """qkd (W4A4, first/last layer at 8 bits by default): conv2 is promoted to 8 bits, conv3 stays at 4."""
    out = tmp_path / "run"
    _compress(capsys, out, "--weights", fragile_weights, "--recipe", "qkd", *TOLERANCE, "--set", "stages.0.epochs=1",
              "--set", "stages.0.max_train_samples=128", "--set", "stages.0.calibration_samples=256",
              "--set", "stages.0.weight_quantizer=minmax", "--set", "stages.0.act_quantizer=ema")
    doc = _decision(out)
    assert doc["accuracy"]["met"] and doc["chosen_overrides"][0]["match"] == "conv2"
    assert doc["accuracy"]["judged_on"] == "qat_probe"
    assert {p["samples"] for p in doc["accuracy"]["probes"]} == {32}  # 0.25 x 1 epoch x 128
    promoted = _assert_promoted_to_8_bits(doc, _check(out / "export" / "model_compressed.onnx"), at_8=("conv1", "fc"))
    assert "conv3" not in promoted
    _assert_after_training(out, doc)
    _assert_after_export(out, doc)


def _samples(out, doc: dict):
    data = load_data("digits")
    manifest = json.loads((out / "calibration" / "stage0.json").read_text())
    idx = mixed_precision.eval_indices(len(data.train), doc["accuracy"]["eval_samples"], 0, manifest)
    assert indices_sha256(idx) == doc["accuracy"]["indices_sha256"]
    return (torch.stack([data.train[i][0] for i in idx]), torch.as_tensor([int(data.train[i][1]) for i in idx]))


def _assert_after_export(out, doc: dict) -> None:
    """The decision's ``after_export``: the exported file's top-1 in ONNX Runtime on the decision's samples."""
    import onnxruntime as ort

    xs, ys = _samples(out, doc)
    sess = ort.InferenceSession(str(out / "export" / "model_compressed.onnx"), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})[0].argmax(1)
    acc = float((pred == ys.numpy()).mean())
    after = doc["after_export"]
    assert after["accuracy"] == pytest.approx(acc, abs=1e-12) and after["artifact"] == "model_compressed.onnx"
    assert after["met"] == (doc["accuracy"]["fp32"] - acc <= doc["policy"]["max_drop"])
    assert "The exported artifact in ONNX Runtime: top-1" in (out / "report.md").read_text()


def _assert_after_training(out, doc: dict) -> None:
    """The decision's ``after_training``: the trained graph's top-1 on the decision's own samples."""
    from edgec.runs import rebuild_model

    xs, ys = _samples(out, doc)
    q = rebuild_model(out, "final")
    with torch.no_grad():
        acc = int((q(xs).argmax(1) == ys).sum()) / len(ys)
    after = doc["after_training"]
    assert after["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert after["met"] == (doc["accuracy"]["fp32"] - acc <= doc["policy"]["max_drop"])


def test_qat_probes_nothing_when_the_calibrated_graph_meets_max_drop(capsys, tmp_path, weights, monkeypatch):
    import edgec.stages.base

    def no_training(*a, **k):
        raise AssertionError("a probe trained although the calibrated graph met max_drop")

    real = edgec.stages.base.train_stage
    monkeypatch.setattr("edgec.stages.qat.train_stage", lambda m, cfg, ctx, **k: (
        no_training() if k.get("desc") == "precision probe" else real(m, cfg, ctx, **k)))
    out = tmp_path / "run"
    _compress(capsys, out, "--weights", weights, "--recipe", "qat-int8", *TOLERANCE[:2],
              "--set", "stages.0.precision.max_drop=0.05", "--set", "stages.0.precision.eval_samples=300",
              "--set", "stages.0.epochs=1", "--set", "stages.0.max_train_samples=128", "--no-export")
    doc = _decision(out)
    assert doc["accuracy"]["judged_on"] == "calibrated" and doc["accuracy"]["probes"] == []
    assert doc["accuracy"]["met"] and doc["chosen_overrides"] == []
    _assert_after_training(out, doc)


def test_qat_judges_max_drop_after_qat_probes_not_on_the_untrained_graph(capsys, tmp_path, trained):
    """W3A3 QAT: judged on the calibrated, untrained graph (probe 0) every decision is pessimistic; with probes
    the fewest promotions (in the layers' sensitivity order) whose probe-trained graph meets max_drop are
    chosen by a binary search, and the trained result is checked after the stage's training."""
    w = save_weights(trained, tmp_path / "fp32.pt")
    base = ["--weights", w, "--recipe", "qat-int8", "--set", "stages.0.weight_bits=3", "--set", "stages.0.act_bits=3",
            "--set", "stages.0.calibration_samples=256", *TOLERANCE[:2], "--set", "stages.0.precision.max_drop=0.02",
            "--set", "stages.0.precision.eval_samples=300", "--set", "stages.0.epochs=2",
            "--set", "stages.0.max_train_samples=600", "--set", "stages.0.lr=0.01", "--no-export"]
    _compress(capsys, tmp_path / "untrained", *base, "--set", "stages.0.precision.probe=0")
    assert _decision(tmp_path / "untrained")["accuracy"]["judged_on"] == "calibrated"
    _compress(capsys, tmp_path / "probe", *base)
    doc = _decision(tmp_path / "probe")
    acc = doc["accuracy"]
    assert acc["judged_on"] == "qat_probe" and "onnxruntime" not in acc  # a probe is not what gets exported
    assert sorted(acc["order"]) == sorted(LAYERS) and set(acc["sensitivity"]) == set(LAYERS)
    tried = {len(p["promoted"]): p for p in acc["probes"]}
    assert all(p["samples"] == 300 and p["promoted"] == acc["order"][:k] for k, p in tried.items())  # 0.25 x 2 x 600
    assert tried[0]["accuracy"] > acc["calibrated_uniform"]  # the probe trained the uniform W3A3 graph
    promoted = [o["match"] for o in doc["chosen_overrides"]]
    k = len(promoted)
    assert promoted == acc["order"][:k] and acc["met"] == tried[k]["met"]
    assert k == 0 or not tried[k - 1]["met"]  # the fewest: one promotion less was probed and missed
    assert acc["met"] or k == len(LAYERS)
    _assert_after_training(tmp_path / "probe", doc)


# ------------------------------------------------------------------------------------- resume


def _final(out) -> dict:
    return torch.load(out / "model_final.pt", weights_only=True)["model"]


def test_resume_replays_the_decision_of_the_interrupted_stage(capsys, tmp_path, very_fragile_weights, refuse):
    """A W8A8 qat stage interrupted after its prepare (decision written: conv2 float for max_drop) resumes
    with the recorded precision: nothing is measured again, the checkpoint loads into that structure
    (float conv2: other parameters than a quantized one), and the result equals the uninterrupted run."""
    from edgec.quant.precision import layer_precision
    from edgec.runs import rebuild_model

    out = tmp_path / "run"
    args = ["--weights", very_fragile_weights, "--recipe", "qat-int8", *TOLERANCE[:4],
            "--set", "stages.0.precision.eval_samples=300", "--set", "stages.0.epochs=1",
            "--set", "stages.0.max_train_samples=256", "--set", "stages.0.weight_quantizer=minmax",
            "--set", "stages.0.act_quantizer=ema", "--no-export"]
    _compress(capsys, out, *args)
    decision = (out / "stages" / "stage0.precision.json").read_bytes()
    doc = json.loads(decision)
    assert doc["accuracy"]["met"] and doc["layers"]["conv2"] == "float"
    final = _final(out)
    refuse()
    for keep_checkpoint in (True, False):  # interrupted after training's checkpoint / right after prepare
        (out / "state.json").write_text(json.dumps({"completed": 0}))
        (out / "model_final.pt").unlink()
        (out / "stages" / "stage0.pt").unlink()
        if not keep_checkpoint:
            for p in (out / "checkpoints").glob("stage0*"):
                p.unlink()
        res = run_cli(capsys, "compress", "--model", "digits_cnn", "--data", "digits", "--out", out, *QUICK, *args,
                      "--resume")
        assert res.code == 0, res.err
        assert (out / "stages" / "stage0.precision.json").read_bytes() == decision
        again = _final(out)
        assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
    lp = layer_precision(rebuild_model(out, "final"))
    for n in LAYERS:
        want = doc["layers"][n]
        assert lp[n]["float"] == (want == "float")
        if want != "float":
            assert lp[n]["weight_bits"] == 8


# ------------------------------------------------------------------------------------- sensitivity


def test_sensitivity_int8_vs_float_time_from_the_profile(capsys, tmp_path, trained, weights):
    from edgec.sensitivity import analyze_model

    data = load_data("digits")
    res = analyze_model(trained, data, samples=100, calibration_samples=64, layers="conv[23]", profile=True)
    assert [r.layer for r in res.rows] == ["conv2", "conv3"] and res.measured_in == "pytorch simulation"
    for r in res.rows:  # a time ratio: positive and finite, whichever side is faster on this CPU
        assert isinstance(r.int8_vs_float_time, float) and 0 < r.int8_vs_float_time < 1e3
    plain = analyze_model(trained, data, samples=100, calibration_samples=64, layers="conv2")
    assert plain.rows[0].int8_vs_float_time is None  # neither --ort nor --profile: nothing timed
    res = run_cli(capsys, "analyze", "--model", "digits_cnn", "--weights", weights, "--data", "digits",
                  "--samples", 100, "--calibration-samples", 64, "--layers", "fc", "--profile", "--out", tmp_path / "an")
    assert res.code == 0, res.err
    row = json.loads((tmp_path / "an" / "sensitivity.json").read_text())["rows"][0]
    assert row["layer"] == "fc" and row["int8_vs_float_time"] > 0


def test_max_drop_without_samples_outside_the_calibration_set_is_refused(capsys, tmp_path, weights):
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--data", "digits", "--out", tmp_path / "run",
                  "--weights", weights, "--recipe", "ptq-int8", *QUICK, *TOLERANCE,
                  "--set", "stages.0.calibration_samples=1437", "--no-export")
    assert res.code == 2 and "outside the calibration set" in res.err and "calibration_samples" in res.err
    assert not (tmp_path / "run" / "stages" / "stage0.precision.json").exists()


def test_a_slower_layer_goes_to_8_bits_in_a_stage_below_8_and_float_at_8():
    from edgec.quant.precision import resolve_precision
    from edgec.quant.prepare import QuantSpec

    w4 = QuantSpec(weight_bits=4, act_bits=4, first_layer_bits=8, last_layer_bits=8)
    at = resolve_precision(LAYERS, w4)
    o = mixed_precision.speed_override("conv2", w4, at)
    assert not o.keep_float and (o.weight_bits, o.act_bits) == (8, 8) and o.match == "conv2"
    # conv1 has 8-bit weights but 4-bit outputs: 8 bits; conv1 at W8A8 by an override: float
    assert not mixed_precision.speed_override("conv1", w4, at).keep_float
    from edgec.quant.precision import LayerOverride

    w4o = QuantSpec(weight_bits=4, act_bits=4, layers=(LayerOverride("conv1", weight_bits=8, act_bits=8),))
    assert mixed_precision.speed_override("conv1", w4o, resolve_precision(LAYERS, w4o)).keep_float
    w8 = QuantSpec(weight_bits=8, act_bits=8)
    assert mixed_precision.speed_override("conv2", w8, resolve_precision(LAYERS, w8)).keep_float
    w8a4 = QuantSpec(weight_bits=8, act_bits=4)  # below 8 bits in its activations: still for size
    assert not mixed_precision.speed_override("conv2", w8a4, resolve_precision(LAYERS, w8a4)).keep_float

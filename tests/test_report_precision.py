"""The run report's latency at every batch (issue 13 item 3) and its precision section (issue 14 item 4)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cli_util import run_cli
from edgec.bench.run_latency import _scaled, batch_speedups, latency_batches
from edgec.report import render_markdown, write_report
from edgec.report_sections import exported_precision, precision_report, render_precision


def _per(p50: float, s: float, lo: float, hi: float) -> dict:
    return {"p50_ms": p50, "p90_ms": p50 * 1.1, "speedup_vs_fp32": s, "speedup_spread": [lo, hi],
            "latency_method": "interleaved: 5 rounds x 100 calls per model"}


ROWS = [
    {"name": "fp32 input", "format": "onnx-fp32", "bits": "fp32", "accuracy": 0.95, "batch": 1,
     "latency_p50_ms": 0.5, "speedup_vs_fp32": 1.0, "speedup_spread": [1.0, 1.0], "latency_method": "m1",
     "latency_by_batch": {"1": _per(0.5, 1.0, 1.0, 1.0), "32": _per(8.0, 1.0, 1.0, 1.0)},
     "file_bytes": 4096, "weight_bytes_deployed": 4000, "macs": 1_789_000, "params": 56_330,
     "peak_activation_bytes": 24_576, "sparsity": 0.0, "params_nonzero": 56_234},
    {"name": "ptq-int8", "format": "onnx-int8", "bits": "w8a8", "accuracy": 0.94, "batch": 1,
     "latency_p50_ms": 0.4, "speedup_vs_fp32": 1.25, "speedup_spread": [1.2, 1.3], "latency_method": "m1",
     "latency_by_batch": {"1": _per(0.4, 1.25, 1.2, 1.3), "32": _per(3.2, 2.5, 2.4, 2.6)},
     "file_bytes": 1024, "weight_bytes_deployed": 1000, "macs": 1_789_000, "params": 56_394,
     "peak_activation_bytes": 10_240, "sparsity": 0.0, "params_nonzero": 55_040},
    # a device row (no local per-batch timing): at its own batch, with its own speed-up
    {"name": "ptq-int8 @ pi", "format": "onnx-int8", "bits": "w8a8", "accuracy": 0.94, "batch": 1,
     "latency_p50_ms": 2.0, "speedup_vs_fp32": 1.7, "device": "pi (aarch64)"},
]


def _line(md: str, name: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_render_markdown_shows_p50_and_speedup_at_both_batches():
    md = render_markdown(ROWS, title="t", created="now")
    head = _line(md, "name")
    i1, i32 = head.index("p50 ms (batch 1)"), head.index("p50 ms (batch 32)")
    assert head[i1 + 1] == "speed-up vs first (batch 1)" and head[i32 + 1] == "speed-up vs first (batch 32)"
    assert {"MMACs/item", "params"} <= set(head)
    fp32, q, dev = _line(md, "fp32 input"), _line(md, "ptq-int8"), _line(md, "ptq-int8 @ pi")
    assert len(fp32) == len(q) == len(dev) == len(head)
    assert (q[i1], q[i1 + 1]) == ("0.400", "1.25× (1.20–1.30)")
    assert (q[i32], q[i32 + 1]) == ("3.200", "2.50× (2.40–2.60)")
    assert (fp32[i32], fp32[i32 + 1]) == ("8.000", "1.00×")
    assert (dev[i1], dev[i1 + 1]) == ("2.000", "1.70×") and (dev[i32], dev[i32 + 1]) == ("—", "—")
    assert q[head.index("MMACs/item")] == "1.789" and q[head.index("params")] == "56,394"
    assert "batch 1: m1" not in md and "batch 32: interleaved: 5 rounds x 100 calls" in md
    assert "headline batch, `speedup_vs_fp32` in report.json: batch 1" in md
    # rows timed at one batch only keep the single pair of columns
    single = [{k: v for k, v in r.items() if k != "latency_by_batch"} for r in ROWS[:2]]
    head1 = _line(render_markdown(single, title="t", created="now"), "name")
    assert "p50 ms (batch 1)" in head1 and "speed-up vs first" in head1 and "p50 ms (batch 32)" not in head1


def test_latency_batches_and_summary():
    assert latency_batches(SimpleNamespace(batch=1, batches=[1, 32])) == [1, 32]
    assert latency_batches(SimpleNamespace(batch=32, batches=[1, 32])) == [32, 1]  # bench.batch first
    assert latency_batches(SimpleNamespace(batch=4, batches=[])) == [4]
    assert _scaled(100, 1, 32, 20) == 20 and _scaled(100, 32, 1, 20) == 100 and _scaled(3, 1, 32, 20) == 3
    assert batch_speedups(ROWS[1]) == "x1.25 at batch 1 (x1.20-x1.30), x2.50 at batch 32 (x2.40-x2.60)"


DECISION = {
    "schema": "edgec.precision/1", "policy": {"keep_slow_float": True, "max_drop": 0.01}, "user_fixed": ["head"],
    "latency": "measured on this host (x86_64)", "bench": {"batch": 1, "threads": 1},
    "slow_layers": [{"layer": "stem", "fp32_us": 10.0, "int8_us": 18.0, "slower_share": 0.98}],
    "uniform_speedup": 0.82, "chosen_speedup": 1.07,
    "chosen_overrides": [
        {"match": "stem", "keep_float": True, "weight_bits": None, "act_bits": None,
         "reason": "int8 18.0 us > float 10.0 us"},
        {"match": "block.conv", "keep_float": False, "weight_bits": 8, "act_bits": 8, "reason": "accuracy tolerance"}],
    "layers": {"stem": "float", "block.conv": "8 bit", "block.dw": "uniform", "head": "user"},
    "accuracy": {"fp32": 0.93, "eval_samples": 500, "data": "training samples outside the calibration set",
                 "steps": [{"promoted": None, "accuracy": 0.90, "agreement": 0.92},
                           {"promoted": "block.conv", "accuracy": 0.925, "agreement": 0.97}],
                 "met": True, "accuracy": 0.925, "agreement": 0.97},
}
EXPORTED = {"stem": {"float": True}, "block.conv": {"float": False, "weight_bits": 8, "input_bits": 8, "output_bits": 8},
            "block.dw": {"float": False, "weight_bits": 4, "input_bits": 4, "output_bits": 8}, "head": {"float": True}}


def _run_dir(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "export").mkdir()
    (tmp_path / "stages" / "stage1.precision.json").write_text(json.dumps(DECISION))
    (tmp_path / "stages" / "stage1.pt").write_bytes(b"")  # other stage files are not decisions
    (tmp_path / "export" / "model_compressed.check.json").write_text(json.dumps({"layer_precision": EXPORTED}))
    return tmp_path


def test_precision_section_from_a_hand_written_decision(tmp_path):
    from edgec.recipe import load_recipe

    recipe = load_recipe("prune-qat-int8")
    prec = precision_report(_run_dir(tmp_path), recipe)
    assert [(s["stage"], s["method"], s["file"]) for s in prec["stages"]] == [(1, "qat", "stages/stage1.precision.json")]
    assert prec["exported"] == EXPORTED
    md = "\n".join(render_precision(prec))
    assert md.startswith("## Precision") and "Stage 1 (qat)" in md and "timed at batch 1, 1 thread(s)" in md
    assert "| speed-up vs FP32 (the stage's measurement) | 0.82× | 1.07× |" in md
    assert "| layers not at the stage's uniform precision | 0 | 3 of 4 |" in md
    assert "| stem | float | float | int8 18.0 us > float 10.0 us | 18.0 | 10.0 |" in md
    assert "| block.conv | 8 bit | w8 a8 | accuracy tolerance | — | — |" in md
    assert "| head | user | float | the recipe's `layers:` override | — | — |" in md
    assert "At the stage's uniform precision: block.dw (w4 a4 (out 8))." in md
    assert "max_drop 0.01" in md and "FP32 top-1 93.00 %; met." in md
    assert "| 1 | block.conv | 92.50 | 97.00 |" in md and "| 0 | none (after the speed step) | 90.00 | 92.00 |" in md

    paths = write_report(tmp_path, ROWS[:2], title="t", precision=prec)  # report.json carries the decision
    doc = json.loads(paths["json"].read_text())
    assert doc["precision"]["stages"][0]["chosen_speedup"] == 1.07
    assert doc["precision"]["stages"][0]["layers"] == DECISION["layers"]
    assert "## Precision" in paths["md"].read_text()


def test_precision_section_edge_cases(tmp_path):
    assert precision_report(tmp_path) is None and render_precision(None) == []
    assert "## Precision" not in render_markdown(ROWS, title="t", created="now")
    not_measured = {**DECISION, "latency": "target arm64 is not this host (x86_64): latency not measured"}
    for k in ("uniform_speedup", "chosen_speedup", "slow_layers", "accuracy", "bench"):
        not_measured.pop(k)
    md = "\n".join(render_precision({"stages": [{"stage": 0, "method": None, "file": "f", **not_measured}],
                                     "exported": {}}))
    assert "target arm64 is not this host" in md and "| speed-up vs FP32 (the stage's measurement) | — | — |" in md
    assert "Accuracy tolerance" not in md
    # a quantized export without a decision file: the exported precision alone
    md = "\n".join(render_precision({"stages": [], "exported": EXPORTED}))
    assert "No measured precision decision" in md and "stem, head (float)" in md
    assert exported_precision({"float": False, "weight_bits": 8, "input_bits": None, "output_bits": None}) == "w8 a—"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return tmp_path_factory.mktemp("report2") / "run"


def test_compress_digits_report_has_both_batches_and_the_precision_section(digits_run, capsys):
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--data", "digits", "--recipe", "ptq-int8",
                  "--out", digits_run, "--device", "cpu", "--set", "bench.runs=30", "--set", "bench.rounds=2")
    assert res.code == 0, res.err
    out = " ".join(res.out.split())  # rich wraps long lines
    assert "at batch 1 (x" in out and "at batch 32 (x" in out  # the summary names both speed-ups
    doc = json.loads((digits_run / "report.json").read_text())
    fp32, q = doc["rows"]
    for r in (fp32, q):
        assert set(r["latency_by_batch"]) == {"1", "32"}
        assert r["latency_p50_ms"] == r["latency_by_batch"]["1"]["p50_ms"]  # the headline batch: bench.batch
        assert r["latency_by_batch"]["32"]["p50_ms"] > r["latency_by_batch"]["1"]["p50_ms"]  # 32 samples > 1
    assert q["speedup_vs_fp32"] == q["latency_by_batch"]["1"]["speedup_vs_fp32"]
    assert q["latency_by_batch"]["32"]["runs"] == 20 and q["latency_by_batch"]["1"]["runs"] == 30
    md = (digits_run / "report.md").read_text()
    head = _line(md, "name")
    assert "p50 ms (batch 1)" in head and "speed-up vs first (batch 32)" in head
    b32 = _line(md, "ptq-int8")[head.index("speed-up vs first (batch 32)")]
    assert b32.startswith(f"{q['latency_by_batch']['32']['speedup_vs_fp32']:.2f}×")
    decision = json.loads((digits_run / "stages" / "stage0.precision.json").read_text())
    assert doc["precision"]["stages"][0]["layers"] == decision["layers"]
    assert doc["precision"]["exported"] == json.loads(
        (digits_run / "export" / "model_compressed.check.json").read_text())["layer_precision"]
    section = md[md.index("## Precision"):]
    assert "Stage 0 (ptq), decision in `stages/stage0.precision.json`" in section
    assert f"| {decision['uniform_speedup']:.2f}× |" in section
    for name, choice in decision["layers"].items():
        if choice != "uniform":
            assert f"| {name} | {choice} |" in section


def test_precision_section_of_a_decision_judged_after_qat_probes(tmp_path):
    probed = {**DECISION, "accuracy": {
        "fp32": 0.93, "eval_samples": 500, "data": "training samples outside the calibration set", "met": True,
        "judged_on": "qat_probe", "probe_share": 0.25, "calibrated_uniform": 0.41, "order": ["block.conv", "block.dw"],
        "probes": [{"promoted": [], "accuracy": 0.90, "met": False}, {"promoted": ["block.conv"], "accuracy": 0.925, "met": True}],
        "steps": [{"promoted": None}, {"promoted": "block.conv"}], "accuracy": 0.925},
        "after_training": {"accuracy": 0.915, "drop": 0.015, "met": False},
        "after_export": {"accuracy": 0.925, "drop": 0.005, "met": True}}
    md = "\n".join(render_precision({"stages": [{"stage": 1, "method": "qat", "file": "f", **probed}],
                                     "exported": EXPORTED}))
    assert "Judged after short QAT probes (0.25 of the stage's training samples each; uniform calibrated, " \
           "untrained: 41.00 %)" in md
    assert "| 0 | none | 90.00 | no |" in md and "| 1 | block.conv | 92.50 | yes |" in md
    assert "After the stage's training: top-1 91.50 % on the same samples, drop 1.50 pt: ABOVE max_drop." in md
    assert "The exported artifact in ONNX Runtime: top-1 92.50 % on the same samples, drop 0.50 pt: within" in md
    assert "agreement with FP32" not in md  # the calibrated steps table is for the untrained judgement only

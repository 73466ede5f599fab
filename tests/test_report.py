"""write_report(): report.json + report.md + pareto.png, atomically."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgec.report import write_report

ROWS = [
    {"name": "baseline", "format": "pytorch-fp32", "bits": "fp32", "accuracy": 0.912,
     "latency_p50_ms": 4.0, "file_bytes": 1_100_000, "weight_bytes_deployed": 1_080_000,
     "sparsity": 0.0, "params_nonzero": 270_000},
    {"name": "onnx-fp32", "format": "onnx-fp32", "bits": "fp32", "accuracy": 0.912,
     "latency_p50_ms": 1.25, "file_bytes": 1_090_000, "weight_bytes_deployed": 1_080_000,
     "sparsity": 0.0, "params_nonzero": 270_000},
    {"name": "qat-w8a8", "format": "onnx-int8", "bits": "w8a8", "accuracy": 0.905,
     "latency_p50_ms": 0.8, "file_bytes": 300_000, "weight_bytes_deployed": 270_000,
     "sparsity": 0.0, "params_nonzero": 270_000},
    {"name": "prune50-w4a8", "format": "onnx-int8", "bits": "w4a8", "accuracy": 0.889,
     "latency_p50_ms": 0.78, "file_bytes": 300_000, "weight_bytes_deployed": 67_500,
     "sparsity": 0.5, "params_nonzero": 135_000},
    {"name": "not-benched", "format": "onnx-int8", "bits": "w8a8", "accuracy": None,
     "latency_p50_ms": None, "file_bytes": 300_000, "weight_bytes_deployed": 270_000,
     "sparsity": 0.0, "params_nonzero": 270_000},
]


def test_write_report_three_files(tmp_path):
    run_dir = tmp_path / "run" / "report"  # created if missing
    paths = write_report(run_dir, ROWS, title="ResNet-20 / CIFAR-10")
    assert set(paths) == {"json", "md", "png"}
    for p in paths.values():
        assert p.is_file() and p.parent == run_dir and p.stat().st_size > 0
    assert [p.name for p in sorted(run_dir.iterdir())] == ["pareto.png", "report.json", "report.md"]

    doc = json.loads(paths["json"].read_text())
    assert doc["title"] == "ResNet-20 / CIFAR-10"
    assert doc["rows"] == ROWS
    assert doc["created"]

    md = paths["md"].read_text()
    for row in ROWS:
        assert row["name"] in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + len(ROWS)  # header + rows
    base = next(ln for ln in lines if ln.startswith("| baseline "))
    assert "91.20" in base and "1.00×" in base
    onnx_row = next(ln for ln in lines if ln.startswith("| onnx-fp32 "))
    assert "3.20×" in onnx_row  # 4.0 / 1.25
    pruned = next(ln for ln in lines if ln.startswith("| prune50-w4a8 "))
    assert "50.0" in pruned and "65.92" in pruned and "135,000" in pruned  # 67500 B = 65.92 KB
    missing = next(ln for ln in lines if ln.startswith("| not-benched "))
    assert missing.count("—") == 3  # accuracy, latency, speed-up

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_overwrites_and_handles_odd_values(tmp_path):
    write_report(tmp_path, ROWS[:1], title="first")
    rows = [{"name": "a|b", "format": "onnx-fp32", "bits": "fp32", "accuracy": np.float32(0.5),
             "latency_p50_ms": float("nan"), "file_bytes": np.int64(2048),
             "weight_bytes_deployed": None, "sparsity": None, "params_nonzero": None}]
    paths = write_report(tmp_path, rows, title="second")
    doc = json.loads(paths["json"].read_text())
    assert doc["title"] == "second"
    assert doc["rows"][0]["accuracy"] == pytest.approx(0.5)
    assert doc["rows"][0]["latency_p50_ms"] is None  # NaN is not JSON
    assert doc["rows"][0]["file_bytes"] == 2048
    assert "a\\|b" in paths["md"].read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_report_empty_rows(tmp_path):
    paths = write_report(tmp_path, [], title="nothing yet")
    assert json.loads(paths["json"].read_text())["rows"] == []
    assert paths["png"].is_file()

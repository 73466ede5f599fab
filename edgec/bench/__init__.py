"""Measure exported artifacts: latency and accuracy in their runtime, honest size, robustness.

* :mod:`edgec.bench.latency` -- one ONNX model: latency (isolated runner process), peak memory, accuracy;
* :mod:`edgec.bench.compare` -- several artifacts' latency in one interleaved run (speed-ups);
* size: :func:`edgec.export.size.onnx_weight_stats` (re-exported here; the exporter checks it too);
* :mod:`edgec.bench.ensemble` -- EED's dynamic ensemble (sub-models per input, dynamic vs all K);
* :mod:`edgec.bench.robustness` -- PGD robust accuracy of exported artifacts.
"""
from __future__ import annotations

from edgec.bench.latency import bench, print_bench_table
from edgec.export.size import onnx_weight_stats

__all__ = ["bench", "onnx_weight_stats", "print_bench_table"]

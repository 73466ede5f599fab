"""Self-checks of an exported ONNX model: validity, parity with PyTorch, integer-kernel fusion."""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger",
               "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
               "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu")
_COMPUTE = ("Conv", "Gemm", "MatMul")
_FUSED_COMPUTE = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat")


@dataclass
class ParityReport:
    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    checker_ok: bool  # onnx.checker (full check) passed; checker_error says why not
    compute_nodes: int  # Conv/Gemm/MatMul in the exported graph
    fused_compute: int  # of those, turned into integer kernels by ORT
    integer_ops: dict[str, int]
    float_compute_left: int
    checker_error: str | None = None
    fidelity: dict | None = None  # edgec.export.fidelity.FidelityReport.as_dict() when an FP32 model was given

    def as_dict(self) -> dict:
        return asdict(self)


def fused_ops(path: Path, *, threads: int = 1) -> tuple[int, dict[str, int], int]:
    """(compute nodes in the file, integer op counts after ORT optimization, float compute left)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    compute = sum(n.op_type in _COMPUTE for n in model.graph.node)
    fd, opt_path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = opt_path
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(opt_path).graph.node)
    finally:
        os.unlink(opt_path)
    integer = {k: v for k, v in ops.items() if k in INTEGER_OPS}
    float_left = sum(v for k, v in ops.items() if k in _COMPUTE or k == "FusedConv")
    return compute, integer, float_left


@torch.no_grad()
def check_export(model: nn.Module, path: Path, x: np.ndarray, *, batch_size: int = 256,
                 fp32: nn.Module | Path | None = None) -> ParityReport:
    """Compare PyTorch (eval mode) and ONNX Runtime logits on real samples ``x``.

    Parity compares the artifact with edgec's own simulation ``model``; with ``fp32`` (the user's FP32
    model or its ONNX export) the report also carries the artifact's fidelity to it
    (:func:`edgec.export.fidelity.check_fidelity`: top-1 agreement, output SQNR, KL, per-layer SQNR).

    A file that fails ``onnx.checker`` is still run (ONNX Runtime may load it): ``checker_ok`` is
    False and ``checker_error`` holds the checker's message.
    """
    import onnx

    from edgec.runtime import load_session, predict

    checker_error = None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError / InferenceError
        checker_error = f"{type(exc).__name__}: {exc}"
    model = model.eval().cpu()
    ref = np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).numpy()
                          for i in range(0, len(x), batch_size)])
    sess = load_session(path, threads=1)
    got = predict(sess, x, batch_size=batch_size)
    diff = np.abs(ref - got)
    compute, integer, float_left = fused_ops(path)
    fused = sum(v for k, v in integer.items() if k in _FUSED_COMPUTE)
    fidelity = None
    if fp32 is not None:
        from edgec.export.fidelity import check_fidelity

        fidelity = check_fidelity(fp32, path, x, quant_model=model, batch_size=batch_size).as_dict()
    return ParityReport(samples=len(x), max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                        top1_agreement=float((ref.argmax(1) == got.argmax(1)).mean()),
                        checker_ok=checker_error is None, checker_error=checker_error,
                        compute_nodes=compute, fused_compute=fused, integer_ops=integer,
                        float_compute_left=float_left, fidelity=fidelity)

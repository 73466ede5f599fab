"""TensorRT path: runs only where TensorRT and a GPU exist (never on this project's CPU machines)."""
from __future__ import annotations

import pytest


@pytest.mark.trt
@pytest.mark.gpu
def test_build_engine_from_qdq_onnx(tmp_path):
    import torch

    from edgec.export.onnx_export import export_onnx
    from edgec.export.tensorrt import build_engine
    from edgec.models import create_model
    from edgec.quant.prepare import QuantSpec, calibrate, quantize_model
    from edgec.targets import get_target

    gm, _ = quantize_model(create_model("resnet8").eval(), QuantSpec(act_quantizer="ema"), get_target("tensorrt"))
    calibrate(gm, [(torch.randn(16, 3, 32, 32), None)])
    onnx_path = export_onnx(gm, (3, 32, 32), tmp_path / "m.onnx").path
    engine = build_engine(onnx_path, tmp_path / "m.engine")
    assert engine.stat().st_size > 0


def test_missing_tensorrt_names_the_extra(tmp_path):
    pytest.importorskip("onnx")
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    from edgec.errors import MissingDependency
    from edgec.export.tensorrt import build_engine

    with pytest.raises(MissingDependency, match=r"edgec\[trt\]"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")

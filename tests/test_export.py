"""ONNX export: Q/DQ structure, integer weights, parity with PyTorch, ORT integer-kernel fusion."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgec.data import load_data, to_numpy
from edgec.errors import ExportError
from edgec.export.check import check_export
from edgec.export.onnx_export import export_onnx
from edgec.models import create_model
from edgec.quant.prepare import QuantSpec, calibrate, quantize_model
from edgec.targets import get_target


@pytest.fixture(scope="module")
def digits():
    data = load_data("digits")
    x, y = to_numpy(data.eval)
    cx, _ = to_numpy(data.train, limit=256)
    return x, y, cx


@pytest.fixture(scope="module")
def trained_digits():
    """digits_cnn after 2 epochs (~97%): its top-1 margins are tens of output steps, so a top-1 agreement
    between ORT and the simulation measures the export. A random net's 4-bit logits tie on half the
    samples (median margin 1 step), where one rounding step on another CPU flips the argmax."""
    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit

    torch.manual_seed(0)
    data = load_data("digits")
    model = create_model("digits_cnn")
    fit(model, loss_fn=lambda m, x, y: (torch.nn.functional.cross_entropy(z := m(x), y), z), train_set=data.train,
        eval_set=None, cfg=TrainConfig(epochs=2, batch_size=32, lr=0.003, optimizer="adam", weight_decay=0.0),
        ckpt_path=None, dist=DistContext.single("cpu"))
    return model.eval()


def _quantized(spec: QuantSpec, target: str, cx, model=None):
    torch.manual_seed(0)
    gm, _ = quantize_model((model if model is not None else create_model("digits_cnn")).eval(), spec, get_target(target))
    calibrate(gm, [(torch.from_numpy(cx), None)])
    return gm


def _logit_step(gm) -> float:
    """Grid step of the quantized logits (the quantizer the output comes from)."""
    from edgec.quant.modules import ActQuant

    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    while out.op != "call_module":  # through flatten/reshape
        out = out.args[0]
    q = gm.get_submodule(out.target)
    assert isinstance(q, ActQuant)
    return float(q.q.scale().reshape(()))


@pytest.mark.parametrize("target", ["x86", "arm64"])
def test_int8_export_parity_and_fusion(tmp_path, digits, trained_digits, target):
    x, _, cx = digits
    gm = _quantized(QuantSpec(act_quantizer="ema", weight_quantizer="minmax"), target, cx, trained_digits)
    res = export_onnx(gm, (1, 8, 8), tmp_path / "m.onnx")
    model = onnx.load(str(res.path))
    ints = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("weight_quantized")}
    assert len(ints) == 4  # 3 conv + 1 gemm weights stored as int8
    qmax = 63 if target == "x86" else 127
    assert max(int(np.abs(v).max()) for v in ints.values()) <= qmax
    rep = check_export(gm, res.path, x)
    # ORT's integer kernels vs the simulation, in steps of the logits' grid (measured max 1, mean < 0.01)
    step = _logit_step(gm)
    assert rep.max_abs_diff <= 3 * step and rep.mean_abs_diff <= 0.1 * step
    assert rep.top1_agreement >= 0.99
    assert rep.fused_compute == rep.compute_nodes == 4
    assert rep.float_compute_left == 0


def test_low_bit_export_runs_in_int8_container(tmp_path, digits, trained_digits):
    x, _, cx = digits
    gm = _quantized(QuantSpec(weight_bits=4, act_bits=4, act_quantizer="ema", weight_quantizer="minmax"), "x86", cx,
                    trained_digits)
    res = export_onnx(gm, (1, 8, 8), tmp_path / "m4.onnx")
    model = onnx.load(str(res.path))
    assert any(n.op_type == "Clip" for n in model.graph.node)  # 4-bit activations clipped in the u8 container
    ints = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("weight_quantized")]
    assert max(int(np.abs(v).max()) for v in ints) <= 7
    assert all(w["bits"] == 4 for w in res.weight_tensors.values())
    rep = check_export(gm, res.path, x)
    step = _logit_step(gm)  # 4-bit logits: a coarse grid, measured max diff 0 steps
    assert rep.max_abs_diff <= 2 * step and rep.mean_abs_diff <= 0.1 * step
    assert rep.top1_agreement >= 0.97
    # the clip sits between two Q/DQ pairs on the same grid, so ORT still fuses every conv/gemm
    # (a bare Clip between DequantizeLinear and Conv left them all in float)
    assert rep.fused_compute == rep.compute_nodes == 4
    prod = {o: n for n in model.graph.node for o in n.output}
    for clip in (n for n in model.graph.node if n.op_type == "Clip"):
        assert prod[clip.input[0]].op_type == "DequantizeLinear"
        assert all(n.op_type == "QuantizeLinear" for n in model.graph.node if clip.output[0] in n.input)


def test_tensorrt_profile_uses_int8_activations(tmp_path, digits, trained_digits):
    x, _, cx = digits
    gm = _quantized(QuantSpec(act_quantizer="ema", weight_quantizer="minmax"), "tensorrt", cx, trained_digits)
    res = export_onnx(gm, (1, 8, 8), tmp_path / "t.onnx")
    model = onnx.load(str(res.path))
    zps = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant"})
    dtypes = {consts[q.input[2]].dtype for q in zps if len(q.input) > 2 and q.input[2] in consts}
    assert dtypes == {np.dtype("int8")}
    assert all(int(consts[q.input[2]]) == 0 for q in zps if q.input[2] in consts)
    rep = check_export(gm, res.path, x)
    step = _logit_step(gm)  # measured max diff 0 steps
    assert rep.max_abs_diff <= 3 * step and rep.mean_abs_diff <= 0.1 * step and rep.top1_agreement >= 0.99


def test_float_export_and_opset_check(tmp_path, digits):
    x, _, cx = digits
    m = create_model("digits_cnn").eval()
    rep = check_export(m, export_onnx(m, (1, 8, 8), tmp_path / "f.onnx").path, x)
    assert rep.max_abs_diff < 1e-4 and rep.fused_compute == 0
    gm = _quantized(QuantSpec(act_quantizer="ema"), "x86", cx)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(gm, (1, 8, 8), tmp_path / "old.onnx", opset=11)
    assert not (tmp_path / "old.onnx").exists()

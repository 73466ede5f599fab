"""Per-layer precision (`layers:` in quantizing stages): float layers stay float in ORT, the rest fuse;
layers at other bits export on their own grids; the run's export rebuilds the same structure."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cli_util import run_cli
from edgec.data import load_data
from edgec.errors import InputError, RecipeError
from edgec.export.check import check_export
from edgec.export.onnx_export import export_onnx
from edgec.models import create_model, save_weights
from edgec.quant.modules import QUANT_MODULES, ActQuant
from edgec.quant.precision import LayerOverride
from edgec.quant.prepare import QuantSpec, calibrate, quantize_model
from edgec.targets import get_target
from test_export import digits  # noqa: F401  (the same module-scoped fixture: eval x/y + 256 calibration)


def train(name: str, epochs: int = 3):
    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit

    torch.manual_seed(0)
    data = load_data("digits")
    model = create_model(name, num_classes=10, in_channels=1)
    fit(model, loss_fn=lambda m, x, y: (torch.nn.functional.cross_entropy(z := m(x), y), z), train_set=data.train,
        eval_set=None, cfg=TrainConfig(epochs=epochs, batch_size=32, lr=0.003, optimizer="adam", weight_decay=0.0),
        ckpt_path=None, dist=DistContext.single("cpu"))
    return model.eval()


@pytest.fixture(scope="module")
def resnet8():
    """A ResNet-style model (residual adds, 1x1 shortcuts) trained 3 epochs on digits (~97 %)."""
    return train("resnet8")


def _ptq(model, cx, *, target="x86", **spec):
    gm, rep = quantize_model(model, QuantSpec(weight_quantizer="minmax", act_quantizer="minmax", **spec),
                             get_target(target))
    calibrate(gm, [(torch.from_numpy(cx), None)])
    return gm, rep


def _float_weights(path) -> set[str]:
    """Conv/Gemm whose weight is a float initializer in the file (not int8 + DequantizeLinear)."""
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    return {n.input[1] for n in m.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits
            and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT}


@pytest.mark.parametrize("layer", ["layer2.0.conv1", "conv1", "fc"])
def test_float_layer_stays_float_in_ort_and_the_rest_fuses(tmp_path, digits, resnet8, layer):
    x, y, cx = digits
    gm, rep = _ptq(resnet8, cx, layers=(LayerOverride(layer, keep_float=True),))
    assert rep.kept_float == [layer] and layer not in rep.quantized
    assert not isinstance(gm.get_submodule(layer), QUANT_MODULES)
    assert rep.precision[layer] == {"float": True}
    # no quantization point reads the float layer's output directly (an integer neighbour's input point
    # sits after its ReLU only when an integer layer reads it)
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer)
    assert not any(isinstance(gm.get_submodule(u.target), ActQuant) for u in node.users if u.op == "call_module")
    res = export_onnx(gm, (1, 8, 8), tmp_path / "m.onnx")
    assert _float_weights(res.path) == {f"{layer}.weight"}
    assert f"{layer}.weight" not in res.weight_tensors
    rep_ort = check_export(gm, res.path, x)
    assert rep_ort.compute_nodes == 10
    assert rep_ort.float_compute_left == 1  # exactly that layer (ORT did not quantize its float weight itself)
    assert rep_ort.fused_compute == 9
    assert rep_ort.top1_agreement >= 0.99
    with torch.no_grad():
        acc = float((gm(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
        fp32 = float((resnet8(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert acc >= fp32 - 0.03


def test_w4a4_with_one_layer_at_8_bits(tmp_path, digits, resnet8):
    x, _, cx = digits
    name = "layer3.0.conv1"
    gm, rep = _ptq(resnet8, cx, weight_bits=4, act_bits=4,
                   layers=(LayerOverride(name, weight_bits=8, act_bits=8),))
    assert rep.precision[name] == {"float": False, "weight_bits": 8, "input_bits": 8, "output_bits": 8}
    assert rep.precision["layer2.0.conv1"]["weight_bits"] == 4
    res = export_onnx(gm, (1, 8, 8), tmp_path / "m.onnx")
    w8_lo, w8_hi = get_target("x86").weight_range(8)
    w4_lo, w4_hi = get_target("x86").weight_range(4)
    for wname, info in res.weight_tensors.items():
        assert (info["qmin"], info["qmax"]) == ((w8_lo, w8_hi) if wname == f"{name}.weight" else (w4_lo, w4_hi))
    ints = {i.name[: -len("_quantized")]: numpy_helper.to_array(i) for i in onnx.load(str(res.path)).graph.initializer
            if i.name.endswith("weight_quantized")}
    assert int(np.abs(ints[f"{name}.weight"]).max()) > w4_hi  # really on the 8-bit grid
    assert max(int(np.abs(v).max()) for k, v in ints.items() if k != f"{name}.weight") <= w4_hi
    r = check_export(gm, res.path, x)
    assert r.fused_compute == r.compute_nodes == 10
    assert r.top1_agreement >= 0.97


def test_override_wins_over_first_and_last_layer_bits(digits, resnet8):
    _, _, cx = digits
    _, rep = _ptq(resnet8, cx, weight_bits=4, act_bits=4, first_layer_bits=8, last_layer_bits=8,
                  layers=(LayerOverride("fc", weight_bits=6, act_bits=6), LayerOverride("layer1.*", weight_bits=5)))
    p = rep.precision
    assert p["conv1"]["weight_bits"] == 8 and p["conv1"]["input_bits"] == 8  # first_layer_bits still apply
    assert p["fc"] == {"float": False, "weight_bits": 6, "input_bits": 6, "output_bits": 6}
    assert p["layer1.0.conv1"]["weight_bits"] == p["layer1.0.conv2"]["weight_bits"] == 5
    assert p["layer1.0.conv1"]["output_bits"] == 4  # no act_bits given: the stage's
    # the first matching glob decides
    _, rep = _ptq(resnet8, cx, layers=(LayerOverride("layer1.0.conv1", keep_float=True),
                                       LayerOverride("layer1.*", weight_bits=4)))
    assert rep.precision["layer1.0.conv1"] == {"float": True}
    assert rep.precision["layer1.0.conv2"]["weight_bits"] == 4


def test_unknown_glob_names_the_glob_and_the_layers(digits, resnet8):
    with pytest.raises(InputError) as e:
        _ptq(resnet8, digits[2], layers=(LayerOverride("layer9.*", keep_float=True),))
    assert "'layer9.*'" in e.value.message and "layer1.0.conv1" in e.value.message


def test_recipe_schema_of_layers():
    from edgec.recipe import validate_recipe

    base = {"version": 1, "name": "t", "stages": [{"method": "ptq"}]}

    def stage(**kw):
        return validate_recipe({**base, "stages": [{"method": "ptq", **kw}]}, [])

    r = stage(layers={"layer3.*": {"weight_bits": 8, "act_bits": 8}, "fc": "float"})
    assert r.stages[0].layers["fc"] == "float" and r.stages[0].layers["layer3.*"].weight_bits == 8
    for bad in ({"fc": "flaot"}, {"fc": {}}, {"fc": {"weight_bits": 9}}, {"fc": {"bits": 8}}):
        with pytest.raises(RecipeError):
            stage(layers=bad)
    with pytest.raises(RecipeError, match="pqk cannot keep layers float"):
        validate_recipe({**base, "stages": [{"method": "pqk", "target_sparsity": 0.5, "layers": {"fc": "float"}}]}, [])
    r = validate_recipe({**base, "stages": [{"method": "qkd", "layers": {"fc": "float"}}]}, ["stages.0.layers.conv1=float"])
    assert list(r.stages[0].layers) == ["fc", "conv1"]


RECIPE = """\
version: 1
name: ptq-mixed
target: x86
stages:
  - method: ptq
    calibration_samples: 256
    layers:
      conv2: float
      "fc": {weight_bits: 8, act_bits: 8}
    precision: {keep_slow_float: false}   # only the layers named above leave the uniform grid
bench: {runs: 5, warmup: 1}
export: {parity_samples: 200}
"""


@pytest.mark.integration
def test_compress_and_export_rebuild_the_same_structure(tmp_path, capsys):
    weights = save_weights(train("digits_cnn", epochs=2), tmp_path / "fp32.pt")
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--weights", weights, "--data", "digits",
                  "--recipe", recipe, "--out", out, "--device", "cpu")
    assert res.code == 0, res.err
    check = json.loads((out / "export" / "model_compressed.check.json").read_text())
    assert check["layer_precision"]["conv2"] == {"float": True}
    assert check["parity"]["float_compute_left"] == 1 and check["parity"]["fused_compute"] == 3
    from edgec.export.metadata import read_model_metadata

    assert read_model_metadata(out / "export" / "model_compressed.onnx")["layer_precision"] == check["layer_precision"]
    again = tmp_path / "again.onnx"
    res = run_cli(capsys, "export", out, "--out", again)
    assert res.code == 0, res.err
    check2 = json.loads(again.with_suffix(".check.json").read_text())
    assert check2["layer_precision"] == check["layer_precision"]
    assert check2["parity"]["integer_ops"] == check["parity"]["integer_ops"]
    assert check2["parity"]["top1_agreement"] >= 0.99
    # a glob that names no layer is refused before anything runs
    recipe.write_text(RECIPE.replace("conv2: float", "conv9: float"))
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--weights", weights, "--data", "digits",
                  "--recipe", recipe, "--out", tmp_path / "bad", "--device", "cpu")
    assert res.code == 2 and "stages.0.layers" in res.err and "'conv9'" in res.err
    assert not (tmp_path / "bad").exists()

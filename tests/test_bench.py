"""bench(): latency in a runner subprocess, accuracy in-process, honest size from the ONNX file."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec import runtime
from edgec.bench import bench, onnx_weight_stats, print_bench_table
from edgec.errors import BudgetExceeded, InputError

torch = pytest.importorskip("torch")

N_CLASSES = 4


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, N_CLASSES)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():  # prune a few weights so sparsity is visible
        net.conv.weight[0].zero_()
        net.fc.weight[:, 0] = 0.0
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter, on purpose
        torch.onnx.export(
            net, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path, net


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory):
    """int8 W -> DequantizeLinear -> Conv(+fp32 bias) -> Flatten -> Gemm(fp32) -> MatMul(uint8 DQ)."""
    w_q = np.arange(-12, 12, dtype=np.int8).reshape(3, 2, 2, 2)
    w_q[0, 0, 0, :] = 0  # 2 zeros; arange's own 0 at [1, 1, 0, 0] is the 3rd
    w_q[2, 1, 1, 1] = 0  # 4th zero -> 20 of 24 nonzero
    conv_b = np.array([0.5, 0.0, -1.0], np.float32)
    gemm_w = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    gemm_w[0, 0] = gemm_w[2, 3] = 0.0
    gemm_c = np.array([1, 2, 3, 4], np.float32)
    mm_q = np.array([[128, 3], [128, 200], [7, 128], [9, 10]], np.uint8)  # zero point 128
    inits = [
        numpy_helper.from_array(w_q, "W_q"),
        numpy_helper.from_array(np.array(0.05, np.float32), "W_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "W_zp"),
        numpy_helper.from_array(conv_b, "B"),
        numpy_helper.from_array(gemm_w, "G_W"),
        numpy_helper.from_array(gemm_c, "G_C"),
        numpy_helper.from_array(mm_q, "M_Wq"),
        numpy_helper.from_array(np.array(0.01, np.float32), "M_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "M_zp"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zp"], ["W"]),
        helper.make_node("Conv", ["X", "W", "B"], ["C"]),
        helper.make_node("Flatten", ["C"], ["F"]),
        helper.make_node("Gemm", ["F", "G_W", "G_C"], ["G"]),
        helper.make_node("DequantizeLinear", ["M_Wq", "M_scale", "M_zp"], ["M_W"]),
        helper.make_node("MatMul", ["G", "M_W"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2, 2, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # ORT 1.31 refuses the default IR 14
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("qdq") / "qdq.onnx"
    onnx.save(model, str(path))
    return path, w_q


def test_onnx_weight_stats_by_hand(qdq_model):
    path, w_q = qdq_model
    assert int(np.count_nonzero(w_q)) == 20  # 24 positions, zeros at 3 set + arange's own 0
    stats = onnx_weight_stats(path)
    # tensor   total nonzero bits  bytes          any zero -> bitmask bytes
    # W_q        24     20     8   20*8/8 = 20    yes -> ceil(24/8) = 3
    # B           3      2    32   2*4    =  8    yes -> 1
    # G_W        12     10    32   10*4   = 40    yes -> 2
    # G_C         4      4    32   4*4    = 16    no
    # M_Wq        8      5     8   5      =  5    yes (value == zero point 128) -> 1
    assert stats["params_total"] == 51
    assert stats["params_nonzero"] == 41
    assert stats["weight_bytes_deployed"] == 89
    assert stats["sparse_index_bytes"] == 7
    assert stats["bits"] == {"W_q": 8, "B": 32, "G_W": 32, "G_C": 32, "M_Wq": 8}
    assert stats["sparsity"] == pytest.approx(10 / 51)
    assert stats["qparam_bytes"] == 4 + 1 + 4 + 1  # the two scales and zero points
    # and the model is a real one ORT runs
    sess = runtime.load_session(path)
    assert runtime.predict(sess, np.ones((3, 2, 2, 2), np.float32)).shape == (3, 2)


def test_onnx_weight_stats_quantize_clip_dequantize(tmp_path):
    """Unfolded float W -> QuantizeLinear -> Clip (low-bit range) -> DequantizeLinear -> MatMul."""
    w = np.array([[0.004, 0.2, -0.3], [0.0, 0.006, 1.0]], np.float32)
    # scale 0.01, zero point 0 -> q = [[0, 20, -30], [0, 1, 100]]: 4 of 6 nonzero at 8 bits
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.array(0.01, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
        numpy_helper.from_array(np.array(-8, np.int8), "lo"),
        numpy_helper.from_array(np.array(7, np.int8), "hi"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["W", "s", "zp"], ["Wq"]),
        helper.make_node("Clip", ["Wq", "lo", "hi"], ["Wc"]),
        helper.make_node("DequantizeLinear", ["Wc", "s", "zp"], ["Wd"]),
        helper.make_node("MatMul", ["X", "Wd"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes, "qcdq", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path / "qcdq.onnx"
    onnx.save(model, str(path))
    stats = onnx_weight_stats(path)
    assert stats["bits"] == {"W": 8}
    assert (stats["params_total"], stats["params_nonzero"]) == (6, 4)
    assert stats["weight_bytes_deployed"] == 4
    assert stats["sparse_index_bytes"] == 1


def test_onnx_weight_stats_float_export(tiny):
    path, net = tiny
    stats = onnx_weight_stats(path)
    sizes = [p.numel() for p in net.parameters()]
    nonzero = sum(int((p != 0).sum()) for p in net.parameters())
    assert stats["params_total"] == sum(sizes) == 6 * 3 * 9 + 6 + 4 * 6 + 4
    assert stats["params_nonzero"] == nonzero == sum(sizes) - 27 - 4
    assert stats["weight_bytes_deployed"] == 4 * nonzero
    assert set(stats["bits"].values()) == {32}


def test_bench_accuracy_and_keys(tiny):
    path, net = tiny
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(1).numpy()
    y = pred.copy()
    y[::4] = (y[::4] + 1) % N_CLASSES  # 5 of 20 wrong -> 0.75 by hand
    res = bench(path, eval_x=x, eval_y=y, warmup=1, runs=5, batch=2)
    assert res["accuracy"] == pytest.approx(0.75)
    assert res["samples"] == 20
    for key in ("model", "runtime", "provider", "threads", "batch", "latency_ms",
                "throughput_per_s", "peak_rss_mb", "file_bytes", "weight_bytes_deployed",
                "params_nonzero"):
        assert key in res, key
    assert res["runtime"] == "onnxruntime " + ort.__version__
    assert res["provider"] == "CPUExecutionProvider"
    assert res["batch"] == 2 and res["threads"] == 1
    lat = res["latency_ms"]
    assert lat["p50"] <= lat["p90"] <= lat["p99"]
    assert res["peak_rss_mb"] > 1
    assert res["file_bytes"] == path.stat().st_size
    assert res["weight_bytes_deployed"] == onnx_weight_stats(path)["weight_bytes_deployed"]

    console_out = io.StringIO()
    from rich.console import Console

    print_bench_table([res], Console(file=console_out, width=200))
    table = console_out.getvalue()
    assert "tiny.onnx" in table and "75.00" in table


def test_bench_without_data(tiny):
    res = bench(tiny[0], warmup=0, runs=2)
    assert res["accuracy"] is None and res["samples"] == 0


def test_bench_budget_exceeded_attaches_results(tiny):
    with pytest.raises(BudgetExceeded) as info:
        bench(tiny[0], warmup=0, runs=3, budget_ms=1e-6)
    err = info.value
    p50 = err.results["latency_ms"]["p50"]
    assert f"{p50:.4g}" in str(err) and "1e-06" in str(err)
    assert err.results["budget_ms"] == 1e-6
    assert err.exit_code == 5


def test_bench_missing_model_is_clear(tmp_path):
    with pytest.raises(InputError, match="does not exist") as info:
        bench(tmp_path / "missing.onnx")
    assert "missing.onnx" in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        onnx_weight_stats(tmp_path / "missing.onnx")


def test_bench_bad_inputs(tiny):
    with pytest.raises(InputError, match="NoSuchExecutionProvider.*available here: .*CPU"):
        bench(tiny[0], providers=["NoSuchExecutionProvider"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(InputError, match="CUDAExecutionProvider") as info:
            bench(tiny[0], providers=["CUDAExecutionProvider"])
        assert "onnxruntime-gpu" in str(info.value)
    x = np.zeros((3, 3, 8, 8), np.float32)
    with pytest.raises(InputError, match="both eval_x and eval_y"):
        bench(tiny[0], eval_x=x)
    with pytest.raises(InputError, match="3 samples but eval_y has 2"):
        bench(tiny[0], eval_x=x, eval_y=np.array([0, 1]), warmup=0, runs=1)


def test_bench_reports_runner_failure(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError):
        bench(bad, warmup=0, runs=1)

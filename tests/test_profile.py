"""edgec profile: ORT profiler kernels mapped back to the source model's layers, on a real edgec FP32 +
int8 export pair of a small nested residual model (PTQ on digits, nothing trained), both timed in ORT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgec.bench.layers import LayerGraph, canonical_op, scope_path
from edgec.bench.profile import profile_models, write_profile
from edgec.errors import InputError
from edgec.runtime.profile import parse_trace

REPO = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.relu = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()
        self.layer1 = nn.Sequential(Block(16), Block(16))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer1(self.relu(self.stem(x)))), 1))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(fp32.onnx, int8.onnx, the torch model's Conv/Linear module names) from edgec.compress ptq-int8."""
    import edgec
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    torch.manual_seed(0)
    net = Net()
    out = tmp_path_factory.mktemp("profile") / "run"
    edgec.compress(net, (TensorDataset(x[:300], y[:300]), TensorDataset(x[1500:1600], y[1500:1600])), "ptq-int8",
                   out=out, overrides=["bench.runs=5", "bench.rounds=1", "stages.0.calibration_samples=64",
                                       "export.min_fidelity=0",
                                       # a quantized layer in every row, whatever this CPU measures
                                       "stages.0.precision.keep_slow_float=false"])
    layers = {n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return out / "export" / "model_fp32.onnx", out / "export" / "model_compressed.onnx", layers


@pytest.fixture(scope="module")
def result(pair):
    fp32, int8, _ = pair
    return profile_models([fp32, int8], runs=8, warmup=2)


# ------------------------------------------------------------------------------------ the rule
def test_scope_path_and_kernel_ops():
    assert scope_path("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert scope_path("/features/features.0/features.0.1/Relu") == "features.0.1"
    assert scope_path("/block/block/Conv") == "block.block"
    assert scope_path("/conv1/Conv") == "conv1" and scope_path("/Flatten") is None
    assert scope_path("conv1.weight_DequantizeLinear") is None
    assert [canonical_op(k) for k in ("QLinearConv", "QGemm", "NhwcMaxPool", "QLinearAdd", "FusedConv", "Conv",
                                      "QuantizeLinear", "MatMulInteger")] == \
        ["Conv", "Gemm", "MaxPool", "Add", "Conv", "Conv", "QuantizeLinear", "MatMul"]


def test_parse_trace_drops_warmup_and_sums_repeated_nodes():
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(name, ts, dur, op="Conv"):
        return {"cat": "Node", "name": name + "_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op, "provider": "CPUExecutionProvider"}}

    events = [run(0, 50), node("a", 5, 40), run(100, 30), node("a", 101, 10), node("b", 112, 3, "Relu"),
              node("b", 120, 4, "Relu"), {"cat": "Node", "name": "a_fence_before", "ts": 101, "dur": 1},
              run(200, 30), node("a", 201, 12), node("b", 215, 5, "Relu")]
    t = parse_trace(events, skip=1)
    assert t["run_us"] == [30.0, 30.0]
    assert [(n["name"], n["op"], n["us"]) for n in t["nodes"]] == [("a", "Conv", [10.0, 12.0]),
                                                                   ("b", "Relu", [7.0, 5.0])]


def test_every_conv_and_gemm_layer_lines_up(pair, result):
    fp32, int8, modules = pair
    assert result.pair == {"fp32": "model_fp32", "int8": "model_compressed"}
    rows = {r.layer: r for r in result.layers}
    for name in modules:  # every Conv/Linear of the torch model: one row, time in both artifacts
        r = rows[name]
        assert r.kind == "layer" and r.fp32_us > 0 and r.int8_us > 0, name
        assert r.ratio == pytest.approx(r.int8_us / r.fp32_us)
        assert r.int8_slower == (r.int8_us > r.fp32_us) and 0.0 <= r.int8_slower_share <= 1.0
    q = result.artifacts[1]
    fused = [n for n in q.nodes if n["op"] in ("QLinearConv", "QGemm")]
    assert len(fused) == len(modules)  # every layer ran as an integer kernel ...
    assert {n["layer"] for n in fused} == modules  # ... and each one's time landed on its own layer
    for n in fused:
        want = "QGemm" if n["layer"] == "fc" else "QLinearConv"
        assert n["op"] == want, n
    adds = [n for n in q.nodes if n["op"] == "QLinearAdd"]  # the residual Adds: on each block's last conv
    assert sorted(n["layer"] for n in adds) == ["layer1.0.conv2", "layer1.1.conv2"]
    f = result.artifacts[0]
    assert {n["layer"] for n in f.nodes if n["op"] in ("Conv", "Gemm")} == modules
    assert not any("relu" in r.layer for r in result.layers)  # fused Conv+Relu named after the Relu: on the Conv
    # graph-boundary Q/DQ and ORT's own layout kernels: rows of their own, no FP32 time there
    assert rows["(input)/QuantizeLinear"].kind == "boundary" and rows["(input)/QuantizeLinear"].fp32_us == 0
    assert all(r.int8_slower is None for r in result.layers if r.kind in ("boundary", "runtime"))
    # non-layer ops keyed by their upstream layer: the same key in both graphs
    pool = rows["layer1.1.conv2/GlobalAveragePool"]
    assert pool.kind == "op" and pool.fp32_us > 0 and pool.int8_us > 0


def test_every_node_of_the_source_graphs_has_a_key(pair):
    for path in pair[:2]:
        g = LayerGraph(onnx.load(str(path)))
        assert len(g.keys) == len(g.nodes)
        convs = {g.keys[i][0] for i, n in enumerate(g.nodes) if n.op_type in ("Conv", "Gemm")}
        assert convs == pair[2], path


def test_json_schema_and_files(result, tmp_path):
    d = json.loads(result.to_json())
    assert d["schema"] == "edgec.profile/1"
    assert {"batch", "threads", "runs", "warmup", "method", "device", "pair", "artifacts", "layers"} <= set(d)
    assert d["batch"] == 1 and d["threads"] == 1 and d["runs"] == 8 and d["device"]["remote"] is False
    for a in d["artifacts"]:
        assert {"name", "path", "quantized", "provider", "run_us", "run_us_p90", "kernels_us", "nodes"} <= set(a)
        assert a["run_us"] > 0 and a["kernels_us"] > 0
        assert all({"name", "op", "provider", "us", "layer", "kind"} <= set(n) for n in a["nodes"])
    assert [a["quantized"] for a in d["artifacts"]] == [False, True]
    keys = {"layer", "kind", "us", "kernels", "fp32_us", "int8_us", "ratio", "int8_slower", "int8_slower_share"}
    for r in d["layers"]:
        assert set(r) == keys and set(r["us"]) == {"model_fp32", "model_compressed"}
        assert r["kind"] in ("layer", "op", "boundary", "runtime")
    paths = write_profile(result, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == d
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result.top(3)) == 3 and result.top(None) == sorted(result.layers, key=lambda r: -max(r.us.values()))


def test_single_artifact_has_no_pair(pair):
    res = profile_models(pair[1], runs=3, warmup=0)
    assert res.pair is None and all(r.ratio is None and r.int8_slower is None for r in res.layers)
    assert {r.layer for r in res.layers if r.kind == "layer"} == pair[2]


# ------------------------------------------------------------------------------------ the CLI
def _cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)


def test_cli_end_to_end(pair, tmp_path):
    fp32, int8, _ = pair
    res = _cli("profile", fp32, int8, "--runs", "5", "--warmup", "1", "--top", "4", "--out", tmp_path / "p")
    assert res.returncode == 0, res.stderr
    assert "edgec profile on local" in res.stdout and "whole call (trace)" in res.stdout
    assert "more row(s) in the JSON" in res.stdout
    d = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert d["runs"] == 5 and len(d["artifacts"]) == 2
    assert (tmp_path / "p" / "profile.png").stat().st_size > 1000


def test_cli_bad_input_is_a_clear_error(pair, tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n")
    for args, msg in (((pair[0], bad), "is not an ONNX model"), ((tmp_path / "missing.onnx",), "does not exist")):
        res = _cli("profile", *args, "--runs", "2")
        assert res.returncode == 2, res.stderr
        assert msg in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(InputError, match="at least one"):
        profile_models([])


# ------------------------------------------------------------------------------------ remote
@pytest.mark.remote
def test_remote_profile_same_rows_as_local(pair, result, tmp_path):
    from sshd_util import start_sshd

    sshd = start_sshd(tmp_path / "sshd")
    try:
        devs = sshd.devices_yaml(tmp_path / "devices.yaml")
        res = profile_models(list(pair[:2]), runs=4, warmup=1, remote="loop", devices_file=devs)
    finally:
        sshd.stop()
    assert res.device["remote"] is True and res.device["name"] == "loop"
    assert {r.layer for r in res.layers} == {r.layer for r in result.layers}
    assert all(res_row.fp32_us > 0 for res_row in res.layers if res_row.layer in pair[2])
    assert list((sshd.root / "work").iterdir()) == []  # the device's folder is removed

"""Device-side runner: real ONNX models exported from torch, run in onnxruntime."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_util import subprocess_env

from edgec import runtime

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent
N_CLASSES = 5


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, N_CLASSES)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path of the exported model, the torch model)."""
    torch.manual_seed(0)
    net = TinyNet().eval()
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter, on purpose
        torch.onnx.export(
            net, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path, net


def _torch_logits(net, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def test_runtime_imports_without_torch():
    code = "import edgec.runtime, sys; assert 'torch' not in sys.modules, 'runtime imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr


def test_cli_predictions_match_torch(tiny, tmp_path):
    path, net = tiny
    x = np.random.default_rng(1).standard_normal((7, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run(
        [sys.executable, "-m", "edgec.runtime", str(path), "--input", str(tmp_path / "x.npy"),
         "--topk", "2"],
        capture_output=True, text=True, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert [int(r[0]) for r in rows] == list(range(7))
    logits = _torch_logits(net, x)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert [int(r[1]) for r in rows] == logits.argmax(1).tolist()
    np.testing.assert_allclose([float(r[2]) for r in rows], probs.max(1), atol=1e-5)
    second = np.argsort(-probs, axis=1)[:, 1]
    assert [int(r[3]) for r in rows] == second.tolist()


def test_runtime_folder_runs_when_copied_alone(tiny, tmp_path):
    """The runtime/ folder alone (no edgec package, no torch) predicts on a device."""
    shutil.copytree(REPO / "edgec" / "runtime", tmp_path / "runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import runpy, sys; sys.argv = ['runtime', sys.argv[1], '--input', 'x.npy'];"
        "sys.modules['edgec'] = None; sys.modules['torch'] = None;"  # importing either fails
        "runpy.run_module('runtime', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tiny[0])], capture_output=True,
                          text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len([ln for ln in proc.stdout.splitlines() if not ln.startswith("#")]) == 2


def test_cli_bench_writes_json(tiny, tmp_path):
    path, _ = tiny
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, "-m", "edgec.runtime", str(path), "--bench", "--batch", "4",
         "--warmup", "1", "--runs", "5", "--threads", "1", "--json-out", str(out)],
        capture_output=True, text=True, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    for key in ("p50", "p90", "p99", "mean", "min", "throughput_per_s", "peak_rss_mb", "provider"):
        assert key in res
    assert res["provider"] == "CPUExecutionProvider"
    assert res["peak_rss_mb"] > 1
    assert res["torch_imported"] is False


def test_cli_missing_model_is_clear(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgec.runtime", str(tmp_path / "nope.onnx"), "--bench"],
        capture_output=True, text=True, env=subprocess_env(),
    )
    assert proc.returncode == 2
    assert "nope.onnx" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_predict_matches_torch_and_batching_is_exact(tiny):
    path, net = tiny
    sess = runtime.load_session(path)
    x = np.random.default_rng(2).standard_normal((10, 3, 8, 8))  # float64: cast by predict
    whole = runtime.predict(sess, x, batch_size=256)
    chunked = runtime.predict(sess, x, batch_size=3)  # 3+3+3+1
    assert whole.shape == (10, N_CLASSES) and whole.dtype == np.float32
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole, _torch_logits(net, x.astype(np.float32)), atol=1e-4)
    # a single sample without its batch axis
    np.testing.assert_allclose(runtime.predict(sess, x[0]), whole[:1], rtol=1e-5, atol=1e-6)


def test_predict_rejects_wrong_shape(tiny):
    sess = runtime.load_session(tiny[0])
    with pytest.raises(runtime.RunnerError, match="expects"):
        runtime.predict(sess, np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(runtime.RunnerError, match="batch_size"):
        runtime.predict(sess, np.zeros((2, 3, 8, 8), np.float32), batch_size=0)


def test_measure_latency_keys_and_order(tiny):
    sess = runtime.load_session(tiny[0], threads=1)
    res = runtime.measure_latency(sess, batch=2, warmup=1, runs=20)
    assert set(res) >= {"p50", "p90", "p99", "mean", "min", "throughput_per_s"}
    assert 0 < res["min"] <= res["p50"] <= res["p90"] <= res["p99"]
    assert res["throughput_per_s"] == pytest.approx(2 * 1000 / res["mean"])
    # with a sample: tiled to the batch size
    sample = np.ones((3, 3, 8, 8), np.float32)
    res = runtime.measure_latency(sess, batch=5, warmup=0, runs=3, sample=sample)
    assert res["p50"] <= res["p99"]


def test_load_session_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runtime.load_session(tmp_path / "missing.onnx")
    with pytest.raises(runtime.ProviderUnavailableError, match="available here: .*CPUExecutionProvider"):
        runtime.load_session(tiny[0], providers=["NoSuchExecutionProvider"])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(runtime.ModelLoadError, match="could not load"):
        runtime.load_session(bad)
    assert isinstance(runtime.ModelLoadError("x"), ValueError)

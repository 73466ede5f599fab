"""The Python API: edgec.compress on an in-memory nn.Module and (train, eval) datasets."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import edgec
from edgec.errors import InputError, RunDirError

pytestmark = pytest.mark.integration


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.int64)
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


def _net():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    train, test = _digits()
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    for _ in range(8):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    assert acc > 0.8, f"the FP32 model must be trained before the comparison means anything ({acc:.2%})"
    return model, train, test, acc


def test_compress_in_memory_model_and_datasets(trained, tmp_path):
    model, train, test, acc = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = edgec.compress(model, (train, test), "ptq-int8", out=tmp_path / "run",
                         overrides=["bench.runs=20", "bench.rounds=2", "stages.0.precision.keep_slow_float=false"])
    # the user's model is not modified; the compressed one comes back in memory
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res.run_dir == tmp_path / "run" and (res.run_dir / "report.md").is_file()
    fp32, q = res.rows
    assert fp32["accuracy"] == pytest.approx(acc, abs=1 / len(test))  # ORT FP32 = PyTorch FP32
    assert q["format"] == "onnx-int8" and q["integer_kernels"] == "3/3"
    assert q["parity_top1"] >= 0.99
    assert abs(q["accuracy"] - fp32["accuracy"]) <= 0.03  # W8A8 PTQ of a trained model
    assert q["latency_rounds"] == 2 and len(q["latency_round_p50_ms"]) == 2
    lo, hi = q["speedup_spread"]
    assert lo <= q["speedup_vs_fp32"] <= hi
    assert res.model is not None and res.artifacts["model_compressed"]["quantized"]
    run = json.loads((res.run_dir / "run.json").read_text())
    assert run["identity"]["model"].startswith("<in-memory torch.nn.modules.container.Sequential")
    assert run["identity"]["data"].startswith("<in-memory TensorDataset 1400/397")
    with torch.no_grad():
        sim = res.model(test.tensors[0][:64])
    assert sim.shape == (64, 10)

    # the same call again is refused (another run would be overwritten); resume=True continues it
    with pytest.raises(RunDirError, match="already holds this run"):
        edgec.compress(model, (train, test), "ptq-int8", out=tmp_path / "run",
                       overrides=["bench.runs=20", "bench.rounds=2", "stages.0.precision.keep_slow_float=false"])

    # re-export: from a name the class cannot be rebuilt; with a fresh instance it can
    with pytest.raises(RunDirError, match="in-memory model"):
        edgec.export_run(res.run_dir, data=(train, test))
    info = edgec.export_run(res.run_dir, model=_net(), data=(train, test), out=tmp_path / "again.onnx")
    assert info["parity"]["top1_agreement"] >= 0.99
    assert info["weight_bytes_deployed"] == q["weight_bytes_deployed"]


def test_api_rejects_wrong_arguments(trained, tmp_path):
    model, train, test, _ = trained
    with pytest.raises(InputError, match="weights= is for a model SPEC"):
        edgec.compress(model, (train, test), "ptq-int8", out=tmp_path / "a", weights="w.pt")
    with pytest.raises(InputError, match="data must be"):
        edgec.compress(model, [train], "ptq-int8", out=tmp_path / "b")
    with pytest.raises(InputError, match="model must be"):
        edgec.compress(42, (train, test), "ptq-int8", out=tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_recipe_as_dict_and_export_disabled(trained, tmp_path):
    model, train, test, _ = trained
    recipe = {"name": "mine", "stages": [{"method": "ptq", "calibration_samples": 64}],
              "export": {"enabled": False}}
    res = edgec.compress(model, (train, test), recipe, out=tmp_path / "run")
    assert res.rows == [] and not (res.run_dir / "export").exists()
    assert (res.run_dir / "model_final.pt").is_file()

"""`edgec compress -> export -> bench` end to end on the built-in digits data, through the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_util import run_cli

pytestmark = pytest.mark.integration  # every test drives the edgec CLI; the module fixture runs compress end to end

REPO = Path(__file__).resolve().parents[1]
TINY = """\
version: 1
name: tiny
target: x86
stages:
  - method: prune
    target_sparsity: 0.5
    epochs: 1
    batch_size: 32
    optimizer: adam
    lr: 0.001
    weight_decay: 0.0
    update_every: 4
  - method: qat
    epochs: 1
    batch_size: 32
    optimizer: adam
    lr: 0.0005
    weight_decay: 0.0
    kd: {teacher: input, temperature: 4.0, alpha: 0.5}
    precision: {keep_slow_float: false}   # the uniform integer graph (4/4 fused), not this CPU's timing
bench: {runs: 5, warmup: 1}
export: {parity_samples: 360}
"""


def train_digits(path: Path, epochs: int = 3) -> Path:
    from edgec.data import load_data
    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit
    from edgec.models import create_model, save_weights

    torch.manual_seed(0)
    data = load_data("digits")
    model = create_model("digits_cnn")
    fit(model, loss_fn=lambda m, x, y: (torch.nn.functional.cross_entropy(z := m(x), y), z), train_set=data.train,
        eval_set=None, cfg=TrainConfig(epochs=epochs, batch_size=32, lr=0.003, optimizer="adam", weight_decay=0.0),
        ckpt_path=None, dist=DistContext.single("cpu"))
    return save_weights(model, path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def baseline(workdir) -> Path:
    return train_digits(workdir / "digits_fp32.pt")


@pytest.fixture(scope="module")
def recipe_file(workdir) -> Path:
    p = workdir / "tiny.yaml"
    p.write_text(TINY)
    return p


@pytest.fixture(scope="module")
def run_dir(workdir, baseline, recipe_file) -> Path:
    out = workdir / "run"
    # module-scoped: call main directly (capsys is function-scoped)
    from edgec.cli import main

    old = sys.argv
    sys.argv = ["edgec", "compress", "--model", "digits_cnn", "--weights", str(baseline), "--data", "digits",
                "--recipe", str(recipe_file), "--out", str(out), "--device", "cpu"]
    try:
        with pytest.raises(SystemExit) as info:
            main()
    finally:
        sys.argv = old
    assert info.value.code == 0
    return out


def test_run_directory_and_report(run_dir):
    for name in ("run.json", "recipe.yaml", "model_input.pt", "model_final.pt", "metrics.jsonl", "report.json",
                 "report.md", "pareto.png", "calibration/stage1.json", "export/model_fp32.onnx",
                 "export/model_compressed.onnx", "export/model_compressed.check.json"):
        assert (run_dir / name).is_file(), name
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    assert [r["format"] for r in rows] == ["onnx-fp32", "onnx-int8"]
    fp32, comp = rows
    assert fp32["accuracy"] > 0.85
    assert comp["accuracy"] > fp32["accuracy"] - 0.05
    assert comp["weight_bytes_deployed"] < fp32["weight_bytes_deployed"] / 4  # int8 and 50% sparse
    assert comp["parity_top1"] >= 0.99
    assert comp["integer_kernels"] == "4/4"
    check = json.loads((run_dir / "export/model_compressed.check.json").read_text())
    assert check["parity"]["checker_ok"] and check["parity"]["samples"] == 360
    md = (run_dir / "report.md").read_text()
    assert "fp32 input" in md and "tiny" in md
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(x.get("event") == "stage_done" for x in lines)


def test_prune_sparsity_is_exactly_the_target(run_dir):
    from edgec import masks as P
    from edgec.runs import rebuild_model

    model = rebuild_model(run_dir, "final")
    masked = P.masked_layers(model)
    total = sum(m.weight_mask.numel() for m in masked)
    zeros = sum(int((m.weight_mask == 0).sum()) for m in masked)
    assert zeros == round(0.5 * total)


def test_export_command_and_target_mismatch(run_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    res = run_cli(capsys, "export", run_dir, "--out", out, "--opset", "13")
    assert res.code == 0 and out.is_file() and "top-1 agreement" in res.out
    res = run_cli(capsys, "export", run_dir, "--target", "tensorrt")
    assert res.code == 4 and "trained for target 'x86'" in res.err
    res = run_cli(capsys, "export", run_dir, "--target", "riscv")
    assert res.code == 2 and "unknown target" in res.err


def test_bench_command_json_and_budget(run_dir, tmp_path, capsys):
    js = tmp_path / "b.json"
    model = run_dir / "export/model_compressed.onnx"
    res = run_cli(capsys, "bench", model, "--data", "digits", "--runs", "5", "--warmup", "1", "--json", js)
    assert res.code == 0, res.err
    b = json.loads(js.read_text())
    for key in ("model", "runtime", "provider", "threads", "batch", "latency_ms", "throughput_per_s", "accuracy",
                "samples", "file_bytes", "weight_bytes_deployed", "params_nonzero"):
        assert key in b
    assert set(b["latency_ms"]) >= {"p50", "p90", "p99", "mean"}
    assert b["samples"] == 360 and b["accuracy"] > 0.8
    res = run_cli(capsys, "bench", model, "--runs", "3", "--budget-ms", "0.000001", "--json", js)
    assert res.code == 5 and "exceeds the budget" in res.err
    assert json.loads(js.read_text())["accuracy"] is None


def test_device_runner_without_torch(run_dir, tmp_path):
    from edgec.data import load_data, to_numpy

    x, y = to_numpy(load_data("digits").eval, limit=8)
    np.save(tmp_path / "x.npy", x)
    code = ("import runpy, sys; sys.argv=['edgec.runtime', sys.argv[1], '--input', sys.argv[2]]; "
            "runpy.run_module('edgec.runtime', run_name='__main__'); assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code, str(run_dir / "export/model_compressed.onnx"),
                          str(tmp_path / "x.npy")], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    preds = [int(line.split()[1]) for line in out.stdout.splitlines() if line and not line.startswith("#")]
    assert len(preds) == 8 and np.mean(np.array(preds) == y) >= 0.75


# ------------------------------------------------------------------------------------------------
# bad input: clear message, non-zero exit, no traceback, nothing half-written

def _compress(capsys, *extra):
    return run_cli(capsys, "compress", "--device", "cpu", "--no-export", *extra)


def test_existing_run_dir_is_refused(run_dir, baseline, recipe_file, capsys):
    res = _compress(capsys, "--model", "digits_cnn", "--weights", baseline, "--data", "digits", "--recipe",
                    recipe_file, "--out", run_dir)
    assert res.code == 2 and "already holds this run" in res.err and "--resume" in res.err
    res = _compress(capsys, "--model", "digits_cnn", "--weights", baseline, "--data", "digits", "--recipe",
                    "qat-int8", "--out", run_dir)
    assert res.code == 2 and "holds a different run" in res.err and "recipe" in res.err
    assert (run_dir / "model_final.pt").is_file()  # untouched


def test_bad_inputs(tmp_path, baseline, capsys):
    out = tmp_path / "never"
    cases = [
        (["--model", "digits_cnn", "--weights", tmp_path / "nope.pt", "--data", "digits", "--recipe", "qat-int8"],
         "does not exist"),
        (["--model", "resnet2O", "--data", "digits", "--recipe", "qat-int8"], "did you mean"),
        (["--model", "digits_cnn", "--data", "digits", "--recipe", "qat-in8"], "did you mean 'qat-int8'"),
        (["--model", "digits_cnn", "--data", "imagefolder:" + str(tmp_path), "--recipe", "qat-int8"], "train"),
        (["--model", "digits_cnn", "--data", "cifar:" + str(tmp_path), "--recipe", "qat-int8"], "did you mean"),
        (["--model", "digits_cnn", "--data", "digits", "--recipe", "qat-int8", "--set", "stages.0.epochs=-1"],
         "stages.0.epochs"),
    ]
    for args, needle in cases:
        res = _compress(capsys, *args, "--out", out)
        assert res.code == 2, (args, res.err)
        assert needle in res.err, (args, res.err)
        assert "Traceback" not in res.err
        assert not out.exists(), "nothing may be written before validation passes"


def test_weights_that_do_not_match_the_model(tmp_path, capsys):
    from edgec.models import create_model, save_weights

    w = save_weights(create_model("resnet8"), tmp_path / "r8.pt")
    res = _compress(capsys, "--model", "digits_cnn", "--weights", w, "--data", "digits", "--recipe", "qat-int8",
                    "--out", tmp_path / "o")
    assert res.code == 2 and "missing" in res.err and "unexpected" in res.err


def test_pickled_module_needs_trust_pickle(tmp_path, capsys):
    from edgec.models import create_model

    p = tmp_path / "whole.pt"
    torch.save(create_model("digits_cnn"), p)
    res = _compress(capsys, "--model", "digits_cnn", "--weights", p, "--data", "digits", "--recipe", "ptq-int8",
                    "--out", tmp_path / "o")
    assert res.code == 2 and "--trust-pickle" in res.err
    res = _compress(capsys, "--model", "digits_cnn", "--weights", p, "--data", "digits", "--recipe", "ptq-int8",
                    "--out", tmp_path / "o", "--trust-pickle")
    assert res.code == 0, res.err


def test_unsupported_layer_policy_error(tmp_path, capsys):
    mod = tmp_path / "mynet.py"
    mod.write_text("import torch\nfrom torch import nn\n"
                   "class Net(nn.Module):\n"
                   "    def __init__(self, num_classes=10):\n"
                   "        super().__init__()\n"
                   "        self.conv = nn.Conv2d(1, 8, 3, padding=1)\n"
                   "        self.up = nn.ConvTranspose2d(8, 8, 1)\n"
                   "        self.fc = nn.Linear(8, num_classes)\n"
                   "    def forward(self, x):\n"
                   "        return self.fc(torch.relu(self.up(self.conv(x))).mean((2, 3)))\n"
                   "def build(num_classes=10):\n    return Net(num_classes)\n")
    res = _compress(capsys, "--model", f"{mod}:build", "--data", "digits", "--recipe", "ptq-int8",
                    "--set", "stages.0.unsupported=error", "--out", tmp_path / "o")
    assert res.code == 2 and "up (ConvTranspose2d)" in res.err and "unsupported: float" in res.err


def test_nan_loss_stops_with_checkpoint_kept(tmp_path, baseline, capsys):
    res = _compress(capsys, "--model", "digits_cnn", "--weights", baseline, "--data", "digits", "--recipe",
                    "qat-int8", "--set", "stages.0.epochs=3", "--set", "stages.0.lr=1e30",
                    "--set", "stages.0.momentum=0", "--out", tmp_path / "nan")
    assert res.code == 3, res.err
    assert "nan" in res.err.lower() or "inf" in res.err.lower()
    assert not (tmp_path / "nan" / "model_final.pt").exists()


def test_verbose_shows_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edgec", "--verbose", "compress", "--model", "resnet2O", "--data",
                          "digits", "--recipe", "qat-int8", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" in out.stderr and "ModelError" in out.stderr


def test_cli_help_imports_no_torch():
    code = ("import sys; from edgec.cli import app; "
            "assert not any(m in sys.modules for m in ('torch', 'onnxruntime', 'tensorrt', 'nncf')), "
            "[m for m in ('torch','onnxruntime') if m in sys.modules]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-m", "edgec", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "compress" in out.stdout


def test_models_command(capsys):
    res = run_cli(capsys, "models", "resnet*")
    assert res.code == 0 and "resnet20" in res.out and "digits_cnn" not in res.out


def test_teacher_calibration_reported(tmp_path, baseline, capsys):
    res = _compress(capsys, "--model", "digits_cnn", "--weights", baseline, "--data", "digits", "--recipe", "qat-int8",
                    "--set", "stages.0.epochs=1", "--set", "stages.0.kd.calibrate=true",
                    "--set", "stages.0.kd.calibration_fraction=0.2", "--out", tmp_path / "cal")
    assert res.code == 0, res.err
    assert "teacher calibration on" in res.out
    events = [json.loads(x) for x in (tmp_path / "cal" / "metrics.jsonl").read_text().splitlines()]
    cal = [e for e in events if e.get("event") == "teacher_calibration"]
    assert len(cal) == 1
    c = cal[0]
    assert c["held_out"] == round(0.2 * 1437) or abs(c["held_out"] - 0.2 * 1437) <= 1
    for k in ("nll", "ece", "ace", "accuracy"):
        assert k in c["before"] and k in c["after"]
    assert c["after"]["nll"] <= c["before"]["nll"] + 1e-6
    assert c["temperature"] > 0


def test_real_cifar10_through_the_cli(edgec_data, tmp_path, capsys):
    """cifar10:PATH (ImageFolder JPEG copy) -> ptq-int8 -> export -> ORT accuracy on 500 test images."""
    res = run_cli(capsys, "compress", "--model", "resnet8", "--data", f"cifar10:{edgec_data / 'cifar10'}",
                  "--recipe", "ptq-int8", "--set", "bench.eval_samples=500", "--set", "bench.runs=5",
                  "--set", "export.parity_samples=300", "--out", tmp_path / "c10", "--device", "cpu",
                  # every layer integer and the logits on an int8 grid, whatever this CPU measures
                  "--set", "stages.0.precision.keep_slow_float=false")
    assert res.code == 0, res.err
    rows = json.loads((tmp_path / "c10" / "report.json").read_text())["rows"]
    assert rows[0]["samples"] == 500 and rows[1]["integer_kernels"].split("/")[0] == rows[1]["integer_kernels"].split("/")[1]
    # an untrained net's logits are near-tied, so top-1 agreement mostly measures tie-breaking: the parity
    # that means something is ORT vs the simulation in steps of the logits' int8 grid (measured max 1 step)
    assert rows[1]["parity_top1"] >= 0.97
    parity = json.loads((tmp_path / "c10" / "export" / "model_compressed.check.json").read_text())["parity"]
    step = _onnx_logit_step(tmp_path / "c10" / "export" / "model_compressed.onnx")
    assert parity["max_abs_diff"] <= 3 * step and parity["mean_abs_diff"] <= 0.1 * step, (parity, step)


def _onnx_logit_step(path: Path) -> float:
    """Scale of the DequantizeLinear the graph's output comes from (through any reshape)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"})
    producer = {o: n for n in m.graph.node for o in n.output}
    node = producer[m.graph.output[0].name]
    while node.op_type != "DequantizeLinear":
        node = producer[node.input[0]]
    return float(consts[node.input[1]])

"""Generality suite: user-style architectures (written here, not imported from the zoo), trained briefly
on real data (sklearn digits), PTQ'd by edgec through ``edgec.compress`` and by ONNX Runtime's own
``quantize_static`` (QDQ, per channel, reduce_range, after ``quant_pre_process``, the same calibration
samples) on the same FP32 ONNX. edgec must agree with the FP32 model at least as well as ORT minus
1 pt, with every Conv/Gemm an integer kernel in ORT; a deliberately broken quantization must end
with the fidelity error (exit 6), not exit 0.

This file is also the model file the runs load (``tests/test_user_models.py:factory``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve()

# each architecture is trained on real data and PTQ'd through the pipeline, then by ORT
pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------------------------
# the architectures (digits: 1x8x8 inputs, 10 classes)


class ReluBN(nn.Module):
    """conv -> ReLU -> BatchNorm (cannot be folded: it follows the ReLU) -> conv: the next conv's
    input has negative values that an unsigned grid would clip."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.b1(F.relu(self.c1(x)))
        x = self.b2(F.relu(self.c2(x)))
        x = F.max_pool2d(x, 2)
        x = self.b3(F.relu(self.c3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Frame1D(nn.Module):
    """1-D frame input (the 64 pixels as a signal), Conv1d blocks conv -> ReLU -> BN -> max-pool -> pad."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(in_channels, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.c2, self.b2 = nn.Conv1d(16, 32, 3), nn.BatchNorm1d(32)
        self.c3, self.b3 = nn.Conv1d(32, 32, 3, padding=1), nn.BatchNorm1d(32)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(32 * 8, num_classes)

    def forward(self, x):
        x = torch.flatten(x, 2)  # (N, C, 64)
        x = self.pool(self.b1(F.relu(self.c1(x))))
        x = F.pad(x, (1, 1))
        x = self.pool(self.b2(F.relu(self.c2(x))))
        x = self.pool(self.b3(F.relu(self.c3(x))))
        return self.fc(torch.flatten(x, 1))


def _shuffle(x, groups: int):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Shuffle(nn.Module):
    """ShuffleNetV2-style: one max-pool output feeds two branches, concat, channel shuffle."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.stem, self.bs = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.left = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                  nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                   nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.unit = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bs(self.stem(x))))
        x = _shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)
        x = self.unit(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SE(nn.Module):
    def __init__(self, c, r=4, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.relu(self.fc1(s))))


class HSwishSE(nn.Module):
    """MobileNetV3-style inverted residuals: hard-swish, depthwise conv, squeeze-excite gating."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.Hardswish())
        self.exp = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48),
                                nn.Hardswish())
        self.se = SE(48)
        self.proj = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.dw2 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False),
                                 nn.BatchNorm2d(16), nn.Hardswish())
        self.se2 = SE(16, gate=nn.Sigmoid)
        self.head = nn.Sequential(nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64), nn.Hardswish())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.proj(self.se(self.dw(self.exp(x))))
        x = self.head(self.se2(self.dw2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Dense(nn.Module):
    """DenseNet-style blocks: BN -> ReLU -> conv, concatenated to the block input."""

    def __init__(self, num_classes=10, in_channels=1, growth=8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        c = 16
        self.layers = nn.ModuleList()
        for _ in range(3):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1,
                                                                                   bias=False)))
            c += growth
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Grouped(nn.Module):
    """ResNeXt-style bottleneck with a grouped 3x3 conv and a residual add."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.c(self.b(self.a(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PreAct(nn.Module):
    """Pre-activation residual blocks: x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"bn1": nn.BatchNorm2d(16), "c1": nn.Conv2d(16, 16, 3, padding=1, bias=False),
                           "bn2": nn.BatchNorm2d(16), "c2": nn.Conv2d(16, 16, 3, padding=1, bias=False)})
            for _ in range(2))
        self.bn, self.fc = nn.BatchNorm2d(16), nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b["c2"](F.relu(b["bn2"](b["c1"](F.relu(b["bn1"](x))))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


ARCHS = {"relu_bn": ReluBN, "frame_1d": Frame1D, "shuffle": Shuffle, "hswish_se": HSwishSE, "dense": Dense,
         "grouped": Grouped, "preact": PreAct}


def relu_bn(num_classes=10, in_channels=1):
    return ReluBN(num_classes, in_channels)


def frame_1d(num_classes=10, in_channels=1):
    return Frame1D(num_classes, in_channels)


def shuffle(num_classes=10, in_channels=1):
    return Shuffle(num_classes, in_channels)


def hswish_se(num_classes=10, in_channels=1):
    return HSwishSE(num_classes, in_channels)


def dense(num_classes=10, in_channels=1):
    return Dense(num_classes, in_channels)


def grouped(num_classes=10, in_channels=1):
    return Grouped(num_classes, in_channels)


def preact(num_classes=10, in_channels=1):
    return PreAct(num_classes, in_channels)


# --------------------------------------------------------------------------------------------
# helpers


def train(name: str, path: Path, epochs: int = 12) -> Path:
    """A few epochs of Adam on the digits training split (seconds), BatchNorm statistics included."""
    from edgec.data import load_data, to_numpy

    torch.manual_seed(0)
    data = load_data("digits")
    x, y = (torch.from_numpy(a) for a in to_numpy(data.train))
    model = ARCHS[name]()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    torch.save(model.eval().state_dict(), path)
    return path


def ort_quantize_static(fp32: Path, out: Path, calib_x: np.ndarray) -> Path:
    """ONNX Runtime's own PTQ on the same FP32 ONNX and the same calibration samples."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib_x[i:i + 64]} for i in range(0, len(calib_x), 64)])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(ref.astype(np.float64) ** 2) / np.mean((ref - got).astype(np.float64) ** 2)))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


@pytest.fixture(scope="module")
def digits():
    from edgec.data import calibration_subset, load_data, to_numpy

    data = load_data("digits", seed=0)
    ex, _ = to_numpy(data.eval)
    calib, _ = calibration_subset(data.train, 512, seed=0)  # what the ptq stage draws (ptq-int8: 512, seed 0)
    cx, _ = to_numpy(calib)
    return ex, cx


def compress_cli(capsys, name: str, weights: Path, out: Path, *extra: str):
    from cli_util import run_cli

    return run_cli(capsys, "compress", "--model", f"{HERE}:{name}", "--weights", weights, "--data", "digits",
                   "--recipe", "ptq-int8", "--out", out, "--device", "cpu", "--force", "--set", "bench.runs=3",
                   "--set", "bench.warmup=1", "--set", "stages.0.precision.keep_slow_float=false", *extra)


# --------------------------------------------------------------------------------------------
# the suite


@pytest.fixture(scope="module")
def results(tmp_path_factory, digits):
    """Every architecture trained once, PTQ'd by edgec (the library entry point) and by ORT."""
    from edgec.pipeline import CompressRequest, compress
    from edgec.export.check import fused_ops
    from edgec.runtime import load_session, predict

    ex, cx = digits
    root = tmp_path_factory.mktemp("user_models")
    res = {}
    for name in ARCHS:
        w = train(name, root / f"{name}.pt")
        run = compress(CompressRequest(model=f"{HERE}:{name}", data="digits", recipe="ptq-int8", weights=str(w),
                                       out=root / name, device="cpu",
                                       overrides=("bench.runs=3", "bench.warmup=1",
                                                  "stages.0.precision.keep_slow_float=false"))).run_dir
        fp32, edgec_q = run / "export" / "model_fp32.onnx", run / "export" / "model_compressed.onnx"
        ort_q = ort_quantize_static(fp32, root / f"{name}_ort.onnx", cx)
        ref = predict(load_session(fp32), ex)
        rows = json.loads((run / "report.json").read_text())["rows"]
        got_e, got_o = predict(load_session(edgec_q), ex), predict(load_session(ort_q), ex)
        r = {"edgec": agreement(ref, got_e), "ort": agreement(ref, got_o),
             "edgec_sqnr": sqnr_db(ref, got_e), "ort_sqnr": sqnr_db(ref, got_o),
             "fidelity_top1": rows[1].get("fidelity_top1"), "parity": rows[1]["parity_top1"],
             "fp32_accuracy": rows[0]["accuracy"]}
        for tag, path in (("edgec", edgec_q), ("ort", ort_q)):
            compute, integer, float_left = fused_ops(path)
            r[f"{tag}_kernels"] = (sum(v for k, v in integer.items() if k in ("QLinearConv", "QGemm", "QLinearMatMul")),
                                   compute, float_left, integer)
        res[name] = r
    print("\nuser models (agreement with FP32 on 360 digits):", file=__import__("sys").stderr)
    for name, r in res.items():
        print(f"  {name:10s} fp32 acc {r['fp32_accuracy']:.3f}  edgec {r['edgec']:.4f}  ort {r['ort']:.4f}  "
              f"SQNR edgec {r['edgec_sqnr']:.1f} dB ort {r['ort_sqnr']:.1f} dB  "
              f"edgec kernels {r['edgec_kernels'][:3]} {r['edgec_kernels'][3]}  ort {r['ort_kernels'][:3]}",
              file=__import__("sys").stderr)
    return res


@pytest.mark.parametrize("name", list(ARCHS))
def test_edgec_ptq_as_faithful_as_ort_quantize_static(results, name):
    r = results[name]
    assert r["fp32_accuracy"] > 0.85, r  # trained: agreement with FP32 means something
    assert r["edgec"] >= r["ort"] - 0.01, r
    assert r["fidelity_top1"] == pytest.approx(r["edgec"], abs=0.02)  # fidelity in the report: same measure
    assert r["parity"] >= 0.97, r


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_conv_and_gemm_is_an_integer_kernel(results, name):
    fused, compute, float_left, _ = results[name]["edgec_kernels"]
    assert fused == compute and float_left == 0, results[name]["edgec_kernels"]


def test_broken_quantization_ends_with_fidelity_error(tmp_path, capsys):
    """2-bit weights and activations wreck the model: exit 6 naming the worst layers, not exit 0; the
    report is still written; --allow-low-fidelity keeps the artifact with exit 0."""
    w = train("relu_bn", tmp_path / "w.pt", epochs=4)
    bad = ("--set", "stages.0.weight_bits=2", "--set", "stages.0.act_bits=2")
    res = compress_cli(capsys, "relu_bn", w, tmp_path / "bad", *bad)
    assert res.code == 6, res.err + res.out
    assert "agrees with the FP32 input model on only" in res.err and "worst layers:" in res.err
    assert "--allow-low-fidelity" in res.err
    rows = json.loads((tmp_path / "bad" / "report.json").read_text())["rows"]
    assert rows[1]["fidelity_top1"] < 0.9
    fid = json.loads((tmp_path / "bad" / "export" / "fidelity.json").read_text())
    assert fid["worst_layers"] and fid["layers"]
    # --allow-low-fidelity lifts the fidelity gate only; the accuracy gate (exit 7) still judges the drop
    res = compress_cli(capsys, "relu_bn", w, tmp_path / "kept", *bad, "--allow-low-fidelity",
                       "--set", "bench.max_drop=null")
    assert res.code == 0, res.err
    assert "fidelity %" in (tmp_path / "kept" / "report.md").read_text()

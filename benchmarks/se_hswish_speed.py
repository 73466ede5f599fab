"""SE + hard-swish net (MobileNetV3-small style) on CIFAR-10: FP32 vs edgec ptq-int8 vs ORT quantize_static
(and optionally the edgec of an older checkout), speed-up vs FP32 measured in ONE interleaved run.
``--arch seresnet``: an SE-ResNet-20 with hard-swish instead (results/cifar10-seresnet20hs-int8-ort-cpu.json).

    EDGEC_DATA=../shared/data python benchmarks/se_hswish_speed.py [--epochs 2] [--train-samples 5000]
        [--old-src DIR]   # DIR: an edgec checkout (e.g. `git archive 2aed1ce | tar -x -C DIR`) for a "before" row

The model is defined here (a user model file, not from the zoo); it is trained briefly by plain PyTorch,
PTQ'd by edgec through `edgec.compress` (ptq-int8, 512 calibration images) and by ORT's `quantize_static`
(QDQ, per channel, reduce_range, u8 activations, after quant_pre_process, the same 512 images). Latency:
ORT CPU, 1 thread, batch 1, every artifact on every input back to back with rotating order
(`edgec.runtime.ensemble.interleaved_latency`). Writes benchmarks/results/cifar10-mnv3se-int8-ort-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / "work" / "se_hswish"
ARCH = "mnv3"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class SE(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(8, c // r), 1), nn.Conv2d(max(8, c // r), c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class Block(nn.Module):
    def __init__(self, cin: int, exp: int, cout: int, k: int, stride: int, se: bool, hs: bool):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.expand = nn.Sequential(nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), act()) if exp != cin else nn.Identity()
        self.dw = nn.Sequential(nn.Conv2d(exp, exp, k, stride, k // 2, groups=exp, bias=False), nn.BatchNorm2d(exp), act())
        self.se = SE(exp) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Small(nn.Module):
    """MobileNetV3-small layout for 32x32 inputs (first stride removed)."""

    CFG = [(16, 16, 3, 2, True, False), (72, 24, 3, 2, False, False), (88, 24, 3, 1, False, False),
           (96, 40, 5, 2, True, True), (240, 40, 5, 1, True, True), (120, 48, 5, 1, True, True),
           (288, 96, 5, 2, True, True), (576, 96, 5, 1, True, True)]

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        blocks, c = [], 16
        for exp, out, k, s, se, hs in self.CFG:
            blocks.append(Block(c, exp, out, k, s, se, hs))
            c = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(c, 576, 1, bias=False), nn.BatchNorm2d(576), nn.Hardswish())
        self.fc = nn.Linear(576, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def mnv3_small(num_classes: int = 10, in_channels: int = 3):
    return MobileNetV3Small(num_classes, in_channels)


class SEBasic(nn.Module):
    """ResNet basic block with hard-swish activations and squeeze-excite (sigmoid gate) on the residual."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.fc1, self.fc2 = nn.Conv2d(cout, cout // 4, 1), nn.Conv2d(cout // 4, cout, 1)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())
        self.act = nn.Hardswish()

    def forward(self, x):
        y = self.b2(self.c2(self.act(self.b1(self.c1(x)))))
        y = y * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.act(y + self.short(x))


class SEResNet(nn.Module):
    """SE-ResNet-20 layout (3 stages x 3 blocks, 16/32/64 channels) with hard-swish, for 32x32 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        blocks, c = [], 16
        for w, s in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(SEBasic(c, w, s if i == 0 else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def se_resnet(num_classes: int = 10, in_channels: int = 3):
    return SEResNet(num_classes, in_channels)


ARCHS = {"mnv3": ("mnv3_small", "cifar10-mnv3se-int8-ort-cpu"), "seresnet": ("se_resnet", "cifar10-seresnet20hs-int8-ort-cpu")}


def train(data, epochs: int, n: int, path: Path) -> Path:
    from edgec.data import to_numpy
    from edgec.stages.base import _subset

    torch.manual_seed(0)
    model = globals()[ARCHS[ARCH][0]]()
    x, y = (torch.from_numpy(a) for a in to_numpy(_subset(data.train, n, 0)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for ep in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        log(f"epoch {ep + 1}/{epochs} done")
    torch.save(model.eval().state_dict(), path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-samples", type=int, default=5000)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--latency-inputs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--old-src", type=Path, default=None)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="mnv3")
    args = ap.parse_args()
    global ARCH, WORK
    ARCH = args.arch
    factory, stem = ARCHS[ARCH]
    if ARCH != "mnv3":
        WORK = WORK.parent / f"{WORK.name}_{ARCH}"
    root = os.environ.get("EDGEC_DATA")
    if not root or not (Path(root) / "cifar10").is_dir():
        print("EDGEC_DATA must point at a folder with cifar10/; nothing to do", file=sys.stderr)
        return 0
    os.environ.setdefault("EDGEC_NO_PROGRESS", "1")
    torch.set_num_threads(1)
    import numpy as np

    from edgec.pipeline import CompressRequest, compress
    from edgec.data import calibration_subset, load_data, to_numpy
    from edgec.export.check import fused_ops
    from edgec.runtime import load_session, predict
    from edgec.runtime.ensemble import interleaved_latency

    spec = f"cifar10:{Path(root) / 'cifar10'}"
    WORK.mkdir(parents=True, exist_ok=True)
    data = load_data(spec, seed=0, max_eval=args.eval_samples)
    w = WORK / "fp32.pt"
    if not w.is_file():
        train(data, args.epochs, args.train_samples, w)
    common = ["bench.runs=5", "bench.warmup=2", f"bench.eval_samples={args.eval_samples}", "export.parity_samples=300"]
    run = compress(CompressRequest(model=f"{Path(__file__).resolve()}:{factory}", data=spec, recipe="ptq-int8",
                                   weights=str(w), out=WORK / "edgec", device="cpu", force=True,
                                   overrides=tuple(common), allow_low_fidelity=True)).run_dir
    arts = {"fp32": run / "export" / "model_fp32.onnx", "edgec ptq-int8": run / "export" / "model_compressed.onnx"}
    if args.old_src:
        out = WORK / "edgec_old"
        cmd = [sys.executable, "-m", "edgec", "compress", "--model", f"{Path(__file__).resolve()}:{factory}",
               "--weights", str(w), "--data", spec, "--recipe", "ptq-int8", "--out", str(out), "--device", "cpu",
               "--force", *[a for kv in common for a in ("--set", kv)]]
        # cwd: `python -m` puts the working directory first on sys.path
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(args.old_src)), capture_output=True,
                       cwd=str(args.old_src))
        arts["edgec ptq-int8 (before)"] = out / "export" / "model_compressed.onnx"
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cx, _ = to_numpy(calibration_subset(data.train, 512, seed=0)[0])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": cx[i:i + 64]} for i in range(0, len(cx), 64)])

        def get_next(self):
            return next(self.it, None)

    pre, ortq = WORK / "fp32.pre.onnx", WORK / "ort_qdq.onnx"
    quant_pre_process(str(arts["fp32"]), str(pre))
    quantize_static(str(pre), str(ortq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    arts["ORT quantize_static"] = ortq

    ex, ey = to_numpy(data.eval)
    sess = {k: load_session(p, threads=1) for k, p in arts.items()}
    logits = {k: predict(s, ex) for k, s in sess.items()}
    rows = []
    for k, p in arts.items():
        compute, integer, float_left = fused_ops(p)
        fused = sum(v for op, v in integer.items() if op in ("QLinearConv", "QGemm", "QLinearMatMul"))
        rows.append({"model": k, "accuracy": float((logits[k].argmax(1) == ey).mean()),
                     "agreement_vs_fp32": float((logits[k].argmax(1) == logits["fp32"].argmax(1)).mean()),
                     "integer_kernels": f"{fused}/{compute}", "integer_ops": integer, "file_bytes": p.stat().st_size})
    fns = {k: (lambda b, s=s: s.run(None, {"input": b})) for k, s in sess.items()}
    for batch in (1, 32):  # one interleaved run per batch size: all artifacts on every input, rotating order
        n = args.latency_inputs if batch == 1 else max(10, args.latency_inputs // 8)
        inputs = [ex[(i * batch) % len(ex):(i * batch) % len(ex) + batch] for i in range(n)]
        inputs = [b for b in inputs if len(b) == batch]
        lat, _ = interleaved_latency(fns, inputs, rounds=args.rounds, warmup=min(20, len(inputs)))
        for r in rows:
            r[f"mean_ms_b{batch}"] = lat[r["model"]]["mean_ms"]
            r[f"speedup_b{batch}_vs_fp32"] = lat["fp32"]["mean_ms"] / lat[r["model"]]["mean_ms"]
    for r in rows:
        log(f"{r['model']:26s} acc {r['accuracy']:.4f} agree {r['agreement_vs_fp32']:.4f} kernels {r['integer_kernels']:7s} "
            f"b1 {r['mean_ms_b1']:.3f} ms x{r['speedup_b1_vs_fp32']:.2f}  b32 {r['mean_ms_b32']:.2f} ms "
            f"x{r['speedup_b32_vs_fp32']:.2f}  {r['integer_ops']}")
    RESULTS.mkdir(exist_ok=True)
    import onnxruntime

    (RESULTS / f"{stem}.json").write_text(json.dumps({
        "rows": rows, "budget": {"epochs": args.epochs, "train_samples": args.train_samples,
                                 "eval_samples": len(ex), "latency_inputs_b1": args.latency_inputs,
                                 "rounds": args.rounds, "threads": 1, "batches": [1, 32]},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "old_src": str(args.old_src) if args.old_src else None}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The export target profiles on x86 and ARM kernels: CIFAR-10 / ResNet-20, int8 QAT for each profile,
each export run by x86 onnxruntime here and by onnxruntime on an ARM device over SSH, against the
PyTorch simulation, on real test images.

    EDGEC_DATA=../shared/data python benchmarks/arm64_profiles.py --devices devices.yaml --device arm64-emu \
        [--train-samples 10000] [--epochs 4] [--qat-samples 5000] [--eval-samples 1000]

The device can be the emulated aarch64 board of tools/arm64-device.sh behind an sshd (its latency is
labelled emulated and not reported as a speed). Writes benchmarks/results/arm64-profiles.json; the
baseline and the runs go to benchmarks/work/arm64/ (not committed). A short FP32 baseline on a subset
is enough here: the question is whether the integer kernels compute what the simulation trained, not
the accuracy itself.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cifar10_int8 import cifar10_root, log, train_baseline  # noqa: E402

WORK = HERE / "work" / "arm64"
RESULTS = HERE / "results"

RECIPE = """\
version: 1
name: qat-int8-{target}
target: {target}
stages:
  - method: qat
    epochs: 1
    batch_size: 64
    lr: 0.005
    max_train_samples: {qat_samples}
bench: {{enabled: false}}
export: {{parity_samples: 500}}
"""


def compare(name: str, a, b) -> dict:
    import numpy as np

    d = np.abs(a - b)
    return {"pair": name, "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "max_abs_diff": float(d.max()),
            "samples_differing": int((d.max(axis=1) > 0).sum())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--qat-samples", type=int, default=5000)
    ap.add_argument("--eval-samples", type=int, default=1000)
    args = ap.parse_args()
    root = cifar10_root()
    if root is None:
        return 2
    import numpy as np
    import torch

    from edgec import runtime
    from edgec.bench.remote import measure_on_device
    from edgec.data import load_data, to_numpy
    from edgec.pipeline import CompressRequest, compress
    from edgec.runs import rebuild_model

    torch.set_num_threads(1)
    WORK.mkdir(parents=True, exist_ok=True)
    data = load_data(f"cifar10:{root}")
    base = WORK / "resnet20_fp32.pt"
    t0 = time.perf_counter()
    if not base.is_file():
        log(f"FP32 baseline: {args.epochs} epochs on {args.train_samples} training images")
        train_baseline(data, args.epochs, 0, base, args.train_samples)
    ex, ey = to_numpy(load_data(f"cifar10:{root}", max_eval=args.eval_samples).eval)
    out = {"model": "resnet20", "data": "cifar10 (JPEG copy)", "eval_samples": int(len(ey)),
           "baseline": {"train_samples": args.train_samples, "epochs": args.epochs},
           "x86": {"machine": platform.machine(), "onnxruntime": None}, "profiles": {}}
    for target in ("x86", "arm64"):
        run = WORK / f"qat-{target}"
        recipe = WORK / f"qat-{target}.yaml"
        recipe.write_text(RECIPE.format(target=target, qat_samples=args.qat_samples))
        if not (run / "export" / "model_compressed.onnx").is_file():
            log(f"QAT int8 for target {target}")
            compress(CompressRequest(model="resnet20", data=f"cifar10:{root}", recipe=str(recipe), weights=str(base),
                                     out=run, device="cpu", force=True))
        model = run / "export" / "model_compressed.onnx"
        with torch.no_grad():
            sim = torch.cat([rebuild_model(run, "final").eval()(torch.from_numpy(ex[i:i + 250]))
                             for i in range(0, len(ex), 250)]).numpy()
        session = runtime.load_session(model)
        x86 = runtime.predict(session, ex)
        out["x86"]["onnxruntime"] = runtime.ort.__version__
        log(f"{target}: on {args.device} ...")
        m, dev = measure_on_device(model, args.device, inputs=ex, labels=ey, runs=5, warmup=1,
                                   devices_file=args.devices, outputs=True)
        arm = np.asarray(m["logits"], dtype=np.float32)
        out["device"] = {k: dev[k] for k in ("name", "machine", "cpu", "onnxruntime", "emulated")}
        out["profiles"][target] = {
            "accuracy": {"simulation": float((sim.argmax(1) == ey).mean()), "x86_ort": float((x86.argmax(1) == ey).mean()),
                         "device_ort": m["accuracy"]},
            "parity": [compare("device vs simulation", arm, sim), compare("x86 vs simulation", x86, sim),
                       compare("device vs x86", arm, x86)],
        }
        log(json.dumps(out["profiles"][target]))
    out["seconds"] = round(time.perf_counter() - t0)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "arm64-profiles.json").write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {RESULTS / 'arm64-profiles.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shared CIFAR-10 ResNet-20 baseline every pruning / precision benchmark starts from.

One FP32 training run by edgec's engine: 30 epochs on all 50,000 training images, batch 128, SGD
momentum 0.9, one-cycle lr 0.1 (cosine anneal), weight decay 5e-4, random crop + flip, seed 0.
The engine checkpoints every epoch, so an interrupted run continues where it stopped (rerun the
same command). At the end the state_dict (~1.1 MB) is written to
``benchmarks/baselines/resnet20-cifar10-e30-s0.pt`` (committed) with its test accuracy in ONNX
Runtime beside it (``.json``).

    EDGEC_DATA=../shared/data nice -n 19 python benchmarks/resnet20_baseline.py [--epochs 30]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cifar10_int8 import WORK, cifar10_root, log, train_baseline  # noqa: E402

BASELINES = HERE / "baselines"


def baseline_path(epochs: int = 30, seed: int = 0) -> Path:
    return BASELINES / f"resnet20-cifar10-e{epochs}-s{seed}.pt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    root = cifar10_root()
    if root is None:
        return 2
    import numpy as np
    import torch

    from edgec.data import load_data, to_numpy

    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    BASELINES.mkdir(parents=True, exist_ok=True)
    out = baseline_path(args.epochs, args.seed)
    data = load_data(f"cifar10:{root}", seed=args.seed)
    t0 = time.perf_counter()
    work = WORK / out.name
    log(f"training resnet20 {args.epochs} epochs (resumes from {work.with_suffix('.ckpt')} when present)")
    model = train_baseline(data, args.epochs, args.seed, work, None)
    wall = time.perf_counter() - t0
    model.eval()
    import onnxruntime as ort

    from edgec.export.onnx_export import export_onnx
    from edgec.models import save_weights

    onnx_path = work.with_suffix(".onnx")
    export_onnx(model, (3, 32, 32), onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ex, ey = to_numpy(data.eval)
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: ex[i:i + 256]})[0].argmax(1) for i in range(0, len(ex), 256)])
    acc = float((pred == ey).mean())
    save_weights(model, out)
    meta = {"model": "resnet20", "epochs": args.epochs, "seed": args.seed, "batch_size": 128, "lr": 0.1,
            "schedule": "onecycle", "optimizer": "sgd momentum 0.9", "weight_decay": 5e-4,
            "augment": "random crop 4 px + horizontal flip", "train_samples": len(data.train),
            "top1_ort_test": acc, "test_samples": len(ey), "wall_s_this_invocation": round(wall),
            "threads": args.threads, "torch": torch.__version__, "onnxruntime": ort.__version__}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"baseline {out}: top-1 in ORT {acc:.4f} on {len(ey)} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())

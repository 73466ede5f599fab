"""CIFAR-10 / ResNet-20: FP32 vs edgec ptq-int8 vs edgec qat-int8 vs ORT quantize_static vs NNCF PTQ.

Every model is exported to ONNX and measured in ONNX Runtime (CPU, 1 thread) in ONE run:
accuracy on the full 10,000-image test set, p50 latency at batch 1 and 32, ratio to FP32.

    EDGEC_DATA=../shared/data python benchmarks/cifar10_int8.py [--epochs 6] [--qat-samples 20000]

Writes benchmarks/results/cifar10-resnet20-int8-ort-cpu.{json,csv,png} (and a work dir with the
baseline weights and ONNX files under benchmarks/work/, not committed).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / "work"
STEM = "cifar10-resnet20-int8-ort-cpu"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cifar10_root() -> Path | None:
    """$EDGEC_DATA/cifar10, or None after saying why (benchmarks never assume the data)."""
    root = os.environ.get("EDGEC_DATA")
    if not root or not (Path(root) / "cifar10").is_dir():
        print("EDGEC_DATA must point at a folder with cifar10/ (e.g. ../shared/data); nothing to do", file=sys.stderr)
        return None
    os.environ.setdefault("EDGEC_NO_PROGRESS", "1")
    return Path(root) / "cifar10"


def train_baseline(data, epochs: int, seed: int, path: Path, max_train: int | None):
    import torch

    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit
    from edgec.models import create_model, save_weights
    from edgec.stages.base import _subset

    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10)
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                      schedule="onecycle", seed=seed)
    fit(model, loss_fn=lambda m, x, y: (torch.nn.functional.cross_entropy(z := m(x), y), z),
        train_set=_subset(data.train, max_train, seed), eval_set=None, cfg=cfg, ckpt_path=path.with_suffix(".ckpt"),
        resume=True, augment=data.augment, desc="fp32 baseline", dist=DistContext.single("cpu"),
        metrics_path=WORK / "baseline_metrics.jsonl")
    save_weights(model, path)
    return model


def baseline(data, epochs: int, seed: int = 0, max_train: int | None = None) -> Path:
    """The shared FP32 resnet20 checkpoint ``work/resnet20_fp32_e{epochs}_s{seed}[_n{max_train}].pt``, trained
    when absent (a run on a training subset never stands in for a full one)."""
    path = WORK / f"resnet20_fp32_e{epochs}_s{seed}{'' if max_train is None else f'_n{max_train}'}.pt"
    if path.is_file():
        log(f"reusing baseline {path}")
        return path
    log(f"training FP32 resnet20: {epochs} epochs, batch 128, SGD onecycle lr 0.1")
    tb = time.perf_counter()
    train_baseline(data, epochs, seed, path, max_train)
    log(f"baseline trained in {time.perf_counter() - tb:.0f} s")
    return path


def ort_quantize_static(fp32_onnx: Path, calib_x, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(str(fp32_onnx), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib_x[i:i + 32]} for i in range(0, len(calib_x), 32)])

        def get_next(self):
            return next(self.it, None)

    # the same x86 choice edgec's profile makes: u8 activations, 7-bit weights (reduce_range)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def nncf_ptq(model, calib_x, out: Path) -> Path | None:
    # NNCF JIT-compiles a C++ extension on first use (~30 s idle); on a loaded 2-core machine its 60 s limit fails
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    try:
        import nncf
        from nncf.torch.quantization.layers import QuantizerExportMode  # noqa: F401
    except ImportError:
        log("nncf not installed (pip install 'edgec[nncf]'): skipping the NNCF row")
        return None
    import torch
    from nncf.torch.quantization.layers import BaseQuantizer

    from edgec.quant.prepare import fold_batchnorm, trace

    # fold BN first: NNCF exports Conv -> BatchNormalization, which ORT then keeps in float
    model = model.eval()
    folded = fold_batchnorm(trace(copy.deepcopy(model), torch.from_numpy(calib_x[:2])))
    kept = dict(folded.named_modules())
    for name, mod in list(model.named_modules()):
        if not name:
            continue
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        if isinstance(mod, torch.nn.BatchNorm2d) and name not in kept:
            setattr(holder, attr, torch.nn.Identity())
        elif isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and name in kept:
            setattr(holder, attr, kept[name])
    loader = [torch.from_numpy(calib_x[i:i + 32]) for i in range(0, len(calib_x), 32)]
    qmodel = nncf.quantize(model, nncf.Dataset(loader, lambda x: x), subset_size=len(loader))
    for m in qmodel.modules():
        if isinstance(m, BaseQuantizer):
            m._export_mode = QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS
    torch.onnx.export(qmodel, (torch.zeros(1, 3, 32, 32),), str(out), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6, help="FP32 baseline epochs (full train set)")
    ap.add_argument("--max-train", type=int, default=None, help="baseline train subset (default: all 50k)")
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--qat-samples", type=int, default=20000, help="train samples per QAT epoch")
    ap.add_argument("--eval-samples", type=int, default=None, help="default: the full 10k test set")
    ap.add_argument("--runs", type=int, default=200, help="timed runs at batch 1 (batch 32: runs/4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = cifar10_root()
    if root is None:
        return 2
    import torch

    from edgec.bench import bench
    from edgec.bench.compare import compare_latency
    from edgec.data import calibration_subset, load_data, save_manifest, to_numpy
    from edgec.export.check import fused_ops
    from edgec.pipeline import CompressRequest, compress

    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    spec = f"cifar10:{root}"
    t0 = time.perf_counter()
    data = load_data(spec, seed=args.seed)
    ex, ey = to_numpy(data.eval, limit=args.eval_samples)
    calib, manifest = calibration_subset(data.train, 512, seed=args.seed)
    cx, _ = to_numpy(calib)
    manifest["data"] = "cifar10 train split (ImageFolder order)"
    save_manifest(manifest, HERE.parent / "calibration" / f"cifar10-train-{len(cx)}-seed{args.seed}.json")
    log(f"data: {data.describe()}; calibration {len(cx)} samples sha {manifest['sha256'][:12]}")

    base_path = baseline(data, args.epochs, args.seed, args.max_train)

    onnx_files: dict[str, Path] = {}  # first row: the reference
    parity: dict[str, dict] = {}
    budgets = {}
    for recipe, sets in (("ptq-int8", []),
                         ("qat-int8", [f"stages.0.epochs={args.qat_epochs}",
                                       f"stages.0.max_train_samples={args.qat_samples}"])):
        tr = time.perf_counter()
        # edgec exports and checks both models itself (parity on real samples); the timing is done below,
        # all models interleaved, so the run's own bench is off
        res = compress(CompressRequest(model="resnet20", data=spec, recipe=recipe, weights=str(base_path),
                                       overrides=(*sets, "bench.enabled=false"), out=WORK / f"run-{recipe}",
                                       device="cpu", force=True))
        budgets[recipe] = f"{time.perf_counter() - tr:.0f} s"
        if not onnx_files:
            onnx_files["fp32"] = Path(res.artifacts["model_fp32"]["path"])
            parity["fp32"] = res.artifacts["model_fp32"]["parity"]
        onnx_files[f"edgec {recipe}"] = Path(res.artifacts["model_compressed"]["path"])
        parity[f"edgec {recipe}"] = res.artifacts["model_compressed"]["parity"]
        log(f"{recipe}: compress {budgets[recipe]}, parity {parity[f'edgec {recipe}']['top1_agreement']:.4f}")
    onnx_files["ORT quantize_static"] = ort_quantize_static(onnx_files["fp32"], cx, WORK / "ort-qdq.onnx")
    from edgec.models import create_model, load_weights

    nn_path = nncf_ptq(load_weights(create_model("resnet20", num_classes=10), base_path), cx, WORK / "nncf-ptq.onnx")
    if nn_path is not None:
        onnx_files["NNCF PTQ"] = nn_path

    # accuracy once per model; latency of all models in one interleaved run per batch size
    # (edgec.bench.compare: every call of one model is followed by one of each other, the order rotating),
    # median over rounds of each round's p50, so slow drift of this shared machine hits every model alike
    rows = []
    for name, path in onnx_files.items():
        log(f"accuracy of {name} on {len(ex)} test images in ORT")
        b1 = bench(path, eval_x=ex, eval_y=ey, threads=1, batch=1, latency=False)
        compute, integer, float_left = fused_ops(path)
        rows.append({"model": name, "accuracy": b1["accuracy"], "samples": b1["samples"],
                     "weight_bytes_deployed": b1["weight_bytes_deployed"], "file_bytes": b1["file_bytes"],
                     "integer_kernels": sum(integer.get(k, 0) for k in ("QLinearConv", "QGemm", "QLinearMatMul")),
                     "compute_nodes": compute, "parity_top1_vs_pytorch": parity.get(name, {}).get("top1_agreement")})
    for batch, runs in ((1, args.runs), (32, max(10, args.runs // 4))):
        log(f"latency at batch {batch}: {args.rounds} interleaved rounds")
        cmp = compare_latency(onnx_files, threads=1, batch=batch, warmup=20 if batch == 1 else 5, runs=runs,
                              rounds=args.rounds, sample=ex[:batch])
        for row in rows:
            m = cmp["models"][row["model"]]
            row[f"p50_ms_b{batch}"] = m["p50_ms"]
            row[f"p50_ms_b{batch}_rounds"] = m["round_p50_ms"]
    f = rows[0]
    for r in rows:
        r["speedup_b1_vs_fp32"] = f["p50_ms_b1"] / r["p50_ms_b1"]
        r["speedup_b32_vs_fp32"] = f["p50_ms_b32"] / r["p50_ms_b32"]
        r["delta_acc_pt_vs_fp32"] = (r["accuracy"] - f["accuracy"]) * 100
    meta = {"task": "CIFAR-10 (JPEG q75 copy), resnet20 (option-B shortcuts)",
            "budget": {"fp32_epochs": args.epochs, "fp32_train_samples": args.max_train or len(data.train),
                       "qat_epochs": args.qat_epochs, "qat_samples_per_epoch": args.qat_samples,
                       "calibration_samples": len(cx), "compress_wall_time": budgets, "seed": args.seed},
            "runtime": b1["runtime"], "latency_method": cmp["method"], "threads": 1, "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "torch": torch.__version__, "wall_s": round(time.perf_counter() - t0), "parity_vs_pytorch": parity}
    (RESULTS / f"{STEM}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(RESULTS / f"{STEM}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows)
    print(f"\n{'model':22s} {'acc %':>7s} {'Δpt':>6s} {'b1 ms':>7s} {'x b1':>6s} {'b32 ms':>7s} {'x b32':>6s} {'int kern':>8s}")
    for r in rows:
        print(f"{r['model']:22s} {r['accuracy'] * 100:7.2f} {r['delta_acc_pt_vs_fp32']:+6.2f} {r['p50_ms_b1']:7.3f} "
              f"{r['speedup_b1_vs_fp32']:6.2f} {r['p50_ms_b32']:7.2f} {r['speedup_b32_vs_fp32']:6.2f} "
              f"{r['integer_kernels']:>3d}/{r['compute_nodes']:<3d}")
    log(f"done in {time.perf_counter() - t0:.0f} s -> {RESULTS / STEM}.*")
    return 0


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "p50_ms_b1", "batch 1"), (axes[1], "p50_ms_b32", "batch 32")):
        for r in rows:
            ax.scatter(r[key], r["accuracy"] * 100, s=30 + r["weight_bytes_deployed"] / 4000)
            ax.annotate(r["model"], (r[key], r["accuracy"] * 100), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(f"ORT p50 latency, {label}, 1 thread (ms)")
        ax.set_ylabel("top-1 accuracy on CIFAR-10 test, in ORT (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("ResNet-20 CIFAR-10: FP32 vs int8 (marker area ~ deployed weight bytes)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{STEM}.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())

"""User models on CIFAR-10: edgec ptq-int8 / qat-int8 vs ORT quantize_static vs NNCF PTQ, per architecture.

Eight user-style networks (benchmarks/user_archs.py: conv->ReLU->BN, 1-D frames, channel shuffle,
hard-swish + SE, dense concat, grouped conv, pre-activation residuals, a forward with a flag and a
shape branch), each trained briefly on CIFAR-10, then quantized four ways from the same FP32 weights
and the same calibration samples, every artifact measured in ONNX Runtime (CPU, 1 thread) in one run:
top-1 on the full test set, top-1 agreement with the FP32 artifact, integer kernels, and latency of
all of an architecture's artifacts in one interleaved run (edgec.bench.compare).

    EDGEC_DATA=../shared/data python benchmarks/user_models.py [--phase train|quantize|all] [--archs a b]

Resumable: baselines (benchmarks/work/user_models/<arch>.pt) and finished rows (<arch>/row.json) are kept.
Writes benchmarks/results/cifar10-user-models-int8-ort-cpu.{json,csv,png}.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cifar10_int8 import log  # noqa: E402  (one log format for the drivers)
RESULTS = HERE / "results"
WORK = HERE / "work" / "user_models"
STEM = "cifar10-user-models-int8-ort-cpu"


def cifar10_spec() -> str | None:
    """The data SPEC of $EDGEC_DATA/cifar10, or None after saying why (cifar10_int8's check)."""
    from cifar10_int8 import cifar10_root

    root = cifar10_root()
    return None if root is None else f"cifar10:{root}"


def train_baseline(arch: str, data, *, epochs: int, samples: int, seed: int = 0) -> Path:
    import torch

    import user_archs
    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit
    from edgec.models import save_weights
    from edgec.stages.base import _subset

    path = WORK / f"{arch}.pt"
    if path.is_file():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = user_archs.build(arch)
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                      schedule="onecycle", seed=seed)
    t = time.perf_counter()
    m = fit(model, loss_fn=lambda mod, x, y: (torch.nn.functional.cross_entropy(z := mod(x), y), z),
            train_set=_subset(data.train, samples, seed), eval_set=None, cfg=cfg,
            ckpt_path=WORK / f"{arch}.ckpt", resume=True, augment=data.augment, desc=f"{arch} fp32",
            dist=DistContext.single("cpu"), metrics_path=WORK / f"{arch}.metrics.jsonl")
    save_weights(model, path)
    log(f"{arch}: FP32 trained in {time.perf_counter() - t:.0f} s, train acc {m.get('train_acc', float('nan')):.3f}")
    return path


def _edgec_run(arch: str, spec: str, weights: Path, recipe: str, sets: list[str], out: Path):
    from edgec.pipeline import CompressRequest, compress

    # edgec exports and checks FP32 and int8 itself; accuracy and timing are measured below for every row alike
    return compress(CompressRequest(model=f"{HERE / 'user_archs.py'}:{arch.replace('-', '_')}", data=spec,
                                    recipe=recipe, weights=str(weights), overrides=(*sets, "bench.enabled=false"),
                                    out=out, device="cpu", force=True))


def quantize_one(arch: str, spec: str, data, ex, ey, args) -> dict:
    """All rows of one architecture (kept in WORK/<arch>/row.json once done)."""
    import user_archs
    from cifar10_int8 import nncf_ptq, ort_quantize_static
    from edgec import runtime
    from edgec.bench.compare import compare_latency
    from edgec.data import load_manifest, subset_from_manifest, to_numpy
    from edgec.export.check import fused_ops
    from edgec.models import load_weights

    out = WORK / arch
    done = out / "row.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    weights = WORK / f"{arch}.pt"
    files, notes, wall = {}, {}, {}
    t = time.perf_counter()
    ptq = _edgec_run(arch, spec, weights, "ptq-int8", [], out / "run-ptq")
    wall["edgec ptq-int8"] = time.perf_counter() - t
    files["fp32"] = Path(ptq.artifacts["model_fp32"]["path"])
    files["edgec ptq-int8"] = Path(ptq.artifacts["model_compressed"]["path"])
    # the calibration samples edgec drew (seeded manifest) are the ones ORT and NNCF calibrate on
    manifest = load_manifest(out / "run-ptq" / "calibration" / "stage0.json")
    cx, _ = to_numpy(subset_from_manifest(data.train, manifest))
    t = time.perf_counter()
    files["ORT quantize_static"] = ort_quantize_static(files["fp32"], cx, out / "ort-qdq.onnx")
    wall["ORT quantize_static"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        path = nncf_ptq(load_weights(user_archs.build(arch), weights), cx, out / "nncf-ptq.onnx")
        wall["NNCF PTQ"] = time.perf_counter() - t
        if path is not None:
            files["NNCF PTQ"] = path
    except Exception as e:  # noqa: BLE001 - a baseline tool failing on a user model is a result, recorded
        notes["NNCF PTQ"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        log(f"{arch}: NNCF PTQ {notes['NNCF PTQ']}")
    t = time.perf_counter()
    qat = _edgec_run(arch, spec, weights, "qat-int8", [f"stages.0.epochs={args.qat_epochs}",
                                                        f"stages.0.max_train_samples={args.qat_samples}"],
                     out / "run-qat")
    wall["edgec qat-int8"] = time.perf_counter() - t
    files["edgec qat-int8"] = Path(qat.artifacts["model_compressed"]["path"])
    preds = {}
    rows = []
    for name, path in files.items():
        logits = runtime.predict(runtime.load_session(path, threads=1), ex)
        preds[name] = logits.argmax(1)
        compute, integer, _ = fused_ops(path)
        n_int = sum(integer.get(k, 0) for k in ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger",
                                                  "MatMulInteger"))
        rows.append({"arch": arch, "model": name, "accuracy": float((preds[name] == ey).mean()),
                     "agreement_fp32": float((preds[name] == preds["fp32"]).mean()),
                     "integer_kernels": f"{n_int}/{compute}", "other_integer_ops": {k: v for k, v in integer.items()
                     if k not in ("QLinearConv", "QGemm", "QLinearMatMul")},
                     "wall_s": round(wall.get(name, 0.0), 1)})
    cmp = compare_latency(files, threads=1, batch=1, warmup=20, runs=args.runs, rounds=args.rounds, sample=ex[:1])
    for r in rows:
        r["p50_ms_b1"] = cmp["models"][r["model"]]["p50_ms"]
        r["speedup_vs_fp32"] = cmp["speedup_vs_first"][r["model"]]["median"]  # fp32 is the first artifact
        r["speedup_spread"] = [cmp["speedup_vs_first"][r["model"]]["min"], cmp["speedup_vs_first"][r["model"]]["max"]]
    for name, note in notes.items():
        rows.append({"arch": arch, "model": name, "note": note})
    res = {"arch": arch, "description": user_archs.ARCHS[arch][1],
           "params": sum(p.numel() for p in user_archs.build(arch).parameters()), "rows": rows,
           "latency_method": cmp["method"], "edgec_parity": {
               "ptq": ptq.artifacts["model_compressed"]["parity"]["top1_agreement"],
               "qat": qat.artifacts["model_compressed"]["parity"]["top1_agreement"]}}
    done.write_text(json.dumps(res, indent=2))
    for r in rows:
        if "note" not in r:
            log(f"{arch:18s} {r['model']:20s} acc {r['accuracy'] * 100:6.2f}  agree {r['agreement_fp32'] * 100:6.2f}  "
                f"int {r['integer_kernels']:>6s}  x{r['speedup_vs_fp32']:.2f}")
    return res


def quantize_all(archs: list[str], spec: str, data, args) -> int:
    from edgec.data import to_numpy

    ex, ey = to_numpy(data.eval)
    results = [quantize_one(a, spec, data, ex, ey, args) for a in archs]
    rows = [r for res in results for r in res["rows"]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"task": "CIFAR-10 (JPEG q75 copy), user-style architectures (benchmarks/user_archs.py)",
            "budget": {"fp32_epochs": args.epochs, "fp32_samples_per_epoch": args.samples,
                       "qat_epochs": args.qat_epochs, "qat_samples": args.qat_samples,
                       "calibration": "the 512 samples of edgec's seeded calibration manifest, for every tool"},
            "measured": "every artifact in ONNX Runtime CPU, 1 thread, full 10k test set; latency batch 1, "
                        "all artifacts of an architecture in one interleaved run",
            "archs": {r["arch"]: {"description": r["description"], "params": r["params"],
                                  "edgec_parity": r["edgec_parity"]} for r in results}}
    (RESULTS / f"{STEM}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = ["arch", "model", "accuracy", "agreement_fp32", "integer_kernels", "p50_ms_b1", "speedup_vs_fp32", "note"]
    with open(RESULTS / f"{STEM}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows)
    return 0


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows))
    tools = ["edgec ptq-int8", "edgec qat-int8", "ORT quantize_static", "NNCF PTQ"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.2
    for k, tool in enumerate(tools):
        vals = [next((r for r in rows if r["arch"] == a and r["model"] == tool and "note" not in r), None) for a in archs]
        xs = [i + (k - 1.5) * width for i in range(len(archs))]
        axes[0].bar(xs, [100 * v["agreement_fp32"] if v else 0 for v in vals], width, label=tool)
        axes[1].bar(xs, [v["speedup_vs_fp32"] if v else 0 for v in vals], width, label=tool)
    for ax, lab in ((axes[0], "top-1 agreement with FP32 (%)"), (axes[1], "speed-up vs FP32, batch 1, 1 thread")):
        ax.set_xticks(range(len(archs)))
        ax.set_xticklabels(archs, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(lab)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(88, 100)
    axes[1].axhline(1.0, color="k", lw=0.8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=9, bbox_to_anchor=(0.5, 0.93))
    fig.suptitle("User models on CIFAR-10: int8 in ONNX Runtime (missing bar = tool failed on the model)")
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(RESULTS / f"{STEM}.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("train", "quantize", "all"), default="all")
    ap.add_argument("--archs", nargs="*", default=None)
    ap.add_argument("--epochs", type=int, default=3, help="FP32 epochs per architecture")
    ap.add_argument("--samples", type=int, default=12000, help="FP32 training images per epoch")
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--qat-samples", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200, help="timed calls per model per round (batch 1)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    spec = cifar10_spec()
    if spec is None:
        return 2
    import torch

    import user_archs
    from edgec.data import load_data

    torch.set_num_threads(args.threads)
    archs = args.archs or list(user_archs.ARCHS)
    data = load_data(spec, seed=0)
    for arch in archs:
        train_baseline(arch, data, epochs=args.epochs, samples=args.samples)
    if args.phase == "train":
        return 0
    return quantize_all(archs, spec, data, args)


if __name__ == "__main__":
    sys.exit(main())

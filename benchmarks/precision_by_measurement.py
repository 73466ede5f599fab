"""Precision chosen by measurement (issue 14): FP32 vs uniform int8 vs edgec's automatic precision vs NNCF.

Rows per model, every artifact measured in ONNX Runtime (CPU, 1 thread):

  kws    BC-ResNet-1/3/8 on the Speech Commands speaker split (kws_audio.py's data and FP32 baselines):
         FP32 | int8 uniform (qat-int8, norm_bits 8, ``precision.keep_slow_float: false``) | int8 auto
         (the same recipe, the default ``precision`` block: layers whose integer kernel is measured
         slower than float stay float) | int8 auto + ``max_drop`` | NNCF quantize_with_accuracy_control
         (ONNX backend, the same tolerance).
  cifar  ResNet-20 on CIFAR-10 from benchmarks/baselines/resnet20-cifar10-e30-s0.pt (--resnet-baseline):
         the same five rows, plus W4A4 QAT (first conv / classifier at 8 bits) uniform vs auto +
         ``max_drop`` (layers promoted to 8 bits until the tolerance holds).

Columns: top-1 on the eval split; p50 latency at batch 1 and the speed-up vs FP32, all artifacts of a
model in ONE interleaved run (edgec.bench.compare); weight bytes at the deployed width; peak activation
memory at batch 1 on the graph ORT runs (edgec.export.graph_stats); integer kernels; the layers kept
float / promoted (RUN_DIR/stages/stage0.precision.json). A row that fails (an edgec without the
``precision`` block, NNCF refusing a model) is a row with a ``note``.

    EDGEC_DATA=../shared/data python benchmarks/precision_by_measurement.py                 # full budget
    EDGEC_DATA=../shared/data python benchmarks/precision_by_measurement.py --quick --part kws --models bcresnet1

Resumable: each row's run directory benchmarks/work/precision/<row>/ is reused when it finished with the
same recipe and weights (--quick: benchmarks/work/quick/precision/). Writes
benchmarks/results/{kws-bcresnet,cifar10-resnet20}-precision-ort-cpu.{json,csv,png} (rows of models not
measured in this call are kept from the file); --quick writes them to benchmarks/work/quick/ instead.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cifar10_int8 import cifar10_root, log  # noqa: E402
from kws_audio import WORK as KWS_WORK, export_fp32, fp32_baseline, machine, write_table  # noqa: E402
from nncf_accuracy_control import calib_and_val, failure_note, nncf_ac, sha  # noqa: E402

RESULTS = HERE / "results"
STEMS = {"kws": "kws-bcresnet-precision-ort-cpu", "cifar": "cifar10-resnet20-precision-ort-cpu"}
MODELS = {"kws": ("bcresnet1", "bcresnet3", "bcresnet8"), "cifar": ("resnet20",)}
INT_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger")


# ----------------------------------------------------------------------------------------- recipes
def precision_supported() -> bool:
    """Whether this edgec's quantizing stages take the ``precision`` block (issue 14)."""
    from edgec.stages.registry import get_method

    return "precision" in get_method("qat").config.model_fields


def stage_recipe(base: str, name: str, stage: dict, precision: dict | None) -> dict:
    """The shipped recipe ``base`` with stage 0 updated by ``stage`` (+ ``precision``); the run's own
    bench and gates off (every artifact is measured below, alike)."""
    import yaml

    from edgec.recipe import shipped_recipes

    rec = yaml.safe_load(shipped_recipes()[base].read_text())
    st = {**rec["stages"][0], **{k: v for k, v in stage.items() if v is not None}}
    if precision is not None:
        st["precision"] = precision
    rec.update(name=name, description=f"benchmark row {name} (issue 14)", stages=[st],
               export={"min_fidelity": None}, bench={"enabled": False, "max_drop": None})
    return rec


def variants(model: str, bits: str, base: str, stage: dict, modes: tuple[str, ...], max_drop: float) -> list[dict]:
    """Rows {row, slug, bits, mode, recipe} of one bit width. ``uniform`` is ``keep_slow_float: false``
    (on an edgec without the block: no block, which is today's uniform quantization)."""
    uniform = {"keep_slow_float": False} if precision_supported() else None
    blocks = {"uniform": uniform, "auto": {"keep_slow_float": True},
              "auto+max_drop": {"keep_slow_float": True, "max_drop": max_drop},
              "max_drop": {"keep_slow_float": False, "max_drop": max_drop}}  # accuracy only, no speed rule
    out = []
    for mode in modes:
        label = f"{bits} {mode}" + (f" {max_drop:g}" if "max_drop" in mode else "")
        slug = f"{model}-{bits.lower()}-{mode.replace('+max_drop', f'-drop{max_drop:g}')}"
        if mode == "max_drop":
            slug = f"{model}-{bits.lower()}-accuracy-only-drop{max_drop:g}"
        out.append({"row": label, "slug": slug, "bits": bits, "mode": mode,
                    "recipe": stage_recipe(base, slug, stage, blocks[mode])})
    return out


def kws_rows(model: str, args) -> list[dict]:
    if args.kws_method == "ptq":
        return variants(model, "W8A8", "ptq-int8", {"norm_bits": 8}, ("uniform", "auto", "auto+max_drop"),
                        args.max_drop)
    stage = {"epochs": args.kws_qat_epochs, "norm_bits": 8, "max_train_samples": args.kws_qat_samples}
    return variants(model, "W8A8", "qat-int8", stage, ("uniform", "auto", "auto+max_drop"), args.max_drop)


def cifar_rows(model: str, args) -> list[dict]:
    int8 = {"epochs": args.int8_epochs, "max_train_samples": args.int8_samples}
    w4 = {"weight_bits": 4, "act_bits": 4, "first_layer_bits": 8, "last_layer_bits": 8, "epochs": args.w4_epochs,
          "lr": args.w4_lr, "max_train_samples": args.w4_samples}
    w4_rows = variants(model, "W4A4", "qat-int8", w4, ("uniform",), args.max_drop)
    for d in args.w4_max_drops or [args.max_drop]:
        w4_rows += variants(model, "W4A4", "qat-int8", w4, ("auto+max_drop",), d)
    for d in args.w4_accuracy_only_drops:
        w4_rows += variants(model, "W4A4", "qat-int8", w4, ("max_drop",), d)
    return variants(model, "W8A8", "qat-int8", int8, ("uniform", "auto", "auto+max_drop"), args.max_drop) + w4_rows


# -------------------------------------------------------------------------------------------- runs
def run_edgec(model: str, weights: Path, spec: str, row: dict, work: Path) -> dict:
    """One edgec row (kept as work/<slug>/row.json once it finished; failures are not kept, so a
    rerun after the code changed tries again)."""
    import edgec

    out = work / row["slug"]
    done = out / "row.json"
    if done.is_file():
        prev = json.loads(done.read_text())
        if prev.get("recipe") == row["recipe"] and prev.get("weights_sha") == sha(weights):
            log(f"{row['slug']}: reusing the finished run")
            return prev
        log(f"{row['slug']}: recipe or weights changed, running again")
    t = time.perf_counter()
    try:
        res = edgec.compress(model, spec, copy.deepcopy(row["recipe"]), out=out, weights=str(weights),
                             device="cpu", force=True)
    except Exception as e:  # noqa: BLE001 - a failing row is a result (recorded as its note)
        log(f"{row['slug']}: {failure_note(e)}")
        return {"note": failure_note(e)}
    art = res.artifacts["model_compressed"]
    info = {"recipe": row["recipe"], "weights_sha": sha(weights), "wall_s": round(time.perf_counter() - t),
            "path": str(art["path"]), "run_dir": str(out),
            "parity_top1_vs_pytorch": (art.get("parity") or {}).get("top1_agreement")}
    done.write_text(json.dumps(info, indent=2))
    log(f"{row['slug']}: done in {info['wall_s']} s")
    return info


def fp32_artifact(model: str, weights: Path, data, work: Path) -> Path:
    """The one FP32 reference of a model (kws_audio's export), rebuilt when the weights change."""
    from edgec.models import create_model, load_weights

    out = work / f"{model}-fp32"
    path, stamp = out / "model_fp32.onnx", out / "weights.sha"
    if not (path.is_file() and stamp.is_file() and stamp.read_text() == sha(weights)):
        out.mkdir(parents=True, exist_ok=True)
        export_fp32(load_weights(create_model(model, num_classes=data.num_classes), weights), path, data)
        stamp.write_text(sha(weights))
    return path


# ------------------------------------------------------------------------------------------ measure
def precision_counts(run_dir: str | None) -> dict:
    """Layers kept float / promoted, from the stage's decision file (empty when it has none)."""
    path = Path(run_dir or "/nonexistent") / "stages" / "stage0.precision.json"
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    layers, over = doc.get("layers", {}), doc.get("chosen_overrides", [])
    return {"layers": len(layers), "layers_float": sum(v == "float" for v in layers.values()),
            "layers_8bit": sum(v == "8 bit" for v in layers.values()),
            "kept_float_for_speed": sum(bool(o.get("keep_float")) and o.get("reason") != "accuracy tolerance"
                                        for o in over),
            "at_8bit_for_speed": sum(not o.get("keep_float") and o.get("reason") != "accuracy tolerance" for o in over),
            "promoted_for_accuracy": sum(o.get("reason") == "accuracy tolerance" for o in over),
            "after_training": (doc.get("after_training") or {}).get("accuracy"),
            "after_export": (doc.get("after_export") or {}).get("accuracy"),
            "decision_uniform_speedup": doc.get("uniform_speedup"),
            "decision_chosen_speedup": doc.get("chosen_speedup"), "decision_latency": doc.get("latency")}


def peak_bytes(path: Path) -> int | None:
    try:
        from edgec.export.graph_stats import peak_activation_memory
    except ImportError:
        return None
    try:
        return int(peak_activation_memory(path, batch=1, ort_optimized=True)["peak_bytes"])
    except Exception:  # noqa: BLE001 - the column stays empty, the row does not fail
        return None


def measure(part: str, model: str, entries: dict[str, dict], ex, ey, args) -> list[dict]:
    """One row per entry; every artifact's top-1, bytes, peak; latency of all in one interleaved run."""
    from edgec import runtime
    from edgec.bench.compare import compare_latency
    from edgec.export.check import fused_ops
    from edgec.export.size import onnx_weight_stats

    files = {n: Path(e["path"]) for n, e in entries.items() if e.get("path")}
    log(f"{model}: latency of {len(files)} artifacts, {args.rounds} interleaved rounds x {args.runs} calls")
    cmp = compare_latency(files, threads=1, batch=1, warmup=20, runs=args.runs, rounds=args.rounds, sample=ex[:1])
    rows = []
    for name, e in entries.items():
        row = {"part": part, "model": model, "row": name, "bits": e["bits"], "mode": e["mode"]}
        if name in files:
            path = files[name]
            pred = runtime.predict(runtime.load_session(path, threads=1), ex).argmax(1)
            compute, integer, _ = fused_ops(path)
            s = cmp["speedup_vs_first"][name]
            row.update({"accuracy": float((pred == ey).mean()), "samples": int(len(ey)),
                        "p50_ms_b1": cmp["models"][name]["p50_ms"], "speedup_vs_fp32": s["median"],
                        "speedup_range": [s["min"], s["max"]],
                        "weight_bytes_deployed": onnx_weight_stats(path)["weight_bytes_deployed"],
                        "peak_activation_bytes": peak_bytes(path),
                        "integer_kernels": f"{sum(integer.get(k, 0) for k in INT_KERNELS)}/{compute}",
                        **precision_counts(e.get("run_dir"))})
        for k in ("wall_s", "parity_top1_vs_pytorch", "note"):
            if e.get(k) is not None:
                row[k] = e[k]
        rows.append(row)
    ref = {r["bits"]: r for r in rows if r["mode"] == "uniform" and "accuracy" in r}
    for r in rows:
        if "accuracy" in r:
            r["delta_pt_vs_fp32"] = 100 * (r["accuracy"] - rows[0]["accuracy"])
            if r["bits"] in ref:
                r["delta_pt_vs_uniform"] = 100 * (r["accuracy"] - ref[r["bits"]]["accuracy"])
    return rows


def run_model(part: str, model: str, weights: Path, spec: str, data, specs: list[dict], args, work: Path):
    from edgec.data import to_numpy

    entries = {"fp32": {"bits": "FP32", "mode": "fp32", "path": str(fp32_artifact(model, weights, data, work))}}
    for row in specs:
        entries[row["row"]] = {"bits": row["bits"], "mode": row["mode"], **run_edgec(model, weights, spec, row, work)}
        if row["bits"] == "W8A8" and row["mode"] == "auto+max_drop" and not args.skip_nncf:
            cx, vx, vy = calib_and_val(data.train, args.calib_samples, args.val_samples, args.seed)
            nn = nncf_ac(Path(entries["fp32"]["path"]), cx, vx, vy, args.max_drop,
                         work / f"{model}-nncf-ac-drop{args.max_drop:g}")
            entries[f"NNCF AC {args.max_drop:g}"] = {"bits": "W8A8", "mode": "nncf-ac", **nn}
    ex, ey = to_numpy(data.eval)
    rows = measure(part, model, entries, ex, ey, args)
    for r in rows:
        if "accuracy" in r:
            log(f"{model:10s} {r['row']:22s} top-1 {100 * r['accuracy']:6.2f}  x{r['speedup_vs_fp32']:.2f}  "
                f"{r['weight_bytes_deployed']:>8,} B  float/8-bit {r.get('layers_float', '-')}/"
                f"{r.get('layers_8bit', '-')}")
        else:
            log(f"{model:10s} {r['row']:22s} {r['note']}")
    return rows


# -------------------------------------------------------------------------------------------- parts
def part_kws(models: list[str], args, work: Path) -> list[dict] | None:
    import os

    from edgec.data import load_data

    root = os.environ.get("EDGEC_DATA")
    if not root or not (Path(root) / "speech_commands_v2_test").is_dir():
        print("EDGEC_DATA must point at a folder with speech_commands_v2_test/: skipping the kws part", file=sys.stderr)
        return None
    base = SimpleNamespace(epochs=args.kws_epochs, max_train=args.kws_max_train, seed=args.seed)
    kws_work = KWS_WORK / ("quick" if args.quick else "full")  # kws_audio.py's baselines, shared
    kws_work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in models:
        weights, spec = fp32_baseline(Path(root), int(model.removeprefix("bcresnet")), base, kws_work)
        rows += run_model("kws", model, weights, spec, load_data(spec, seed=args.seed), kws_rows(model, args),
                          args, work)
    return rows


def part_cifar(models: list[str], args, work: Path) -> list[dict] | None:
    from edgec.data import load_data

    root = cifar10_root()
    if root is None:
        return None
    if not args.resnet_baseline.is_file():
        print(f"no ResNet-20 baseline at {args.resnet_baseline} (benchmarks/resnet20_baseline.py trains it, or pass "
              "--resnet-baseline PATH): skipping the ResNet rows", file=sys.stderr)
        return None
    spec = f"cifar10:{root}"
    data = load_data(spec, seed=args.seed)
    return [r for m in models for r in run_model("cifar", m, args.resnet_baseline, spec, data, cifar_rows(m, args),
                                                 args, work)]


# ------------------------------------------------------------------------------------------ results
def save(part: str, rows: list[dict], meta: dict, out: Path) -> None:
    """Write the part's table; rows of models not measured in this call are kept from the file."""
    path = out / f"{STEMS[part]}.json"
    measured = sorted({r["model"] for r in rows})
    if path.is_file():
        kept = [r for r in json.loads(path.read_text())["rows"] if r["model"] not in measured]
        rows = kept + rows
        meta["kept_from_an_earlier_call"] = sorted({r["model"] for r in kept})
    meta["measured_in_this_call"] = measured
    write_table(out, STEMS[part], meta, rows)
    plot(rows, out / f"{STEMS[part]}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    marks = {"fp32": "o", "uniform": "s", "auto": "^", "auto+max_drop": "D", "max_drop": "v", "nncf-ac": "x"}
    fig, axes = plt.subplots(1, len(models), figsize=(max(7.0, 4.6 * len(models)), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in rows if r["model"] == model and "accuracy" in r):
            ax.scatter(r["speedup_vs_fp32"], 100 * r["accuracy"], marker=marks.get(r["mode"], "."), s=50,
                       color="tab:blue" if r["bits"] != "W4A4" else "tab:orange")
            ax.annotate(r["row"], (r["speedup_vs_fp32"], 100 * r["accuracy"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(model)
        ax.set_xlabel("speed-up vs FP32, ORT batch 1, 1 thread")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 in ORT on the eval split (%)")
    fig.suptitle("uniform vs automatic precision in ORT (orange: W4A4)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def meta_of(part: str, args) -> dict:
    task = {"kws": "Speech Commands v2 test set, 12 classes, speaker-hash split (3,867 train / 602 eval clips)",
            "cifar": "CIFAR-10 (JPEG q75 copy), resnet20 (option-B shortcuts), 10,000 test images"}[part]
    budget = ({"fp32_epochs": args.kws_epochs, "fp32_max_train": args.kws_max_train, "method": args.kws_method,
               "qat_epochs": args.kws_qat_epochs, "qat_samples": args.kws_qat_samples, "norm_bits": 8}
              if part == "kws" else
              {"baseline": args.resnet_baseline.name, "int8_qat": [args.int8_epochs, args.int8_samples],
               "w4a4_qat": [args.w4_epochs, args.w4_samples, args.w4_lr], "w4a4_first_last_bits": 8})
    return {"task": task, "budget": {**budget, "seed": args.seed, "quick": args.quick}, "max_drop": args.max_drop,
            "precision_block_in_this_edgec": precision_supported(),
            "nncf": {"api": "quantize_with_accuracy_control, ONNX backend, DropType.ABSOLUTE, target CPU",
                     "calibration_samples": args.calib_samples,
                     "validation": f"{args.val_samples} held-out training samples (not the eval split)"},
            "latency": {"runs": args.runs, "rounds": args.rounds, "batch": 1, "threads": 1,
                        "how": "edgec.bench.compare: every artifact of a model in one interleaved run"},
            "peak_activation": "edgec.export.graph_stats.peak_activation_memory(batch 1, ort_optimized=True)",
            **machine()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("kws", "cifar", "all"), default="all")
    ap.add_argument("--models", nargs="*", default=None, help="subset of bcresnet1 bcresnet3 bcresnet8 resnet20")
    ap.add_argument("--quick", action="store_true", help="tiny budget (minutes): checks the driver; never results/")
    ap.add_argument("--max-drop", type=float, default=0.005, help="top-1 tolerance vs FP32 (share), edgec and NNCF")
    ap.add_argument("--kws-epochs", type=int, default=20, help="FP32 BC-ResNet epochs (kws_audio's baselines)")
    ap.add_argument("--kws-max-train", type=int, default=None)
    ap.add_argument("--kws-method", choices=("qat", "ptq"), default="qat")
    ap.add_argument("--kws-qat-epochs", type=int, default=2)
    ap.add_argument("--kws-qat-samples", type=int, default=None, help="QAT clips per epoch (default: all)")
    ap.add_argument("--resnet-baseline", type=Path, default=HERE / "baselines" / "resnet20-cifar10-e30-s0.pt")
    ap.add_argument("--int8-epochs", type=int, default=1)
    ap.add_argument("--int8-samples", type=int, default=20000)
    ap.add_argument("--w4-epochs", type=int, default=3)
    ap.add_argument("--w4-samples", type=int, default=10000)
    ap.add_argument("--w4-lr", type=float, default=1e-3)
    ap.add_argument("--w4-max-drops", type=float, nargs="*", default=None,
                    help="W4A4 auto rows, one per tolerance (default: --max-drop)")
    ap.add_argument("--w4-accuracy-only-drops", type=float, nargs="*", default=[],
                    help="W4A4 rows with max_drop and keep_slow_float false (the tolerance alone), one per value")
    ap.add_argument("--calib-samples", type=int, default=512, help="NNCF calibration samples")
    ap.add_argument("--val-samples", type=int, default=1000, help="NNCF validation samples (held-out train)")
    ap.add_argument("--skip-nncf", action="store_true")
    ap.add_argument("--runs", type=int, default=200, help="timed calls per artifact per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.kws_epochs, args.kws_max_train, args.kws_qat_epochs, args.kws_qat_samples = 1, 200, 1, 100
        args.int8_samples, args.w4_epochs, args.w4_samples = 500, 1, 500
        args.calib_samples, args.val_samples, args.runs, args.rounds = 64, 100, 20, 1
    parts = ("kws", "cifar") if args.part == "all" else (args.part,)
    unknown = set(args.models or ()) - {m for p in parts for m in MODELS[p]}
    if unknown:
        print(f"--models: {sorted(unknown)} not in part(s) {parts}: choose from "
              f"{[m for p in parts for m in MODELS[p]]}", file=sys.stderr)
        return 2
    import os

    import torch

    os.environ.setdefault("EDGEC_NO_PROGRESS", "1")
    torch.set_num_threads(args.threads)
    out = HERE / "work" / "quick" if args.quick else RESULTS
    work = HERE / "work" / ("quick/precision" if args.quick else "precision")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for part in parts:
        models = [m for m in MODELS[part] if args.models is None or m in args.models]
        if not models:
            continue
        rows = (part_kws if part == "kws" else part_cifar)(models, args, work)
        if rows:
            save(part, rows, meta_of(part, args), out)
    log(f"done in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

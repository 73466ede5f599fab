"""CIFAR-10 / ResNet-20: channel pruning that makes the exported model faster (issue 13).

Every row starts from the committed baseline ``benchmarks/baselines/resnet20-cifar10-e30-s0.pt``
(``benchmarks/resnet20_baseline.py``; ``--baseline`` for another) and gets the same fine-tuning
budget (``--ft-epochs`` x ``--ft-samples``, SGD, cosine, KD from the unpruned baseline):

* ``fp32``                   the baseline exported as is
* ``int8 ptq``               edgec ``ptq-int8`` on the baseline
* ``edgec ch {r}x``          edgec's ``prune_channels`` stage (L2 group magnitude, global, iterative,
                             KD) to 1/r of the baseline's MACs, FP32 export
* ``edgec ch {r}x + int8``   that pruned model through ``qat-int8`` (``--qat-epochs`` x ``--qat-samples``)
* ``TP MetaPruner {r}x``     Torch-Pruning's own pruner (``tp.pruner.MetaPruner``, its
                             ``GroupMagnitudeImportance``, global, the same MAC ratio, one shot), then
                             the same fine-tuning through edgec's ``distill`` stage

Every artifact is measured in ONNX Runtime (CPU, 1 thread): top-1 on the full 10,000-image test set;
latency at batch 1 and 32, all artifacts of a batch size in ONE interleaved run (edgec.bench.compare);
MACs and parameters counted on the exported ONNX graph (edgec.export.graph_stats); weight bytes at
the deployed bit width. Finished rows are kept in ``benchmarks/work/prune_channels/``; a rerun
continues.

    EDGEC_DATA=../shared/data nice python benchmarks/cifar10_prune_channels.py [--ratios 2 3]

Writes benchmarks/results/cifar10-resnet20-channels-ort-cpu.{json,csv,png}.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cifar10_int8 import cifar10_root, log  # noqa: E402

RESULTS = HERE / "results"
WORK = HERE / "work" / "prune_channels"
STEM = "cifar10-resnet20-channels-ort-cpu"


def _fine_tune(args, *, method: str, baseline: Path) -> dict:
    """The fine-tuning settings every pruned row shares (a stage dict without ``method``)."""
    return {"epochs": args.ft_epochs, "max_train_samples": args.ft_samples, "batch_size": 128, "optimizer": "sgd",
            "lr": args.ft_lr, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine",
            "kd": {"teacher": "resnet20", "teacher_weights": str(baseline), "temperature": 4.0, "alpha": 0.7}}


def _qat(args) -> dict:
    """The QAT stage every "+ int8" row shares."""
    return {"method": "qat", "epochs": args.qat_epochs, "max_train_samples": args.qat_samples, "batch_size": 64,
            "lr": 5e-4, "optimizer": "sgd", "kd": {"teacher": "input", "temperature": 4.0, "alpha": 0.5}}


def _recipe(name: str, stages: list[dict]) -> dict:
    return {"version": 1, "name": name, "description": f"benchmark row {name}", "target": "x86", "stages": stages,
            "export": {"min_fidelity": 0.0}, "bench": {"enabled": False, "max_drop": 1.0}}


def _compress(model, spec: str, recipe: dict, out: Path, weights: Path | None = None):
    import edgec

    return edgec.compress(model, spec, recipe, out=out, weights=str(weights) if weights else None, force=True)


def tp_meta_pruner(model, macs_ratio: float):
    """Torch-Pruning's MetaPruner with GroupMagnitudeImportance (L2), global, classifier ignored; the
    channel ratio found by bisection so the MACs come to ``macs_ratio`` of the input's (its ratio is
    per channel, MACs fall about quadratically)."""
    import torch
    import torch_pruning as tp

    ex = torch.zeros(1, 3, 32, 32)
    base, _ = tp.utils.count_ops_and_params(model, ex)

    def prune(ratio: float):
        m = copy.deepcopy(model).eval()
        pruner = tp.pruner.MetaPruner(m, ex, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      global_pruning=True, pruning_ratio=ratio, ignored_layers=[m.fc])
        pruner.step()
        return m, tp.utils.count_ops_and_params(m, ex)[0] / base

    lo, hi = 0.0, 0.95
    best = None
    for _ in range(14):
        mid = (lo + hi) / 2
        m, r = prune(mid)
        if r > macs_ratio:
            lo = mid
        else:
            hi, best = mid, (m, r, mid)
    return best


def pruned_rows(args, spec: str, baseline: Path) -> dict[str, Path]:
    """{row name: ONNX artifact}, each run kept under WORK (a finished run is reused)."""
    import torch

    from edgec.models import create_model, load_weights
    from edgec.runs import rebuild_model

    files: dict[str, Path] = {}
    ptq_dir = WORK / "int8-ptq"
    if not (ptq_dir / "export" / "model_compressed.onnx").is_file():
        _compress("resnet20", spec, "ptq-int8", ptq_dir, weights=baseline)
    files["fp32"] = ptq_dir / "export" / "model_fp32.onnx"
    files["int8 ptq"] = ptq_dir / "export" / "model_compressed.onnx"
    for r in args.ratios:
        ft = _fine_tune(args, method="prune_channels", baseline=baseline)
        ch_dir = WORK / f"edgec-ch{r:g}x"
        if not (ch_dir / "export" / "model_compressed.onnx").is_file():
            t = time.perf_counter()
            _compress("resnet20", spec, _recipe(f"ch{r:g}x", [{
                "method": "prune_channels", "target_macs": round(1 / r, 4), "importance": "l2", "scope": "global",
                "steps": args.steps, "round_to": args.round_to, **ft}]), ch_dir, weights=baseline)
            log(f"edgec ch {r:g}x: {time.perf_counter() - t:.0f} s")
        files[f"edgec ch {r:g}x"] = ch_dir / "export" / "model_compressed.onnx"
        if args.matched:  # edgec's stage at Torch-Pruning's settings: one shot, no rounding, first layer pruned
            m_dir = WORK / f"edgec-ch{r:g}x-tp-settings"
            if not (m_dir / "export" / "model_compressed.onnx").is_file():
                t = time.perf_counter()
                _compress("resnet20", spec, _recipe(f"ch{r:g}x-tp-settings", [{
                    "method": "prune_channels", "target_macs": round(1 / r, 4), "importance": "l2", "scope": "global",
                    "steps": 1, "round_to": None, "prune_first_last": True, **ft}]), m_dir, weights=baseline)
                log(f"edgec ch {r:g}x at TP's settings: {time.perf_counter() - t:.0f} s")
            files[f"edgec ch {r:g}x, TP's settings"] = m_dir / "export" / "model_compressed.onnx"
        if args.ignore:  # channels kept whole in the modules the globs name (e.g. the 32x32 stage), then int8
            tag = "+".join(args.ignore)
            i_dir = WORK / f"edgec-ch{r:g}x-ignore-{tag.replace('*', 'x').replace('.', '_')}"
            if not (i_dir / "export" / "model_compressed.onnx").is_file():
                _compress("resnet20", spec, _recipe(f"ch{r:g}x-ignore", [{
                    "method": "prune_channels", "target_macs": round(1 / r, 4), "importance": "l2", "scope": "global",
                    "steps": 1, "round_to": args.round_to, "ignore": list(args.ignore), **ft}]), i_dir, weights=baseline)
            files[f"edgec ch {r:g}x, 1 step, ignore {tag}"] = i_dir / "export" / "model_compressed.onnx"
            iq_dir = i_dir.with_name(i_dir.name + "-int8")
            if not (iq_dir / "export" / "model_compressed.onnx").is_file():
                _compress(rebuild_model(i_dir, "final"), spec, _recipe(f"ch{r:g}x-ignore-int8", [_qat(args)]), iq_dir)
            files[f"edgec ch {r:g}x, 1 step, ignore {tag} + int8"] = iq_dir / "export" / "model_compressed.onnx"
        for n in args.also_steps:  # the same budget in another number of rounds (FP32 rows only)
            s_dir = WORK / f"edgec-ch{r:g}x-s{n}"
            if not (s_dir / "export" / "model_compressed.onnx").is_file():
                t = time.perf_counter()
                _compress("resnet20", spec, _recipe(f"ch{r:g}x-s{n}", [{
                    "method": "prune_channels", "target_macs": round(1 / r, 4), "importance": "l2", "scope": "global",
                    "steps": n, "round_to": args.round_to, **ft}]), s_dir, weights=baseline)
                log(f"edgec ch {r:g}x, {n} step(s): {time.perf_counter() - t:.0f} s")
            files[f"edgec ch {r:g}x, {n} step{'s' if n > 1 else ''}"] = s_dir / "export" / "model_compressed.onnx"
        q_dir = WORK / f"edgec-ch{r:g}x-int8"
        if not (q_dir / "export" / "model_compressed.onnx").is_file():
            pruned = rebuild_model(ch_dir, "final")
            _compress(pruned, spec, _recipe(f"ch{r:g}x-int8", [_qat(args)]), q_dir)
        files[f"edgec ch {r:g}x + int8"] = q_dir / "export" / "model_compressed.onnx"
        tp_dir = WORK / f"tp-ch{r:g}x"
        if not (tp_dir / "export" / "model_compressed.onnx").is_file():
            m, got, ratio = tp_meta_pruner(load_weights(create_model("resnet20", num_classes=10), baseline), 1 / r)
            log(f"TP MetaPruner {r:g}x: channel ratio {ratio:.3f} -> MACs x{got:.3f}")
            torch.manual_seed(0)
            _compress(m, spec, _recipe(f"tp{r:g}x", [{"method": "distill", **ft}]), tp_dir)
            (tp_dir / "tp_pruner.json").write_text(json.dumps({"pruning_ratio": ratio, "macs_ratio": got}))
        files[f"TP MetaPruner {r:g}x"] = tp_dir / "export" / "model_compressed.onnx"
    files.update(latency_rows(args, spec, baseline))
    return files


def latency_rows(args, spec: str, baseline: Path) -> dict[str, Path]:
    """``--latency-ratios``: prune_channels to a share of the *int8* model's measured latency (the stage
    measures the recipe's quantized graph), then the same QAT as the int8 rows, in one recipe; once
    with channels selected by importance alone and once by importance per measured microsecond
    (``select: latency``). A budget the stage cannot reach is logged and the row left out."""
    from edgec.errors import EdgecError

    files: dict[str, Path] = {}
    ft = _fine_tune(args, method="prune_channels", baseline=baseline)
    qat = _qat(args)
    todo = [("target_latency_ratio", ratio, select) for ratio in args.latency_ratios for select in args.latency_selects]
    todo += [("target_macs", m, "latency") for m in args.select_latency_macs]
    for target, value, select in todo:
        if target == "target_macs":
            d = WORK / f"edgec-macs{value:g}-select-latency"
            name = f"edgec ch {1 / value:.3g}x, select latency + int8"
        else:
            d = WORK / f"edgec-int8lat{value:g}-{select}"
            name = f"edgec int8 latency x{value:g}, select {select} + int8"
        failed = d / "failed.txt"
        if failed.is_file():
            log(f"{name}: {failed.read_text().strip()}")
            continue
        if not (d / "export" / "model_compressed.onnx").is_file():
            t = time.perf_counter()
            try:
                _compress("resnet20", spec, _recipe(d.name, [{
                    "method": "prune_channels", target: value, "select": select,
                    "importance": "l2", "scope": "global", "steps": args.steps, "max_extra_steps": 2,
                    "round_to": args.round_to, **ft}, qat]), d, weights=baseline)
            except EdgecError as exc:
                d.mkdir(parents=True, exist_ok=True)
                failed.write_text(str(exc))
                log(f"{name}: {exc}")
                continue
            log(f"{name}: {time.perf_counter() - t:.0f} s")
        files[name] = d / "export" / "model_compressed.onnx"
    return files


def depthwise_rows(args, spec: str) -> dict[str, Path]:
    """The depthwise row: benchmarks/user_archs.py's MobileNetV2-style model (inverted residuals, ReLU6,
    a forward flag) from its user_models.py baseline, as a user model FILE through the shipped
    ``prune-channels-int8`` recipe (same fine-tuning budget) next to int8 alone (``ptq-int8``)."""
    weights = HERE / "work" / "user_models" / "mobilenetv2-flag.pt"
    if not weights.is_file():
        log(f"no {weights}: run benchmarks/user_models.py --phase train --archs mobilenetv2-flag first; no depthwise row")
        return {}
    model = f"{HERE / 'user_archs.py'}:mobilenetv2_flag"
    files = {}
    ptq = WORK / "mbv2-int8-ptq"
    if not (ptq / "export" / "model_compressed.onnx").is_file():
        _compress(model, spec, "ptq-int8", ptq, weights=weights)
    files["mbv2 fp32"] = ptq / "export" / "model_fp32.onnx"
    files["mbv2 int8 ptq"] = ptq / "export" / "model_compressed.onnx"
    old = WORK / "mbv2-ch2x-importance-int8"  # the recipe before select: latency (kept from an earlier call)
    if (old / "export" / "model_compressed.onnx").is_file():
        files["mbv2 ch 2x, select importance + int8"] = old / "export" / "model_compressed.onnx"
    half = WORK / "mbv2-ch2x-latency-int8"  # the shipped recipe at target_macs 0.5 (kept from an earlier call)
    if (half / "export" / "model_compressed.onnx").is_file():
        files["mbv2 ch 2x, select latency + int8"] = half / "export" / "model_compressed.onnx"
    ch = WORK / "mbv2-prune-channels-int8"
    if not (ch / "export" / "model_compressed.onnx").is_file():
        import edgec

        edgec.compress(model, spec, "prune-channels-int8", out=ch, weights=str(weights), force=True, overrides=[
            f"stages.0.epochs={args.ft_epochs}", f"stages.0.max_train_samples={args.ft_samples}",
            f"stages.0.round_to={args.round_to}", "stages.0.batch_size=128", f"stages.1.epochs={args.qat_epochs}",
            f"stages.1.max_train_samples={args.qat_samples}", "bench.enabled=false", "export.min_fidelity=0"])
    files["mbv2 ch 1.43x, select latency + int8 (prune-channels-int8)"] = ch / "export" / "model_compressed.onnx"
    return files


def measure(files: dict[str, Path], ex, ey, args) -> list[dict]:
    from edgec import runtime
    from edgec.bench.compare import compare_latency
    from edgec.export.graph_stats import graph_summary
    from edgec.export.size import onnx_weight_stats

    rows = []
    for name, path in files.items():
        pred = runtime.predict(runtime.load_session(path, threads=1), ex).argmax(1)
        g = graph_summary(path)
        rows.append({"model": name, "accuracy": float((pred == ey).mean()), "samples": int(len(ey)),
                     "macs": g["macs"], "params": g["params"], "peak_activation_bytes": g["peak_activation_bytes"],
                     "weight_bytes_deployed": onnx_weight_stats(path)["weight_bytes_deployed"]})
    for batch in (1, 32):
        cmp = compare_latency(files, threads=1, batch=batch, warmup=10, runs=args.runs if batch == 1 else args.runs // 8,
                              rounds=args.rounds, sample=ex[:batch])
        for r in rows:
            r[f"p50_ms_b{batch}"] = cmp["models"][r["model"]]["p50_ms"]
            s = cmp["speedup_vs_first"][r["model"]]
            r[f"speedup_b{batch}"] = s["median"]
            r[f"speedup_b{batch}_range"] = [s["min"], s["max"]]
    base = rows[0]
    for r in rows:
        r["delta_pt_vs_fp32"] = 100 * (r["accuracy"] - base["accuracy"])
        r["macs_vs_fp32"] = r["macs"] / base["macs"]
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        kind = "o" if "TP" in r["model"] else "s" if "int8" in r["model"] else "^"
        ax.scatter(r["speedup_b1"], 100 * r["accuracy"], marker=kind, s=60)
        ax.annotate(r["model"], (r["speedup_b1"], 100 * r["accuracy"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("speed-up vs ORT FP32, batch 1, 1 thread (interleaved run)")
    ax.set_ylabel("top-1 in ORT, CIFAR-10 test (%)")
    ax.grid(alpha=0.3)
    ax.set_title("ResNet-20: channel pruning x int8 in ONNX Runtime")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, default=HERE / "baselines" / "resnet20-cifar10-e30-s0.pt")
    ap.add_argument("--ratios", type=float, nargs="+", default=[2.0, 3.0], help="MAC reduction factors")
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--ft-samples", type=int, default=20000)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=3, help="iterative pruning steps of edgec's stage")
    ap.add_argument("--also-steps", type=int, nargs="*", default=[],
                    help="extra FP32 rows: edgec's stage with this many rounds (same total fine-tuning)")
    ap.add_argument("--matched", action="store_true",
                    help="extra FP32 rows: edgec's stage at Torch-Pruning's settings (1 step, no round_to, first layer "
                         "pruned), to separate the pruner from edgec's defaults")
    ap.add_argument("--ignore", nargs="*", default=[],
                    help="extra rows: edgec's stage (1 step) with these module globs kept whole, FP32 and + int8")
    ap.add_argument("--latency-selects", nargs="+", choices=("importance", "latency"), default=["importance", "latency"],
                    help="which selections --latency-ratios trains (two calls can train them side by side)")
    ap.add_argument("--select-latency-macs", type=float, nargs="*", default=[],
                    help="also prune to these MAC shares with select: latency (measured int8 cost), + int8 QAT")
    ap.add_argument("--train-only", action="store_true", help="train the missing rows, measure nothing")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--latency-ratios", type=float, nargs="*", default=[],
                    help="also prune to these shares of the int8 latency, selected by importance and by latency")
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--qat-samples", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", choices=("resnet", "depthwise", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="tiny budget, writes under benchmarks/work/quick/ only")
    args = ap.parse_args()
    global WORK, RESULTS
    if args.quick:
        WORK, RESULTS = HERE / "work" / "quick" / "prune_channels", HERE / "work" / "quick"
        args.ft_epochs, args.ft_samples, args.qat_samples, args.runs, args.rounds = 1, 512, 512, 20, 1
    root = cifar10_root()
    if root is None:
        return 2
    if args.part != "depthwise" and not args.baseline.is_file():
        print(f"no baseline at {args.baseline}: train it with benchmarks/resnet20_baseline.py", file=sys.stderr)
        return 2
    import torch

    from edgec.data import load_data, to_numpy

    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    spec = f"cifar10:{root}"
    t0 = time.perf_counter()
    ex, ey = to_numpy(load_data(spec, seed=0).eval, limit=500 if args.quick else None)
    dw = depthwise_rows(args, spec) if args.part in ("depthwise", "all") else {}
    if args.train_only:
        if args.part in ("resnet", "all"):
            pruned_rows(args, spec, args.baseline)
        return 0
    rows = measure(dw, ex, ey, args) if dw else []
    if args.part in ("resnet", "all"):
        rows = measure(pruned_rows(args, spec, args.baseline), ex, ey, args) + rows
    import onnxruntime
    import torch_pruning

    meta = {"task": "CIFAR-10 (JPEG q75 copy), resnet20 (option-B shortcuts)", "baseline": args.baseline.name,
            "budget": {"fine_tune_epochs": args.ft_epochs, "fine_tune_samples": args.ft_samples, "lr": args.ft_lr,
                       "kd": "from the unpruned baseline, T 4, alpha 0.7", "edgec_steps": args.steps, "also_steps": args.also_steps, "matched": args.matched, "ignore": args.ignore,
                       "latency_ratios": args.latency_ratios, "select_latency_macs": args.select_latency_macs,
                       "round_to": args.round_to, "qat_epochs": args.qat_epochs, "qat_samples": args.qat_samples},
            "latency": {"threads": 1, "batches": [1, 32], "runs": args.runs, "rounds": args.rounds,
                        "how": "edgec.bench.compare, every artifact in one interleaved run per batch size"},
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                         "torch_pruning": torch_pruning.__version__}, "wall_s": round(time.perf_counter() - t0)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    old = RESULTS / f"{STEM}.json"
    if args.part != "all" and old.is_file():  # keep the other part's rows of an earlier call
        mine = {r["model"] for r in rows}
        kept = [r for r in json.loads(old.read_text())["rows"] if r["model"] not in mine]
        rows = ([*rows, *kept] if args.part == "resnet" else [*kept, *rows])
    (RESULTS / f"{STEM}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = ["model", "accuracy", "delta_pt_vs_fp32", "p50_ms_b1", "speedup_b1", "p50_ms_b32", "speedup_b32", "macs",
            "macs_vs_fp32", "params", "weight_bytes_deployed", "peak_activation_bytes"]
    with open(RESULTS / f"{STEM}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, RESULTS / f"{STEM}.png")
    for r in rows:
        log(f"{r['model']:24s} {100 * r['accuracy']:6.2f} %  x{r['speedup_b1']:.2f} b1  x{r['speedup_b32']:.2f} b32  "
            f"MACs {r['macs'] / 1e6:6.2f} M  params {r['params']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Audio benchmark (issue 4): BC-ResNet keyword spotting, device / speaker shift, compression to 61 KB.

Real audio only: Speech Commands v2 (the canonical 12-class test set, split by speaker hash into
train / test, 3,867 / 602 clips) and FSDD (6 speakers). Every accuracy is measured on an exported ONNX
model in ONNX Runtime (CPU, 1 thread); parts:

  models    BC-ResNet-1/3/8: FP32 training by edgec's engine, then the shipped qat-int8 recipe (with
            norm_bits 8: SubSpectralNorm's scale and shift stored as int8 too); accuracy, parameters,
            deployed bytes and ORT p50 latency FP32 vs int8 at batch 1, 1 thread, in interleaved rounds.
  shift     frequency-wise normalisation under domain shift, BC-ResNet-ASC (width --asc-width) with
            norm none (BatchNorm only) vs ResNorm vs RFN, every seed of --seeds:
            (1) simulated devices on Speech Commands: train on device 0 plus --few clips each through
                devices 1 and 2, test every eval clip through devices 0-5 (3-5 never seen);
            (2) FSDD speakers: train on george, jackson, lucas, nicolas; test on theo and yweweler.
  compress  BC-ResNet-8 (from part "models") through the shipped bcresnet-asc recipe: KD + pruning to
            61,000 bytes of non-zero int8 parameters + int8 QAT; accuracy drop vs its FP32 self. Each
            budget (--prune-epochs, --c-qat-epochs, --c-max-train) runs into its own directory and
            the table gets one row per budget found there, plus part 1's dense BC-ResNet-3 int8.

    EDGEC_DATA=../shared/data python benchmarks/kws_audio.py                 # everything, full budget
    EDGEC_DATA=../shared/data python benchmarks/kws_audio.py --quick         # a few minutes, smoke test
    EDGEC_DATA=../shared/data python benchmarks/kws_audio.py --part shift --seeds 0,1,2

Writes benchmarks/results/kws-bcresnet-fp32-int8-ort-cpu.{json,csv,png},
audio-shift-freqnorm-ort-cpu.{json,csv,png} and kws-bcresnet8-61kb-int8-ort-cpu.{json,csv,png}
(--quick: the same files under benchmarks/work/quick/, never into results/). Weights, runs and ONNX
files go to benchmarks/work/ (not committed); trained baselines are reused by a later call.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / "work" / "kws"
FSDD_TRAIN = ("george", "jackson", "lucas", "nicolas")
NORMS = ("none", "resnorm", "rfn")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def data_root() -> Path | None:
    root = os.environ.get("EDGEC_DATA")
    need = ("speech_commands_v2_test", "fsdd")
    if not root or not all((Path(root) / n).is_dir() for n in need):
        print(f"EDGEC_DATA must point at a folder with {' and '.join(need)} (e.g. ../shared/data); nothing to do",
              file=sys.stderr)
        return None
    os.environ.setdefault("EDGEC_NO_PROGRESS", "1")
    return Path(root)


# --------------------------------------------------------------------------------------- helpers
def train_fp32(model, train_set, *, epochs: int, seed: int, ckpt: Path, augment, batch_size: int = 100,
               lr: float = 0.1, max_train: int | None = None, desc: str = "fp32"):
    """BC-ResNet's recipe (docs/methods.md, BC-ResNet): SGD momentum 0.9, wd 1e-3, batch 100, linear warm-up
    (5 epochs, or a quarter of a shorter run) then cosine to 0 per step. Resumes from ``ckpt``."""
    import torch

    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit
    from edgec.stages.base import _subset

    torch.manual_seed(seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="sgd", momentum=0.9, weight_decay=1e-3,
                      schedule="cosine", warmup_epochs=min(5.0, epochs / 4), seed=seed)
    return fit(model, loss_fn=lambda m, x, y: (torch.nn.functional.cross_entropy(z := m(x), y), z),
               train_set=_subset(train_set, max_train, seed), eval_set=None, cfg=cfg, ckpt_path=ckpt, resume=True,
               augment=augment, desc=desc, dist=DistContext.single("cpu"))


def export_fp32(model, path: Path, data) -> Path:
    from edgec.export.metadata import write_model_metadata
    from edgec.export.onnx_export import export_onnx

    export_onnx(model.eval(), tuple(data.input_shape), path)
    write_model_metadata(path, classes=data.classes, normalization=data.normalization)
    return path


def ort_predict(path: Path, x):
    from edgec import runtime

    return runtime.predict(runtime.load_session(path, threads=1), x).argmax(1)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def write_table(out: Path, stem: str, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    log(f"wrote {out / stem}.json/.csv")


def machine() -> dict:
    import onnxruntime
    import torch

    return {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "threads": torch.get_num_threads()}


def sc_spec(root: Path, tau: float) -> str:
    aug = "shift+noise+specaugment" if tau >= 1.5 else "shift+noise"  # SpecAugment for tau >= 1.5 (paper)
    return f"speechcommands:{root / 'speech_commands_v2_test'}?augment={aug}"


def fp32_baseline(root: Path, tau: int, args, work: Path) -> tuple[Path, str]:
    """Train (or reuse) FP32 BC-ResNet-tau on the Speech Commands speaker split; (weights, data spec)."""
    from edgec.data import load_data
    from edgec.models import create_model, save_weights

    spec = sc_spec(root, tau)
    path = work / f"bcresnet{tau}_e{args.epochs}_m{args.max_train or 'all'}_s{args.seed}.pt"
    if path.is_file():
        log(f"reusing {path.name}")
        return path, spec
    data = load_data(spec, seed=args.seed)
    model = create_model(f"bcresnet{tau}", num_classes=data.num_classes)
    log(f"training FP32 bcresnet{tau} ({n_params(model):,} params): {args.epochs} epochs on "
        f"{min(len(data.train), args.max_train or len(data.train))} clips")
    t = time.perf_counter()
    train_fp32(model, data.train, epochs=args.epochs, seed=args.seed, ckpt=path.with_suffix(".ckpt"),
               augment=data.augment, max_train=args.max_train, desc=f"bcresnet{tau} fp32")
    save_weights(model, path)
    log(f"bcresnet{tau} trained in {time.perf_counter() - t:.0f} s")
    return path, spec


def run_recipe(model: str, weights: Path, spec: str, recipe: str, overrides: list[str], out: Path) -> dict:
    """``edgec compress`` in-process (export + ORT bench + report); returns report.json."""
    from edgec.pipeline import CompressRequest, compress

    t = time.perf_counter()
    compress(CompressRequest(model=model, weights=str(weights), data=spec, recipe=recipe, overrides=tuple(overrides),
                             out=out, device="cpu", force=True))
    rep = json.loads((out / "report.json").read_text())
    rep["wall_s"] = round(time.perf_counter() - t)
    return rep


# ------------------------------------------------------------------------------ part 1: models
def part_models(root: Path, args, out: Path, work: Path) -> list[dict]:
    import numpy as np

    from edgec.bench import bench

    taus = (1, 3, 8)
    rows, files, budgets = [], {}, {}
    for tau in taus:
        weights, spec = fp32_baseline(root, tau, args, work)
        sets = [f"stages.0.epochs={args.qat_epochs}", "stages.0.norm_bits=8", "bench.runs=20", "bench.warmup=5"]
        if args.qat_samples:
            sets.append(f"stages.0.max_train_samples={args.qat_samples}")
        rep = run_recipe(f"bcresnet{tau}", weights, spec, "qat-int8", sets, work / f"run-qat-bcresnet{tau}")
        budgets[f"bcresnet{tau}"] = {"qat_wall_s": rep["wall_s"]}
        from edgec.models import create_model

        params = n_params(create_model(f"bcresnet{tau}", num_classes=12))
        for r in rep["rows"]:
            prec = "fp32" if r["format"] == "onnx-fp32" else "int8"
            name = f"BC-ResNet-{tau} {prec}"
            files[name] = Path(r["path"])
            rows.append({"model": name, "tau": tau, "precision": prec, "params": params, "accuracy": r["accuracy"],
                         "samples": r["samples"], "weight_bytes_deployed": r["weight_bytes_deployed"],
                         "params_nonzero": r["params_nonzero"], "file_bytes": r["file_bytes"],
                         "integer_kernels": r["integer_kernels"], "parity_top1_vs_pytorch": r["parity_top1"]})
        log(f"bcresnet{tau}: fp32 {rows[-2]['accuracy']:.4f} int8 {rows[-1]['accuracy']:.4f}")
    # latency: interleaved rounds (order flips every round), median of the rounds' p50
    lat = {n: [] for n in files}
    for rnd in range(args.rounds):
        log(f"latency round {rnd + 1}/{args.rounds}")
        for name in (list(files) if rnd % 2 == 0 else list(files)[::-1]):
            lat[name].append(bench(files[name], threads=1, batch=1, warmup=20, runs=args.runs)["latency_ms"]["p50"])
    for r in rows:
        r["p50_ms"] = float(np.median(lat[r["model"]]))
        r["p50_ms_rounds"] = lat[r["model"]]
    by = {r["model"]: r for r in rows}
    for r in rows:
        ref = by[f"BC-ResNet-{r['tau']} fp32"]
        r["speedup_vs_fp32"] = ref["p50_ms"] / r["p50_ms"]
        r["delta_acc_pt_vs_fp32"] = (r["accuracy"] - ref["accuracy"]) * 100
    meta = {"task": "Speech Commands v2 test set, 12 classes, speaker-hash split (3,867 train / 602 test clips)",
            "budget": {"fp32_epochs": args.epochs, "fp32_max_train": args.max_train, "batch": 100,
                       "qat_recipe": "qat-int8 + norm_bits 8", "qat_epochs": args.qat_epochs,
                       "qat_samples_per_epoch": args.qat_samples, "seed": args.seed, "wall": budgets},
            "latency": {"runs": args.runs, "rounds": args.rounds, "batch": 1, "threads": 1}, **machine()}
    write_table(out, "kws-bcresnet-fp32-int8-ort-cpu", meta, rows)
    plot_models(rows, out / "kws-bcresnet-fp32-int8-ort-cpu.png")
    return rows


def plot_models(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for prec, marker in (("fp32", "o"), ("int8", "s")):
        sel = [r for r in rows if r["precision"] == prec]
        ax.scatter([r["p50_ms"] for r in sel], [100 * r["accuracy"] for r in sel], marker=marker, s=60, label=prec)
        for r in sel:
            ax.annotate(f"{r['model']}\n{r['weight_bytes_deployed'] / 1024:.1f} KB", (r["p50_ms"], 100 * r["accuracy"]),
                        textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xscale("log")
    lo, hi = min(r["p50_ms"] for r in rows), max(r["p50_ms"] for r in rows)
    ax.set_xlim(lo / 1.15, hi * 1.6)  # room for the labels right of the last point
    ax.set_xlabel("ORT p50 latency, batch 1, 1 thread (ms, log)")
    ax.set_ylabel("accuracy on the 602 test clips, in ORT (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("BC-ResNet on Speech Commands (speaker split): FP32 vs int8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- part 2: shift
def _device_split(x, few: int, seed: int):
    """Device ids for the training clips: 0 for all but ``few`` clips each through devices 1 and 2."""
    import numpy as np

    rng = np.random.default_rng([seed, 0xDE7])
    ids = np.zeros(len(x), dtype=np.int64)
    pick = rng.choice(len(x), size=min(2 * few, len(x)), replace=False)
    ids[pick[:few]] = 1
    ids[pick[few:]] = 2
    return ids


def part_shift(root: Path, args, out: Path, work: Path) -> list[dict]:
    import numpy as np
    import torch

    from edgec.audio import DeviceSimulation, simulate_device_split
    from edgec.data import load_data, to_numpy
    from edgec.data.bundle import _tensor_dataset
    from edgec.models.bcresnet import BCResNetASC

    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    # (1) simulated devices on Speech Commands
    data = load_data(f"speechcommands:{root / 'speech_commands_v2_test'}?augment=shift+noise", seed=0)
    xtr, ytr = to_numpy(data.train)
    xev, yev = to_numpy(data.eval)
    sim = DeviceSimulation(xtr.shape[2], n_devices=6, seed=0, std=data.normalization["std"][0])
    ids = _device_split(xtr, args.few, 0)
    train = _tensor_dataset(torch.from_numpy(np.ascontiguousarray(sim.apply(xtr, ids))), ytr)
    devices = list(range(6))
    xs, dev_of = simulate_device_split(xev, sim, devices)  # every eval clip through every device
    ys = np.tile(yev, len(devices))
    spread = float(np.abs(sim.gains_db[3:] - sim.gains_db[0]).mean())
    log(f"devices: train {int((ids == 0).sum())} clips on device 0, {args.few} each on 1 and 2; mean |gain "
        f"difference| of the unseen devices to device 0: {spread:.2f} dB")
    # (2) FSDD speakers
    fsdd = load_data(f"fsdd:{root / 'fsdd'}?train_speakers={','.join(FSDD_TRAIN)}", seed=0)
    fx, fy = to_numpy(fsdd.eval)
    speakers = fsdd.groups["speaker"]
    for norm in NORMS:
        for seed in seeds:
            for task in ("devices", "fsdd"):
                d = data if task == "devices" else fsdd
                torch.manual_seed(seed)
                model = BCResNetASC(args.asc_width, num_classes=d.num_classes, norm=norm)
                tag = f"asc{args.asc_width}-{norm}-{task}-s{seed}"
                epochs = args.shift_epochs if task == "devices" else args.fsdd_epochs
                t = time.perf_counter()
                train_fp32(model, train if task == "devices" else fsdd.train, epochs=epochs, seed=seed,
                           ckpt=work / f"{tag}-e{epochs}.ckpt", augment=d.augment, max_train=args.shift_max_train,
                           desc=tag)
                path = export_fp32(model, work / f"{tag}.onnx", d)
                row = {"task": task, "norm": norm, "seed": seed, "params": n_params(model), "epochs": epochs,
                       "train_s": round(time.perf_counter() - t)}
                if task == "devices":
                    pred = ort_predict(path, xs)
                    acc = {dv: float((pred[dev_of == dv] == ys[dev_of == dv]).mean()) for dv in devices}
                    row.update({f"acc_device{dv}": acc[dv] for dv in devices})
                    row["acc_seen_main"] = acc[0]
                    row["acc_seen_few"] = float(np.mean([acc[1], acc[2]]))
                    row["acc_unseen"] = float(np.mean([acc[3], acc[4], acc[5]]))
                    row["clean_acc"] = float((ort_predict(path, xev) == yev).mean())  # no device response
                else:
                    pred = ort_predict(path, fx)
                    row["acc_unseen"] = float((pred == fy).mean())
                    for sp in sorted(set(speakers.tolist())):
                        row[f"acc_{sp}"] = float((pred[speakers == sp] == fy[speakers == sp]).mean())
                rows.append(row)
                log(f"{tag}: unseen {row['acc_unseen']:.4f} ({row['train_s']} s)")
    summary = []
    for task in ("devices", "fsdd"):
        for norm in NORMS:
            sel = [r for r in rows if r["task"] == task and r["norm"] == norm]
            keys = ["acc_unseen"] + (["acc_seen_main", "acc_seen_few"] if task == "devices" else [])
            summary.append({"task": task, "norm": norm, "seeds": len(sel),
                            **{f"{k}_mean": float(np.mean([r[k] for r in sel])) for k in keys},
                            **{f"{k}_std": float(np.std([r[k] for r in sel])) for k in keys}})
    meta = {"devices": {"data": "Speech Commands speaker split, simulated devices (edgec.audio.DeviceSimulation, "
                                "6 devices, seed 0)", "train": f"device 0 + {args.few} clips each on devices 1, 2",
                        "test": "all 602 test clips through each of devices 0-5", "unseen": [3, 4, 5],
                        "mean_abs_gain_diff_unseen_db": spread},
            "fsdd": {"train_speakers": list(FSDD_TRAIN), "test_speakers": sorted(set(speakers.tolist()))},
            "model": f"BCResNetASC(c={args.asc_width}) norm none | resnorm (lam 0.1) | rfn (LayerNorm, lam 0.5)",
            "budget": {"device_epochs": args.shift_epochs, "fsdd_epochs": args.fsdd_epochs,
                       "max_train": args.shift_max_train, "batch": 100, "seeds": seeds},
            "summary": summary, **machine()}
    write_table(out, "audio-shift-freqnorm-ort-cpu", meta, rows)
    plot_shift(summary, out / "audio-shift-freqnorm-ort-cpu.png")
    return summary


def plot_shift(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("devices", "acc_seen_main", "device 0 (seen)"), ("devices", "acc_unseen", "devices 3-5 (unseen)"),
            ("fsdd", "acc_unseen", "FSDD unseen speakers")]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.25
    for i, norm in enumerate(NORMS):
        vals, errs = [], []
        for task, key, _ in cols:
            s = next(r for r in summary if r["task"] == task and r["norm"] == norm)
            vals.append(100 * s[f"{key}_mean"])
            errs.append(100 * s[f"{key}_std"])
        ax.bar([j + (i - 1) * width for j in range(len(cols))], vals, width, yerr=errs, capsize=3,
               label={"none": "BatchNorm only", "resnorm": "ResNorm", "rfn": "RFN"}[norm])
    ax.set_xticks(range(len(cols)), [c[2] for c in cols])
    ax.set_ylabel("accuracy in ORT (%), mean ± std over seeds")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Frequency-wise normalisation under device / speaker shift (BC-ResNet-ASC)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- part 3: compress
COMPRESS_STEM = "kws-bcresnet8-61kb-int8-ort-cpu"


def compress_row(run_dir: Path) -> dict:
    """One compressed row from a finished bcresnet-asc run directory (report.json, recipe.yaml, metrics.jsonl)."""
    import yaml

    rep = json.loads((run_dir / "report.json").read_text())
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plan = next(e for e in events if e.get("event") == "byte_budget")
    epochs = [e for e in events if e.get("type") == "epoch"]
    prune = [e for e in epochs if e["stage"].startswith("stage 0")]
    qat = [e for e in epochs if e["stage"].startswith("stage 1")]
    r = next(r for r in rep["rows"] if r["format"] != "onnx-fp32")
    st = recipe["stages"]
    return {"model": "BC-ResNet-8 bcresnet-asc 61KB int8", "run": run_dir.name,
            "prune_epochs": st[0]["epochs"], "qat_epochs": st[1]["epochs"],
            "clips_per_epoch": st[0].get("max_train_samples") or "all",
            "prune_steps": prune[-1]["step"], "qat_steps": qat[-1]["step"],
            "train_s": round(sum(e["time_s"] for e in epochs)),
            "eval_acc_end_of_pruning": prune[-1]["eval_acc"], **report_fields(r), "byte_plan": plan}


def report_fields(r: dict) -> dict:
    """The columns of one report.json row (an exported model measured by the run's bench)."""
    return {"accuracy": r["accuracy"], "samples": r["samples"],
            "weight_bytes_deployed": r["weight_bytes_deployed"], "params_nonzero": r["params_nonzero"],
            "sparsity": r["sparsity"], "p50_ms": r["latency_p50_ms"], "file_bytes": r["file_bytes"],
            "integer_kernels": r["integer_kernels"], "parity_top1_vs_pytorch": r["parity_top1"]}


def part_compress(root: Path, args, out: Path, work: Path) -> list[dict]:
    """Run bcresnet-asc at this budget into its own run directory, then tabulate every finished budget
    run of the same FP32 baseline found in ``work`` (so a longer run adds a row instead of replacing one)."""
    weights, spec = fp32_baseline(root, 8, args, work)
    sets = [f"stages.0.epochs={args.prune_epochs}", f"stages.1.epochs={args.c_qat_epochs}", "bench.runs=20",
            "bench.warmup=5"]
    if args.c_max_train:
        sets += [f"stages.0.max_train_samples={args.c_max_train}", f"stages.1.max_train_samples={args.c_max_train}"]
    tag = f"e{args.epochs}-p{args.prune_epochs}-q{args.c_qat_epochs}-n{args.c_max_train or 'all'}"
    run_dir = work / f"run-bcresnet8-61kb-{tag}"
    if (run_dir / "report.json").is_file():
        log(f"reusing finished run {run_dir.name} (delete it to run this budget again)")
        rep = json.loads((run_dir / "report.json").read_text())
    else:
        rep = run_recipe("bcresnet8", weights, spec, "bcresnet-asc", sets, run_dir)
    fp = next(r for r in rep["rows"] if r["format"] == "onnx-fp32")
    fp32 = {"model": "BC-ResNet-8 fp32", "run": weights.name, **report_fields(fp)}
    runs = sorted(work.glob(f"run-bcresnet8-61kb-e{args.epochs}-*/report.json"))
    comp = sorted((compress_row(p.parent) for p in runs), key=lambda r: (r["prune_steps"], r["qat_steps"]))
    for r in comp:
        r["delta_acc_pt_vs_fp32"] = (r["accuracy"] - fp32["accuracy"]) * 100
    rows = [fp32, *comp]
    ref = dense_reference(out)
    if ref:
        rows.append(ref)
    meta = {"recipe": "bcresnet-asc (KD from the FP32 model, global magnitude pruning on the cubic schedule to "
                      "target_bytes 61000, int8 LSQ QAT with norm_bits 8, KD kept); one row per training budget",
            "fp32_epochs": args.epochs, "byte_plan": comp[-1]["byte_plan"], **machine()}
    for r in comp:
        r.pop("byte_plan")
    write_table(out, COMPRESS_STEM, meta, rows)
    plot_compress(out / f"{COMPRESS_STEM}.png", fp32, comp, ref)
    for r in comp:
        log(f"BC-ResNet-8 -> {r['weight_bytes_deployed']:,} B after {r['prune_steps']}+{r['qat_steps']} steps: "
            f"accuracy {fp32['accuracy']:.4f} -> {r['accuracy']:.4f} ({r['delta_acc_pt_vs_fp32']:+.2f} pt)")
    return rows


def dense_reference(out: Path) -> dict | None:
    """The dense int8 BC-ResNet-3 of part 1 (about the same bytes), if part 1's results are there."""
    path = out / "kws-bcresnet-fp32-int8-ort-cpu.json"
    if not path.is_file():
        return None
    for r in json.loads(path.read_text())["rows"]:
        if r.get("tau") == 3 and r.get("precision") == "int8":
            return {"model": "BC-ResNet-3 int8 dense (part 1, reference)", "run": path.name,
                    "accuracy": r["accuracy"], "samples": r.get("samples"),
                    "weight_bytes_deployed": r["weight_bytes_deployed"], "params_nonzero": r["params_nonzero"],
                    "integer_kernels": r.get("integer_kernels")}
    return None


def plot_compress(path: Path, fp32: dict, comp: list[dict], ref: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [r["prune_steps"] + r["qat_steps"] for r in comp]
    ax.plot(steps, [100 * r["accuracy"] for r in comp], "o-", label="BC-ResNet-8 -> 61 KB int8 (exported, ORT)")
    ax.plot(steps, [100 * r["eval_acc_end_of_pruning"] for r in comp], "s--", alpha=0.6,
            label="same run at the end of pruning (PyTorch, FP)")
    for x, r in zip(steps, comp):
        ax.annotate(f"{r['weight_bytes_deployed']:,} B", (x, 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(0, -14), ha="center", fontsize=8)
    ax.axhline(100 * fp32["accuracy"], color="k", lw=1,
               label=f"BC-ResNet-8 FP32 ({fp32['weight_bytes_deployed'] / 1000:,.0f} KB)")
    if ref:
        ax.axhline(100 * ref["accuracy"], color="tab:green", lw=1, ls=":",
                   label=f"BC-ResNet-3 int8 dense ({ref['weight_bytes_deployed']:,} B)")
    ax.set_xscale("log")
    ax.set_xticks(steps, [f"{x:,}" for x in steps])
    ax.minorticks_off()
    lo = min(100 * min(r["accuracy"] for r in comp), 100 * ref["accuracy"] if ref else 100)
    ax.set_ylim(lo - 2.5, 100 * fp32["accuracy"] + 1.5)
    ax.set_xlabel("optimizer steps, pruning + QAT (batch 64, log scale)")
    ax.set_ylabel("test accuracy, 602 clips (%)")
    ax.set_title("BC-ResNet-8 compressed to 61,000 B: accuracy vs training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "models", "shift", "compress"), default="all")
    ap.add_argument("--quick", action="store_true", help="tiny budget (minutes): checks the script, not the methods")
    ap.add_argument("--epochs", type=int, default=40, help="FP32 BC-ResNet epochs (paper: 200)")
    ap.add_argument("--max-train", type=int, default=None, help="FP32 training clips per epoch (default: all 3,867)")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--qat-samples", type=int, default=None, help="QAT clips per epoch (default: all)")
    ap.add_argument("--asc-width", type=int, default=24, help="BC-ResNet-ASC width c of the shift study")
    ap.add_argument("--seeds", default="0,1", help="seeds of the shift study (>= 2)")
    ap.add_argument("--few", type=int, default=100, help="training clips through each of devices 1 and 2")
    ap.add_argument("--shift-epochs", type=int, default=30)
    ap.add_argument("--fsdd-epochs", type=int, default=20)
    ap.add_argument("--shift-max-train", type=int, default=None)
    ap.add_argument("--prune-epochs", type=int, default=8)
    ap.add_argument("--c-qat-epochs", type=int, default=3)
    ap.add_argument("--c-max-train", type=int, default=None)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per latency round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.max_train, args.qat_epochs, args.qat_samples = 1, 200, 1, 100
        args.shift_epochs, args.fsdd_epochs, args.shift_max_train, args.few = 1, 1, 200, 20
        args.prune_epochs, args.c_qat_epochs, args.c_max_train = 1, 1, 100
        args.runs, args.rounds = 20, 1
    if len(args.seeds.split(",")) < 2 and args.part in ("all", "shift"):
        print("--seeds needs at least two seeds (e.g. 0,1)", file=sys.stderr)
        return 2
    root = data_root()
    if root is None:
        return 2
    import torch

    torch.set_num_threads(args.threads)
    out = HERE / "work" / "quick" if args.quick else RESULTS
    work = WORK / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.part in ("all", "models"):
        part_models(root, args, out, work)
    if args.part in ("all", "shift"):
        part_shift(root, args, out, work)
    if args.part in ("all", "compress"):
        part_compress(root, args, out, work)
    log(f"done in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

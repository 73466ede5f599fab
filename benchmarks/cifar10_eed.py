"""CIFAR-10 / ResNet-20: EED (issue 5) against an adversarially trained dense model.

One run of the shipped ``eed`` recipe (``edgec compress --recipe eed`` with a CPU-sized budget, see
``--at-*`` / ``--eed-*``) from the FP32 baseline (benchmarks/work/resnet20_fp32_e5_s0.pt, shared with
cifar10_int8.py; trained here when absent):

* stage 0 (train, PGD-AT): the adversarially trained dense model  -> row "PGD-AT dense"
* stage 1 (eed): 3 sub-models pruned to 50 % by magnitude / Taylor / Fisher, adversarially fine-tuned
  together (diversity, misclassified weight, L1), early-exit threshold calibrated on held-out
  training data                                                    -> rows "pruned sub-model" (member 0,
  magnitude, alone), "EED full ensemble" (all 3), "EED dynamic" (early exit)

Every model is exported to ONNX and classified in ONNX Runtime (CPU, 1 thread): clean top-1 on the
full 10,000-image test set; PGD-10 and PGD-20 L-inf eps 8/255 (step 2/255, random start, seeded)
robust top-1 on a seeded subset of the test set (``--pgd-samples``, default 1000), the attack computed
white-box on each row's PyTorch model (for both ensemble rows: on the full ensemble) and the
adversarial images then classified by the exported artifact. The dynamic row also gets the worst
case over that attack and one on member 0 alone (the member every input runs first). Latency: batch
1, the four artifacts timed per input back to back in rotating order, ``--rounds`` rounds, one run.

    EDGEC_DATA=../shared/data python benchmarks/cifar10_eed.py            # full budget (see README)
    EDGEC_DATA=../shared/data python benchmarks/cifar10_eed.py --quick    # minutes: checks the driver

Writes benchmarks/results/cifar10-resnet20-eed-ort-cpu.{json,csv,png} (``--quick``: into
benchmarks/work/eed-quick/ instead, never over the committed results). Finished parts are kept in
benchmarks/work/eed/ (the compress run, exports, adversarial examples): a rerun continues where it
stopped.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10_int8 import RESULTS, WORK, baseline, cifar10_root, log  # noqa: E402  (shared baseline, logging)

STEM = "cifar10-resnet20-eed-ort-cpu"
EPS = 8 / 255
ROWS = ("PGD-AT dense", "pruned sub-model (EED member 0, magnitude)", "EED full ensemble (K=3)", "EED dynamic")


def budget(args) -> dict:
    """The compress budget (overrides of the shipped eed recipe)."""
    return {
        "at": {"epochs": args.at_epochs, "train_samples": args.at_samples, "pgd_steps": args.at_steps,
               "pgd_step": round(2.5 * EPS / args.at_steps, 6)},
        "eed": {"epochs": args.eed_epochs, "train_samples": args.eed_samples, "pgd_steps": args.eed_steps,
                "pgd_step": round(2.5 * EPS / args.eed_steps, 6), "importance_batches": args.importance_batches},
        **({"structure": "channel", "target_macs": args.target_macs, "round_to": args.round_to}
           if args.structure == "channel" else {}),
    }


def overrides(b: dict) -> tuple[str, ...]:
    at, ee = b["at"], b["eed"]
    extra = ()
    if b.get("structure") == "channel":
        extra = ("stages.1.structure=channel", f"stages.1.target_macs={b['target_macs']}")
        if b.get("round_to"):
            extra += (f"stages.1.round_to={b['round_to']}",)
    return extra + (f"stages.0.epochs={at['epochs']}", f"stages.0.max_train_samples={at['train_samples']}",
            f"stages.0.adversarial.steps={at['pgd_steps']}", f"stages.0.adversarial.step={at['pgd_step']}",
            f"stages.1.epochs={ee['epochs']}", f"stages.1.max_train_samples={ee['train_samples']}",
            f"stages.1.adversarial.steps={ee['pgd_steps']}", f"stages.1.adversarial.step={ee['pgd_step']}",
            f"stages.1.importance_batches={ee['importance_batches']}")


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_eed(spec: str, base: Path, work: Path, sets: tuple[str, ...]) -> tuple[Path, float]:
    """The compress run, resumed when an earlier attempt with the same settings was interrupted."""
    from edgec.pipeline import CompressRequest, compress
    from edgec.recipe import load_recipe
    from edgec.runs import file_sha256

    run_dir = work / "run"
    key = _key(load_recipe("eed", list(sets)).model_dump(mode="json"), file_sha256(base))
    kfile = work / "run.key"
    same = kfile.is_file() and kfile.read_text() == key
    if same and (run_dir / "model_final.pt").is_file():
        log(f"compress run kept from {run_dir}")
        return run_dir, json.loads((work / "run.time.json").read_text())["compress_s"]
    resume = same and (run_dir / "run.json").is_file()
    work.mkdir(parents=True, exist_ok=True)
    kfile.write_text(key)
    log(f"edgec compress --recipe eed {' '.join('--set ' + s for s in sets)} ({'resuming' if resume else 'new'})")
    t = time.perf_counter()
    compress(CompressRequest(model="resnet20", data=spec, recipe="eed", weights=str(base), overrides=sets,
                             out=run_dir, device="cpu", resume=resume, force=not resume, export=False))
    wall = time.perf_counter() - t
    prev = json.loads((work / "run.time.json").read_text())["compress_s"] if resume and (work / "run.time.json").is_file() else 0
    (work / "run.time.json").write_text(json.dumps({"compress_s": prev + wall}))
    return run_dir, prev + wall


def dense_at_model(run_dir: Path):
    """Stage 0's output (the PGD-AT dense model): the train stage changes no structure."""
    import torch

    from edgec.models import create_model

    model = create_model("resnet20", num_classes=10)
    model.load_state_dict(torch.load(run_dir / "stages" / "stage0.pt", map_location="cpu", weights_only=True)["model"])
    return model.eval()


def cached_adv(path: Path, key: str, make):
    """Adversarial examples, cached as .npz with the key of what made them."""
    import numpy as np

    if path.is_file():
        z = np.load(path)
        if str(z["key"]) == key:
            return z["x"]
    t = time.perf_counter()
    x = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, x=x, key=np.array(key))
    os.replace(tmp, path)
    log(f"  {path.name}: {time.perf_counter() - t:.0f} s")
    return x


def latency_all(dense_path: Path, dyn, x, rounds: int) -> dict:
    """Batch-1 latency of dense, member 0, dynamic and full ensemble, timed per input back to back in
    rotating order; per input the median over rounds, then mean / p50 over inputs."""
    from edgec.runtime import load_session
    from edgec.runtime.ensemble import interleaved_latency

    dense = load_session(dense_path, threads=1)
    dname = dense.get_inputs()[0].name
    m0, m0name = dyn.sessions[0], dyn.sessions[0].get_inputs()[0].name
    fns = {"dense": lambda b: dense.run(None, {dname: b}),
           "member0": lambda b: m0.run(None, {m0name: b}),
           "dynamic": lambda b: dyn.predict(b),
           "full": lambda b: dyn.predict_full(b)}
    out, _ = interleaved_latency(fns, [x[i:i + 1] for i in range(len(x))], rounds=rounds, warmup=min(10, len(x)))
    for v in out.values():
        v["round_mean_ms"] = [round(t, 4) for t in v["round_mean_ms"]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budget to check the driver (results to work/eed-quick)")
    ap.add_argument("--at-epochs", type=int, default=2)
    ap.add_argument("--at-samples", type=int, default=50000, help="training images per PGD-AT epoch")
    ap.add_argument("--at-steps", type=int, default=5, help="PGD steps of adversarial training (step 2.5*eps/steps)")
    ap.add_argument("--eed-epochs", type=int, default=2)
    ap.add_argument("--eed-samples", type=int, default=20000, help="training images per EED epoch")
    ap.add_argument("--eed-steps", type=int, default=3, help="PGD steps of EED's adversarial fine-tuning")
    ap.add_argument("--importance-batches", type=int, default=4)
    ap.add_argument("--pgd-samples", type=int, default=1000, help="test images attacked (seeded subset)")
    ap.add_argument("--latency-inputs", type=int, default=500, help="test images timed at batch 1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (training and attacks)")
    ap.add_argument("--baseline-epochs", type=int, default=5)
    ap.add_argument("--structure", choices=("weight", "channel"), default="weight",
                    help="channel: members lose whole channels to --target-macs (issue 13); results and work dir "
                         "get a -channel suffix")
    ap.add_argument("--target-macs", type=float, default=0.5, help="structure channel: each member's MACs ratio")
    ap.add_argument("--round-to", type=int, default=None, help="structure channel: channel multiples")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="FP32 checkpoint to start from (default: the 5-epoch work/ baseline; e.g. "
                         "benchmarks/baselines/resnet20-cifar10-e30-s0.pt)")
    args = ap.parse_args()
    if args.quick:
        args.at_epochs = args.eed_epochs = 1
        args.at_samples, args.at_steps, args.eed_samples, args.eed_steps = 512, 2, 512, 2
        args.importance_batches, args.pgd_samples, args.latency_inputs, args.rounds = 2, 64, 60, 2
    root = cifar10_root()
    if root is None:
        return 2
    import numpy as np
    import torch

    from edgec.data import load_data, to_numpy
    from edgec.bench.robustness import onnx_accuracy, pgd_subset, robust_inputs
    from edgec.export.ensemble import export_ensemble
    from edgec.export.check import check_export
    from edgec.export.onnx_export import export_onnx
    from edgec.runs import file_sha256, read_run
    from edgec.runtime.ensemble import DynamicEnsemble

    torch.set_num_threads(args.threads)
    sfx = "-channel" if args.structure == "channel" else ""
    work = WORK / (f"eed{sfx}-quick" if args.quick else f"eed{sfx}")
    out_dir = work if args.quick else RESULTS
    work.mkdir(parents=True, exist_ok=True)
    spec = f"cifar10:{root}"
    t0 = time.perf_counter()
    data = load_data(spec, seed=0)
    ex, ey = to_numpy(data.eval)
    base = args.baseline or baseline(data, args.baseline_epochs, 0, 2000 if args.quick else None)
    b = budget(args)
    run_dir, compress_s = run_eed(spec, base, work, overrides(b))
    run = read_run(run_dir)

    # ---- models and artifacts -----------------------------------------------------------------
    from edgec.runs import rebuild_model

    ens = rebuild_model(run_dir, "final")
    dense = dense_at_model(run_dir)
    px = ex[:: len(ex) // 1000][:1000]
    art = work / "artifacts"
    dense_onnx = art / "dense_at.onnx"
    mkey = _key(file_sha256(run_dir / "model_final.pt"))
    if not (art / "key").is_file() or (art / "key").read_text() != mkey:
        export_onnx(dense, (3, 32, 32), dense_onnx)
        eed = run["identity"]["recipe"]["stages"][1]
        export_ensemble(ens, run, art / "ensemble", opset=17, parity_x=px, agree=eed.get("agree"),
                        extra_meta={"scores": eed["scores"], **({"structure": "channel", "target_macs": eed["target_macs"]}
                                                if eed.get("structure") == "channel"
                                                else {"target_sparsity": eed["target_sparsity"]})})
        (art / "key").write_text(mkey)
    parity = {"dense": check_export(dense, dense_onnx, px).as_dict(),
              "ensemble": json.loads((art / "ensemble" / "ensemble.check.json").read_text())}
    parity["ensemble"].pop("members", None)
    dyn = DynamicEnsemble.load(art / "ensemble")
    member0 = art / "ensemble" / dyn.meta["members"][0]

    # ---- clean accuracy on the full test set ----------------------------------------------------
    acc = {"dense": onnx_accuracy(dense_onnx, ex, ey), "member0": onnx_accuracy(member0, ex, ey)}
    pred, used = dyn.predict_batched(ex)
    full = np.concatenate([dyn.predict_full(ex[i:i + 256]) for i in range(0, len(ex), 256)])
    acc.update(dynamic=float((pred == ey).mean()), full=float((full == ey).mean()))
    members_clean = float(used.mean())
    member_acc = [onnx_accuracy(art / "ensemble" / m, ex, ey) for m in dyn.meta["members"]]
    log(f"clean top-1 (ORT, 10k): dense {acc['dense']:.4f}, member0 {acc['member0']:.4f}, full {acc['full']:.4f}, "
        f"dynamic {acc['dynamic']:.4f} with {members_clean:.2f} members/input; members {member_acc}")

    # ---- PGD-10 / PGD-20 on a seeded subset -------------------------------------------------------
    idx = pgd_subset(len(ey), args.pgd_samples, seed=0)
    sx, sy = ex[idx], ey[idx]
    robust, members_adv = {}, {}
    clean_sub = {"dense": onnx_accuracy(dense_onnx, sx, sy), "member0": onnx_accuracy(member0, sx, sy)}
    ps, _ = dyn.predict_batched(sx)
    clean_sub.update(dynamic=float((ps == sy).mean()), full=float((dyn.predict_full(sx) == sy).mean()))
    for steps in (10, 20):
        atk = dict(normalization=data.normalization, eps=EPS, steps=steps, step=EPS / 4, seed=0)
        key = _key(mkey, steps, idx.tolist())
        log(f"PGD-{steps} on {len(idx)} test images: dense, member 0, full ensemble")
        xa = {"dense": cached_adv(work / "adv" / f"dense-pgd{steps}.npz", key,
                                  lambda: robust_inputs(dense, sx, sy, **atk)),
              "member0": cached_adv(work / "adv" / f"member0-pgd{steps}.npz", key,
                                    lambda: robust_inputs(ens.members[0], sx, sy, **atk)),
              "ensemble": cached_adv(work / "adv" / f"ensemble-pgd{steps}.npz", key,
                                     lambda: robust_inputs(ens, sx, sy, **atk))}
        r = {"dense": onnx_accuracy(dense_onnx, xa["dense"], sy), "member0": onnx_accuracy(member0, xa["member0"], sy)}
        r["full"] = float((dyn.predict_full(xa["ensemble"]) == sy).mean())
        pe, ue = dyn.predict_batched(xa["ensemble"])
        pm, _ = dyn.predict_batched(xa["member0"])
        r["dynamic"] = float((pe == sy).mean())
        r["dynamic_worst"] = float(((pe == sy) & (pm == sy)).mean())  # wrong under either attack = wrong
        robust[steps], members_adv[steps] = r, float(ue.mean())
        log(f"PGD-{steps}: {json.dumps({k: round(v, 4) for k, v in r.items()})}, dynamic uses {ue.mean():.2f} members")

    # ---- latency, one run -------------------------------------------------------------------------
    log(f"latency: {args.latency_inputs} test images at batch 1, {args.rounds} rounds, 4 artifacts interleaved")
    lat = latency_all(dense_onnx, dyn, ex[pgd_subset(len(ex), args.latency_inputs, seed=1)], args.rounds)
    ratio = lat["dynamic"]["mean_ms"] / lat["full"]["mean_ms"]
    log(f"latency mean ms: {json.dumps({k: round(v['mean_ms'], 4) for k, v in lat.items()})}; dynamic/full {ratio:.3f}")

    # ---- results ------------------------------------------------------------------------------------
    from edgec.bench import onnx_weight_stats
    from edgec.export.graph_stats import count_macs_params

    def stats(path):
        return {**onnx_weight_stats(path), "macs": count_macs_params(path)["macs"]}

    st = {"dense": stats(dense_onnx), "member0": stats(member0)}
    ens_stats = [stats(art / "ensemble" / m) for m in dyn.meta["members"]]
    st["full"] = st["dynamic"] = {k: sum(s[k] for s in ens_stats) for k in ("params_nonzero", "params_total",
                                                                             "weight_bytes_deployed", "macs")}
    rows = []
    for name, k in zip(ROWS, ("dense", "member0", "full", "dynamic")):
        rows.append({
            "row": name, "clean_acc_test10k": round(100 * acc[k], 2), "clean_acc_subset": round(100 * clean_sub[k], 2),
            "pgd10_acc": round(100 * robust[10][k], 2), "pgd20_acc": round(100 * robust[20][k], 2),
            "pgd20_acc_worst_case": round(100 * robust[20]["dynamic_worst"], 2) if k == "dynamic" else None,
            "avg_members_clean": {"dense": 1.0, "member0": 1.0, "full": float(dyn.k), "dynamic": round(members_clean, 3)}[k],
            "avg_members_pgd20": round(members_adv[20], 3) if k == "dynamic" else None,
            "latency_mean_ms_b1": round(lat[k]["mean_ms"], 4), "latency_p50_ms_b1": round(lat[k]["p50_ms"], 4),
            "latency_vs_full_ensemble": round(lat[k]["mean_ms"] / lat["full"]["mean_ms"], 3),
            "params_nonzero": st[k]["params_nonzero"], "weight_bytes_deployed": st[k]["weight_bytes_deployed"],
            "macs_all_members": st[k]["macs"],
        })
    events = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cal = next((e for e in events if e.get("event") == "eed_calibration"), {})
    masks = next((e for e in events if e.get("event") == "eed_masks"), {})
    meta = {
        "task": "CIFAR-10 (JPEG q75 copy), resnet20 (option-B shortcuts)", "quick": args.quick,
        "fp32_baseline": str(base.name), "recipe": "eed (shipped) with --set " + " ".join(overrides(b)),
        "budget": b, "compress_s": round(compress_s), "threads_torch": args.threads,
        "attack": {"kind": "PGD", "norm": "linf", "eps": "8/255", "step": "2/255", "steps": [10, 20],
                   "random_start": True, "seed": 0, "samples": len(idx), "subset": "seeded permutation of the test set",
                   "white_box_on": "each row's PyTorch model; both ensemble rows: the full ensemble (log mean softmax)",
                   "evaluated_on": "the exported ONNX artifacts in ONNX Runtime (dynamic: through the controller)",
                   "dynamic_worst_case": "wrong if wrong under the full-ensemble attack or under the member-0 attack"},
        "latency": {"batch": 1, "threads": 1, "inputs": args.latency_inputs, "rounds": args.rounds,
                    "how": "per input the 4 artifacts back to back in rotating order; per-input median over rounds, "
                           "mean over inputs", "raw": lat},
        "eed": {"threshold": dyn.threshold, "member_macs": [s["macs"] for s in ens_stats], "agree": dyn.agree, "scores": dyn.meta.get("scores"),
                "member_clean_acc_test10k": member_acc, "pruned_overlap": masks.get("pruned_overlap"),
                "calibration": {k: cal.get(k) for k in ("held_out", "threshold", "accuracy", "avg_members",
                                                         "full_accuracy", "target_accuracy", "member_accuracy")}},
        "parity": parity, "runtime": "onnxruntime " + __import__("onnxruntime").__version__,
        "torch": torch.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "wall_s": round(time.perf_counter() - t0),
    }
    stem = out_dir / (STEM.replace("-eed-", f"-eed{sfx}-") + ("-quick" if args.quick else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, meta, Path(f"{stem}.png"))
    for r in rows:
        log(f"{r['row']:45s} clean {r['clean_acc_test10k']:6.2f}  PGD-10 {r['pgd10_acc']:6.2f}  "
            f"PGD-20 {r['pgd20_acc']:6.2f}  members {r['avg_members_clean']:.2f}  "
            f"{r['latency_mean_ms_b1']:.3f} ms ({r['latency_vs_full_ensemble']:.3f} x full)")
    log(f"done in {time.perf_counter() - t0:.0f} s -> {stem}.{{json,csv,png}}")
    return 0


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    w = 0.26
    for j, (col, label) in enumerate((("clean_acc_subset", "clean"), ("pgd10_acc", "PGD-10"),
                                      ("pgd20_acc", "PGD-20"))):
        vals = [r[col] for r in rows]
        bars = ax.bar([i + (j - 1) * w for i in range(len(rows))], vals, w, label=label, color=f"C{j}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(rows)), [r["row"].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.set_ylabel(f"top-1 % in ORT ({meta['attack']['samples']} test images)")
    ax.set_title("L-inf eps 8/255, white-box PGD on the PyTorch model, classified by the ONNX artifact", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    lat = [r["latency_mean_ms_b1"] for r in rows]
    bars = bx.bar(range(len(rows)), lat, color=["C7", "C7", "C3", "C2"])
    bx.bar_label(bars, labels=[f"{r['latency_mean_ms_b1']:.3f} ms\n{r['avg_members_clean']:.2f} sub-models"
                               for r in rows], fontsize=7)
    bx.set_xticks(range(len(rows)), [r["row"].split(" (")[0] for r in rows], fontsize=8, rotation=15)
    bx.set_ylabel("mean latency per image, batch 1, 1 thread (ms)")
    bx.set_title(f"ORT CPU; dynamic / full = {rows[3]['latency_vs_full_ensemble']:.3f}", fontsize=9)
    bx.set_ylim(0, max(lat) * 1.3)
    bx.grid(axis="y", alpha=0.3)
    how = (f"channel-pruned to {meta['budget']['target_macs']:g} MACs" if meta["budget"].get("structure") == "channel"
           else "pruned")
    fig.suptitle(f"ResNet-20 CIFAR-10: PGD-AT dense vs EED (3 differently {how} sub-models, early exit)"
                 + ("  [--quick: driver check, not a result]" if meta["quick"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

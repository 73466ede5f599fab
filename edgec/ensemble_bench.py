"""EED's deployable dynamic ensemble on the host side: export it from a run, bench it in ONNX Runtime,
and measure robust accuracy of exported artifacts.

The artifact (``RUN_DIR/export/ensemble/``): ``member0.onnx .. member{K-1}.onnx`` + ``ensemble.json``
(threshold, agree, sha256 of each member, classes, normalization), run by the numpy + ORT controller
:class:`edgec.runtime.ensemble.DynamicEnsemble`; ``ensemble.check.json`` holds the export checks
(per-member parity with PyTorch, and the controller's exit decisions vs PyTorch's member
probabilities).

Robust accuracy protocol (:func:`robust_inputs`): PGD (random start, pixel-space eps, seeded) is
computed **white-box on the PyTorch model of the run** — for an EED run the full ensemble, whose
forward is the log of the averaged member probabilities — on a seeded subset of the eval data; the
adversarial inputs are then classified by the **exported artifact in ONNX Runtime**: a single graph
directly, the dynamic ensemble through its early-exit controller. The exit rule is not
differentiated through: for the dynamic ensemble this is the full ensemble's attack transferred to
the early-exit path (the exported members equal the PyTorch members to float precision, see
``ensemble.check.json``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import BudgetExceeded, InputError

__all__ = ["ENSEMBLE_DIR", "export_ensemble", "robust_inputs", "onnx_accuracy", "bench_ensemble",
           "robustness_rows", "bench_ensemble_artifact", "pgd_subset", "threat_model"]

ENSEMBLE_DIR = "ensemble"  # RUN_DIR/export/ensemble/{ensemble.json, member*.onnx}


# ----------------------------------------------------------------------------------------------
# attack helpers


def threat_model(recipe: dict) -> dict | None:
    """The adversarial training config of the run's last stage that has one (the threat model the
    run was made robust for), or None when the recipe trains no stage adversarially."""
    for st in reversed(recipe.get("stages", [])):
        if st.get("adversarial"):
            return dict(st["adversarial"])
    return None


def pgd_subset(n_total: int, n: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``n`` of ``n_total`` samples (all when n >= n_total);
    eval sets are often sorted by class, so never the first n."""
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng([int(seed), 0x9D6]).choice(n_total, size=n, replace=False))


def robust_inputs(model, x: np.ndarray, y: np.ndarray, *, normalization: dict, eps: float, steps: int,
                  norm: str = "linf", step: float | None = None, seed: int = 0, batch_size: int = 128) -> np.ndarray:
    """PGD adversarial examples of ``x`` (model-space numpy) against the PyTorch ``model``, white-box
    (random start from a seeded generator); returns model-space numpy float32."""
    import torch

    from edgec.attacks import Attack, InputSpace

    space = InputSpace.from_normalization(normalization)
    attack = Attack("pgd", norm=norm, eps=float(eps), step=step, steps=int(steps), random_start=True)
    g = torch.Generator().manual_seed(int(seed))
    model = model.eval().cpu()
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32))
        yb = torch.from_numpy(np.asarray(y[i:i + batch_size], dtype=np.int64))
        out.append(attack(model, xb, yb, space, generator=g).numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def onnx_accuracy(path: str | Path, x: np.ndarray, y: np.ndarray, *, threads: int = 1) -> float:
    """Top-1 of a single ONNX graph in ORT."""
    from edgec import runtime

    logits = runtime.predict(runtime.load_session(path, threads=threads), x)
    return float((logits.reshape(len(x), -1).argmax(1) == y).mean())


def _pgd_desc(eps: float, steps: int, norm: str, n: int, step: float | None = None) -> str:
    st = eps / 4 if step is None else step
    e = f"{eps * 255:.3g}/255" if norm == "linf" else f"{eps:.3g}"
    s = f"{st * 255:.3g}/255" if norm == "linf" else f"{st:.3g}"
    return (f"PGD-{steps} {'L-inf' if norm == 'linf' else 'L2'} eps {e} (pixel units), step {s}, random start; "
            f"white-box on the run's PyTorch model (EED: the full ensemble), evaluated on the exported ONNX "
            f"artifact in ORT; {n} seeded eval samples")


# ----------------------------------------------------------------------------------------------
# export


def export_ensemble(model, run: dict, out_dir: Path, *, opset: int, parity_x: np.ndarray, agree: int | None,
                    extra_meta: dict | None = None, console=None) -> dict:
    """Export an :class:`edgec.stages.eed.Ensemble` as the dynamic artifact (member graphs with
    metadata and parity checks, then ``ensemble.json``) and check the ORT controller against
    PyTorch; writes ``ensemble.check.json`` beside the manifest and returns it."""
    import torch
    import torch.nn.functional as F

    from edgec.atomic import atomic_write_text
    from edgec.pipeline import export_model
    from edgec.runtime.ensemble import MANIFEST, DynamicEnsemble, early_exit
    from edgec.stages.eed import export_dynamic

    out_dir = Path(out_dir)
    member_info = []

    def export_member(mem, path):
        member_info.append(export_model(mem, run, path, opset=opset, parity_x=parity_x, console=console))

    meta = {"classes": run.get("classes"), "num_classes": run.get("num_classes"),
            "normalization": run.get("normalization"), **(extra_meta or {})}
    export_dynamic(model, tuple(run["input_shape"]), out_dir, agree=agree, opset=opset, meta=meta,
                   export_member=export_member)
    dyn = DynamicEnsemble.load(out_dir)
    with torch.no_grad():
        ref = F.softmax(model.eval()(torch.from_numpy(parity_x), True).float(), dim=-1).numpy()
    got = dyn.member_probs(parity_x)
    sim_pred, sim_used, _ = early_exit(ref, threshold=dyn.threshold, agree=dyn.agree)
    pred, used = dyn.predict_batched(parity_x)
    check = {"manifest": str(out_dir / MANIFEST), "k": dyn.k, "threshold": dyn.threshold, "agree": dyn.agree,
             "samples": len(parity_x), "member_prob_max_abs_diff": float(np.abs(ref - got).max()),
             "exit_agreement": float((used == sim_used).mean()), "pred_agreement": float((pred == sim_pred).mean()),
             "members": member_info}
    atomic_write_text(out_dir / "ensemble.check.json", json.dumps(check, indent=2))
    if console is not None:
        ok = check["exit_agreement"] >= 0.99 and check["pred_agreement"] >= 0.99
        colour = "green" if ok else "red"
        console.print(f"exported dynamic ensemble {out_dir}/{MANIFEST}: {dyn.k} members, threshold "
                      f"{dyn.threshold if dyn.threshold is None else round(dyn.threshold, 4)}, agree {dyn.agree}; "
                      f"ORT controller vs PyTorch on {len(parity_x)} samples: exits [{colour}]"
                      f"{check['exit_agreement']:.2%}[/] and predictions [{colour}]{check['pred_agreement']:.2%}[/] "
                      f"identical, member probs max |diff| {check['member_prob_max_abs_diff']:.3g}")
    return check


# ----------------------------------------------------------------------------------------------
# bench


def _full_preds(dyn, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predictions of all K members averaged, over ``x`` in chunks."""
    return np.concatenate([dyn.predict_full(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def bench_ensemble(path: str | Path, *, eval_x: np.ndarray | None = None, eval_y: np.ndarray | None = None,
                   threads: int = 1, batch: int = 1, rounds: int = 3, warmup: int = 10, latency_samples: int = 100,
                   adv: dict | None = None, budget_ms: float | None = None) -> dict[str, Any]:
    """The dynamic ensemble in ORT: sub-models used per input, dynamic vs always-all-K latency
    (interleaved rounds, one run), clean accuracy of both, and robust accuracy of both on ``adv``
    (``{"x": adversarial inputs, "y": labels, "x_clean": the same samples clean, "desc": str}``).

    Latency is timed on the first ``latency_samples`` eval inputs (real data: how early inputs exit
    depends on them), or on random normal inputs when no eval data is given.
    """
    import onnxruntime as ort

    from edgec import runtime
    from edgec.bench import onnx_weight_stats
    from edgec.runtime.ensemble import DynamicEnsemble, manifest_path

    for name, value, low in (("threads", threads, 0), ("batch", batch, 1), ("rounds", rounds, 1),
                             ("warmup", warmup, 0), ("latency_samples", latency_samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if (eval_x is None) != (eval_y is None):
        raise InputError("pass both eval_x and eval_y (inputs and labels), or neither")
    try:
        dyn = DynamicEnsemble.load(path, threads=threads)
    except (runtime.RunnerError, FileNotFoundError) as e:
        raise InputError(str(e), hint="pass RUN_DIR/export/ensemble/ensemble.json of an eed run (or its folder); "
                                      "`edgec export RUN_DIR` writes it") from e
    mpath = Path(manifest_path(path))
    inp = dyn.sessions[0].get_inputs()[0]
    if eval_x is not None:
        timed = np.asarray(eval_x[:latency_samples], dtype=np.float32)
        timed_on = f"first {len(timed)} eval inputs"
    else:
        timed = runtime._random_input(inp, latency_samples)
        timed_on = f"{latency_samples} random normal inputs"
    lat = dyn.compare_latency(timed, rounds=rounds, batch=batch, warmup=warmup)
    files = [mpath.parent / m for m in dyn.meta["members"]]
    stats = [onnx_weight_stats(f) for f in files]
    res: dict[str, Any] = {
        "model": str(mpath), "kind": "dynamic-ensemble", "runtime": "onnxruntime " + ort.__version__,
        "provider": dyn.sessions[0].get_providers()[0], "threads": threads, "batch": batch, "k": dyn.k,
        "threshold": dyn.threshold, "agree": dyn.agree, "latency": lat, "latency_inputs": timed_on,
        "latency_ratio_dynamic_vs_full": lat["ratio"],
        "file_bytes": sum(f.stat().st_size for f in files),
        "weight_bytes_deployed": sum(s["weight_bytes_deployed"] for s in stats),
        "sparse_index_bytes": sum(s["sparse_index_bytes"] for s in stats),
        "params_nonzero": sum(s["params_nonzero"] for s in stats),
        "params_total": sum(s["params_total"] for s in stats),
        "budget_ms": budget_ms, "samples": 0,
    }
    res["sparsity"] = 1 - res["params_nonzero"] / res["params_total"] if res["params_total"] else 0.0
    if eval_x is not None:
        x, y = np.asarray(eval_x, dtype=np.float32), np.asarray(eval_y)
        pred, used = dyn.predict_batched(x)
        full = _full_preds(dyn, x)
        res.update(samples=len(y), accuracy_dynamic=float((pred == y).mean()), accuracy_full=float((full == y).mean()),
                   avg_members=float(used.mean()), members_used_histogram=np.bincount(used, minlength=dyn.k + 1)[1:].tolist())
    if adv is not None:
        xa, ya = np.asarray(adv["x"], dtype=np.float32), np.asarray(adv["y"])
        pa, ua = dyn.predict_batched(xa)
        fa = _full_preds(dyn, xa)
        xc = np.asarray(adv["x_clean"], dtype=np.float32)
        pc, _ = dyn.predict_batched(xc)
        fc = _full_preds(dyn, xc)
        res["robust"] = {"attack": adv["desc"], "samples": len(ya),
                         "clean_accuracy_dynamic": float((pc == ya).mean()),
                         "clean_accuracy_full": float((fc == ya).mean()),
                         "robust_accuracy_dynamic": float((pa == ya).mean()),
                         "robust_accuracy_full": float((fa == ya).mean()),
                         "avg_members_adversarial": float(ua.mean())}
    p50 = lat["dynamic"]["p50_ms"]
    if budget_ms is not None and p50 > budget_ms:
        err = BudgetExceeded(f"dynamic-ensemble p50 latency {p50:.4g} ms exceeds the budget of {budget_ms:g} ms",
                             hint="raise the threshold's tolerance (fewer members per input), or raise --budget-ms")
        err.results = res
        raise err
    return res


def print_ensemble_table(res: dict, console) -> None:
    from rich.table import Table

    def pct(v):
        return "—" if v is None else f"{100 * v:.2f}"

    lat = res["latency"]
    rob = res.get("robust") or {}
    table = Table(title=f"edgec bench: dynamic ensemble, K={res['k']} ({res['runtime']}, "
                        f"{str(res['provider']).replace('ExecutionProvider', '')}, {res['threads']} thread(s), "
                        f"batch {res['batch']}; latency on {res['latency_inputs']}, {lat['rounds']} interleaved rounds)")
    for col in ("mode", "sub-models/input", "mean ms", "p50 ms", "clean acc %", "PGD acc %"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    table.add_row("dynamic (early exit)", f"{res.get('avg_members', lat['dynamic']['avg_members']):.2f}",
                  f"{lat['dynamic']['mean_ms']:.3f}", f"{lat['dynamic']['p50_ms']:.3f}",
                  pct(res.get("accuracy_dynamic")), pct(rob.get("robust_accuracy_dynamic")))
    table.add_row(f"all {res['k']} members", f"{res['k']:.2f}", f"{lat['full']['mean_ms']:.3f}",
                  f"{lat['full']['p50_ms']:.3f}", pct(res.get("accuracy_full")), pct(rob.get("robust_accuracy_full")))
    console.print(table)
    console.print(f"latency dynamic / all-{res['k']}: x{res['latency_ratio_dynamic_vs_full']:.3f} "
                  f"(speed-up x{1 / res['latency_ratio_dynamic_vs_full']:.2f}); threshold {res['threshold']}, "
                  f"agree {res['agree']}")
    if rob:
        console.print(f"robustness: {rob['attack']}; sub-models/input under attack "
                      f"{rob['avg_members_adversarial']:.2f}; clean acc on the same samples "
                      f"{100 * rob['clean_accuracy_dynamic']:.2f} %")


def _check_run_matches(model, dyn_path: Path, x: np.ndarray) -> None:
    """The PyTorch ensemble of the run must be the one the artifact was exported from."""
    import torch
    import torch.nn.functional as F

    from edgec.runtime.ensemble import DynamicEnsemble

    dyn = DynamicEnsemble.load(dyn_path)
    if len(getattr(model, "members", ())) != dyn.k:
        raise InputError(f"the run's model is not a {dyn.k}-member ensemble, so it is not the model of {dyn_path}",
                         hint="pass --run with the run directory the ensemble was exported from")
    with torch.no_grad():
        ref = F.softmax(model.eval()(torch.from_numpy(x), True).float(), dim=-1).numpy()
    diff = float(np.abs(ref - dyn.member_probs(x)).max())
    if diff > 1e-3:
        raise InputError(f"the run's PyTorch ensemble disagrees with {dyn_path} (member probabilities differ by "
                         f"up to {diff:.3g}): it was not exported from this run",
                         hint="pass --run with the matching run directory, or re-export with `edgec export RUN_DIR`")


def bench_ensemble_artifact(path: str | Path, *, data: str | None, run_dir: Path | None = None,
                            eval_samples: int | None = None, pgd_samples: int = 200, pgd_steps: int = 10,
                            pgd_eps: float | None = None, threads: int = 1, batch: int = 1, rounds: int = 3,
                            warmup: int = 10, runs: int = 100, budget_ms: float | None = None,
                            console=None) -> dict:
    """``edgec bench ENSEMBLE.json``: :func:`bench_ensemble` with eval data from ``data`` and PGD robust
    accuracy when the run of the artifact is known (``run_dir``, or the run the artifact lies in:
    ``RUN_DIR/export/ensemble/ensemble.json``). The threat model (eps, norm) defaults to the one the
    run was trained for."""
    from edgec.runtime.ensemble import manifest_path, read_manifest
    from edgec.runs import read_run

    if isinstance(pgd_samples, bool) or not isinstance(pgd_samples, int) or pgd_samples < 0:
        raise InputError(f"pgd_samples must be an integer >= 0, got {pgd_samples!r}")
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise InputError(f"pgd_steps must be an integer >= 1, got {pgd_steps!r}")
    if pgd_eps is not None and not pgd_eps > 0:
        raise InputError(f"pgd_eps must be > 0 (pixel units, e.g. 0.0314 = 8/255), got {pgd_eps!r}")
    from edgec import runtime

    try:
        read_manifest(path, verify=False)  # a clear error before any data is loaded
    except (runtime.RunnerError, FileNotFoundError) as e:
        raise InputError(str(e), hint="pass RUN_DIR/export/ensemble/ensemble.json of an eed run (or its folder); "
                                      "`edgec export RUN_DIR` writes it") from e
    mpath = Path(manifest_path(path)).resolve()
    ex = ey = bundle = None
    if data is not None:
        from edgec.data import load_data, to_numpy

        bundle = load_data(data, max_eval=eval_samples)  # seeded, class-stratified subset
        ex, ey = to_numpy(bundle.eval)
    adv = None
    note = None
    if run_dir is None and (mpath.parents[2] / "run.json").is_file():
        run_dir = mpath.parents[2]
    if pgd_samples > 0 and ex is not None and run_dir is not None:
        from edgec.compress import rebuild_model

        run = read_run(run_dir)
        tm = threat_model(run["identity"]["recipe"]) or {"eps": 8 / 255, "norm": "linf"}
        eps = float(pgd_eps if pgd_eps is not None else tm["eps"])
        model = rebuild_model(run_dir, "final")
        idx = pgd_subset(len(ey), pgd_samples, seed=0)
        _check_run_matches(model, mpath, ex[idx[:64]])
        norm = bundle.normalization if bundle.normalization else run.get("normalization")
        if console is not None:
            console.print(f"PGD-{pgd_steps} on {len(idx)} samples against the PyTorch ensemble of {run_dir} ...")
        xa = robust_inputs(model, ex[idx], ey[idx], normalization=norm, eps=eps, steps=pgd_steps,
                           norm=tm.get("norm", "linf"))
        adv = {"x": xa, "y": ey[idx], "x_clean": ex[idx],
               "desc": _pgd_desc(eps, pgd_steps, tm.get("norm", "linf"), len(idx))}
    elif pgd_samples > 0:
        note = ("no PGD accuracy: " + ("pass --data" if ex is None else
                "the artifact's run directory is unknown (pass --run RUN_DIR)"))
    res = bench_ensemble(mpath, eval_x=ex, eval_y=ey, threads=threads, batch=batch, rounds=rounds, warmup=warmup,
                         latency_samples=runs, adv=adv, budget_ms=budget_ms)
    if note:
        res["note"] = note
        if console is not None:
            console.print(f"[yellow]{note}[/]")
    return res


# ----------------------------------------------------------------------------------------------
# the report of a compress run (edgec.pipeline.finish_run)


def robustness_rows(run_dir: Path, run: dict, rows: list[dict], ex: np.ndarray, ey: np.ndarray, px: np.ndarray, *,
                    opset: int, console=None) -> list[dict]:
    """For a run with adversarial training or an eed stage: PGD robust accuracy of the exported input
    and compressed models (added to ``rows[0]``/``rows[1]`` in place), and for an EED run the dynamic
    artifact in ``export/ensemble/`` with two new report rows (dynamic; all K members), returned."""
    from edgec.compress import rebuild_model
    from edgec.stages.eed import Ensemble

    recipe = run["identity"]["recipe"]
    tm = threat_model(recipe)
    if tm is None:
        return []
    bcfg = recipe.get("bench", {})
    n_pgd, steps = int(bcfg.get("pgd_samples", 200)), int(bcfg.get("pgd_steps", 10))
    idx = pgd_subset(len(ey), n_pgd, seed=recipe.get("seed", 0))
    desc = _pgd_desc(float(tm["eps"]), steps, tm.get("norm", "linf"), len(idx))
    adv_final = None
    models = {which: rebuild_model(run_dir, which) for which in ("input", "final")}
    for row, which in zip(rows, ("input", "final")):
        if n_pgd == 0:
            break
        model = models[which]
        xa = robust_inputs(model, ex[idx], ey[idx], normalization=run["normalization"], eps=float(tm["eps"]),
                           steps=steps, norm=tm.get("norm", "linf"), seed=recipe.get("seed", 0))
        if which == "final":
            adv_final = xa
        row.update(pgd_accuracy=onnx_accuracy(row["path"], xa, ey[idx]),
                   clean_accuracy_pgd_subset=onnx_accuracy(row["path"], ex[idx], ey[idx]), pgd=desc)
        if console is not None:
            console.print(f"{row['name']}: clean {row['clean_accuracy_pgd_subset']:.2%} -> "
                          f"{row['pgd_accuracy']:.2%} under {desc.split(';')[0]} ({len(idx)} samples)")
    model = models["final"]
    if not isinstance(model, Ensemble):
        return []
    eed = next(s for s in reversed(recipe["stages"]) if s["method"] == "eed")
    out_dir = Path(run_dir) / "export" / ENSEMBLE_DIR
    export_ensemble(model, run, out_dir, opset=opset, parity_x=px, agree=eed.get("agree"),
                    extra_meta={"scores": eed["scores"], "target_sparsity": eed["target_sparsity"]}, console=console)
    adv = None if adv_final is None else {"x": adv_final, "y": ey[idx], "x_clean": ex[idx], "desc": desc}
    res = bench_ensemble(out_dir, eval_x=ex, eval_y=ey, threads=bcfg.get("threads", 1), batch=bcfg.get("batch", 1),
                         rounds=3, warmup=bcfg.get("warmup", 10), latency_samples=bcfg.get("runs", 100), adv=adv)
    if console is not None:
        print_ensemble_table(res, console)
    lat, rob = res["latency"], res.get("robust") or {}
    common = {"format": f"onnx-fp32 x{res['k']} + controller", "bits": "fp32", "batch": res["batch"],
              "threads": res["threads"], "samples": res["samples"], "file_bytes": res["file_bytes"],
              "weight_bytes_deployed": res["weight_bytes_deployed"], "sparse_index_bytes": res["sparse_index_bytes"],
              "params_nonzero": res["params_nonzero"], "sparsity": res["sparsity"], "path": str(out_dir / "ensemble.json"),
              "latency_inputs": res["latency_inputs"], "latency_rounds": lat["rounds"]}
    pgd = {"pgd": desc} if rob else {}
    name = recipe.get("name", "eed")
    return [
        {"name": f"{name} dynamic (early exit)", **common, "accuracy": res["accuracy_dynamic"],
         "latency_p50_ms": lat["dynamic"]["p50_ms"], "latency_mean_ms": lat["dynamic"]["mean_ms"],
         "avg_members": res["avg_members"], "latency_ratio_vs_all_k": res["latency_ratio_dynamic_vs_full"],
         "threshold": res["threshold"], "pgd_accuracy": rob.get("robust_accuracy_dynamic"),
         "clean_accuracy_pgd_subset": rob.get("clean_accuracy_dynamic"),
         "avg_members_adversarial": rob.get("avg_members_adversarial"), **pgd},
        {"name": f"{name} all {res['k']} members", **common, "accuracy": res["accuracy_full"],
         "latency_p50_ms": lat["full"]["p50_ms"], "latency_mean_ms": lat["full"]["mean_ms"],
         "avg_members": float(res["k"]), "latency_ratio_vs_all_k": 1.0,
         "pgd_accuracy": rob.get("robust_accuracy_full"),
         "clean_accuracy_pgd_subset": rob.get("clean_accuracy_full"), **pgd},
    ]

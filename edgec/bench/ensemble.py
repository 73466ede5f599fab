"""EED's dynamic ensemble artifact in ONNX Runtime: sub-models used per input, dynamic vs all-K latency
(interleaved rounds), clean and robust accuracy (``edgec bench ensemble.json``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgec.bench.robustness import pgd_description, pgd_subset, robust_inputs, threat_model
from edgec.errors import InputError

__all__ = ["bench_ensemble", "bench_ensemble_artifact", "ensemble_rows", "print_ensemble_table", "run_ensemble_rows"]




def bench_ensemble(path: str | Path, *, eval_x: np.ndarray | None = None, eval_y: np.ndarray | None = None,
                   threads: int = 1, batch: int = 1, rounds: int = 3, warmup: int = 10, latency_samples: int = 100,
                   adv: dict | None = None, budget_ms: float | None = None, remote=None, devices_file=None,
                   accept_new_host_key: bool = False) -> dict[str, Any]:
    """The dynamic ensemble in ORT: sub-models used per input, dynamic vs always-all-K latency
    (interleaved rounds, one run), clean accuracy of both, and robust accuracy of both on ``adv``
    (``{"x": adversarial inputs, "y": labels, "x_clean": the same samples clean, "desc": str}``).

    Latency is timed on the first ``latency_samples`` eval inputs (real data: how early inputs exit
    depends on them), or on random normal inputs when no eval data is given. The measurement is
    :func:`edgec.runtime.device.measure_ensemble`, here or, with ``remote`` (as in
    :func:`edgec.bench.bench`), on that device over SSH.
    """
    from edgec import runtime
    from edgec.bench.latency import check_budget, local_device, target_label
    from edgec.export.size import onnx_weight_stats
    from edgec.runtime.device import measure_ensemble
    from edgec.runtime.ensemble import manifest_path, read_manifest

    for name, value, low in (("threads", threads, 0), ("batch", batch, 1), ("rounds", rounds, 1),
                             ("warmup", warmup, 0), ("latency_samples", latency_samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if (eval_x is None) != (eval_y is None):
        raise InputError("pass both eval_x and eval_y (inputs and labels), or neither")
    hint = "pass RUN_DIR/export/ensemble/ensemble.json of an eed run (or its folder); `edgec export RUN_DIR` writes it"
    try:
        _, meta = read_manifest(path, verify=True)
    except (runtime.RunnerError, FileNotFoundError) as e:
        raise InputError(str(e), hint=hint) from e
    mpath = Path(manifest_path(path))
    x = None if eval_x is None else np.asarray(eval_x, dtype=np.float32)
    y = None if eval_y is None else np.asarray(eval_y)
    adv_arrays = None if adv is None else {k: adv[k] for k in ("x", "y", "x_clean")}
    opts = dict(threads=threads, batch=batch, warmup=warmup, runs=latency_samples, rounds=rounds)
    if remote is not None:
        from edgec.bench.remote import measure_on_device

        m, device = measure_on_device(mpath, remote, kind="ensemble", inputs=x, labels=y, adv=adv_arrays,
                                      devices_file=devices_file, accept_new_host_key=accept_new_host_key, **opts)
    else:
        try:
            m = measure_ensemble(str(mpath), inputs=x, labels=y, adv=adv_arrays, **opts)
        except (runtime.RunnerError, FileNotFoundError) as e:
            raise InputError(str(e), hint=hint) from e
        device = local_device()
    lat = m["latency"]
    files = [mpath.parent / f for f in meta["members"]]
    stats = [onnx_weight_stats(f) for f in files]
    res: dict[str, Any] = {
        "model": str(mpath), "kind": "dynamic-ensemble", "runtime": "onnxruntime " + device["onnxruntime"],
        "provider": m["provider"], "threads": threads, "batch": batch, "k": m["k"],
        "threshold": m["threshold"], "agree": m["agree"], "latency": lat, "latency_inputs": m["latency_inputs"],
        "latency_ratio_dynamic_vs_full": lat["ratio"],
        "file_bytes": sum(f.stat().st_size for f in files),
        "weight_bytes_deployed": sum(s["weight_bytes_deployed"] for s in stats),
        "sparse_index_bytes": sum(s["sparse_index_bytes"] for s in stats),
        "params_nonzero": sum(s["params_nonzero"] for s in stats),
        "params_total": sum(s["params_total"] for s in stats),
        "budget_ms": budget_ms, "samples": m["samples"],
        "target": target_label(device), "emulated": bool(device.get("emulated")), "device": device,
    }
    res["sparsity"] = 1 - res["params_nonzero"] / res["params_total"] if res["params_total"] else 0.0
    for key in ("accuracy_dynamic", "accuracy_full", "avg_members", "members_used_histogram"):
        if key in m:
            res[key] = m[key]
    if "robust" in m:
        res["robust"] = {"attack": adv["desc"], **m["robust"]}
    check_budget(res, lat["dynamic"]["p50_ms"], budget_ms, "dynamic-ensemble",
                 "raise the threshold's tolerance (fewer members per input), or raise --budget-ms")
    return res


def print_ensemble_table(res: dict, console) -> None:
    from rich.table import Table

    def pct(v):
        return "—" if v is None else f"{100 * v:.2f}"

    lat = res["latency"]
    rob = res.get("robust") or {}
    emu = "; EMULATED: latency is not a device speed" if res.get("emulated") else ""
    table = Table(title=f"edgec bench on {res.get('target', 'local')}: dynamic ensemble, K={res['k']} ({res['runtime']}, "
                        f"{str(res['provider']).replace('ExecutionProvider', '')}, {res['threads']} thread(s), "
                        f"batch {res['batch']}; latency on {res['latency_inputs']}, {lat['rounds']} interleaved rounds{emu})")
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
                            console=None, remote=None, devices_file=None, accept_new_host_key: bool = False) -> dict:
    """``edgec bench ENSEMBLE.json``: :func:`bench_ensemble` with eval data from ``data`` and PGD robust
    accuracy when the run of the artifact is known (``run_dir``, or the run the artifact lies in:
    ``RUN_DIR/export/ensemble/ensemble.json``). The threat model (eps, norm) defaults to the one the
    run was trained for."""
    from edgec.runtime.ensemble import manifest_path, read_manifest
    from edgec.runs import read_run, rebuild_model, run_recipe

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
        run = read_run(run_dir)
        tm = threat_model(run_recipe(run)) or {"eps": 8 / 255, "norm": "linf"}
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
               "desc": pgd_description(eps, pgd_steps, tm.get("norm", "linf"), len(idx))}
    elif pgd_samples > 0:
        note = ("no PGD accuracy: " + ("pass --data" if ex is None else
                "the artifact's run directory is unknown (pass --run RUN_DIR)"))
    res = bench_ensemble(mpath, eval_x=ex, eval_y=ey, threads=threads, batch=batch, rounds=rounds, warmup=warmup,
                         latency_samples=runs, adv=adv, budget_ms=budget_ms, remote=remote,
                         devices_file=devices_file, accept_new_host_key=accept_new_host_key)
    if note:
        res["note"] = note
        if console is not None:
            console.print(f"[yellow]{note}[/]")
    return res




def run_ensemble_rows(ensemble_dir: Path, recipe, ex: np.ndarray, ey: np.ndarray, *, adv: dict | None = None,
                      console=None, remote=None) -> list[dict]:
    """The report rows of a compress run's dynamic ensemble (``adv``: adversarial samples for robust accuracy;
    ``remote``: measured on that device)."""
    bc = recipe.bench
    res = bench_ensemble(ensemble_dir, eval_x=ex, eval_y=ey, threads=bc.threads, batch=bc.batch, rounds=3,
                         warmup=bc.warmup, latency_samples=bc.runs, adv=adv, remote=remote)
    if console is not None:
        print_ensemble_table(res, console)
    name = recipe.name if remote is None else f"{recipe.name} @ {res['target']}"
    return ensemble_rows(res, name=name, path=Path(ensemble_dir) / "ensemble.json",
                         desc=adv["desc"] if adv else "")


def ensemble_rows(res: dict, *, name: str, path: Path, desc: str) -> list[dict]:
    """Two report rows of a dynamic-ensemble bench: early exit, and always all K members."""
    lat, rob = res["latency"], res.get("robust") or {}
    common = {"format": f"onnx-fp32 x{res['k']} + controller", "bits": "fp32", "batch": res["batch"],
              "threads": res["threads"], "samples": res["samples"], "file_bytes": res["file_bytes"],
              "weight_bytes_deployed": res["weight_bytes_deployed"], "sparse_index_bytes": res["sparse_index_bytes"],
              "params_nonzero": res["params_nonzero"], "sparsity": res["sparsity"], "path": str(path),
              "latency_inputs": res["latency_inputs"], "latency_rounds": lat["rounds"],
              "device": res.get("target"), "emulated": res.get("emulated", False)}
    pgd = {"pgd": desc} if rob else {}
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

"""After compression: export the input and compressed models, check them, bench them, report.

Accuracy that counts is measured on the exported artifact in ONNX Runtime (DESIGN.md principle 4).
"""
from __future__ import annotations

import json
from pathlib import Path

from edgec.errors import ExportError
from edgec.atomic import atomic_write_text
from edgec.runs import read_run


def _eval_arrays(run: dict, limit: int | None):
    x, y, _ = _eval_data(run, limit)
    return x, y


def _eval_data(run: dict, limit: int | None):
    """Eval inputs, labels and per-sample groups (speaker, device, ...; aligned with the samples)."""
    from edgec.data import load_data, to_numpy

    # max_eval draws a seeded, class-stratified subset (eval folders are often sorted by class)
    data = load_data(run["identity"]["data"], seed=run["identity"]["recipe"].get("seed", 0), max_eval=limit)
    x, y = to_numpy(data.eval)
    return x, y, dict(data.groups or {})


def export_model(model, run: dict, out: Path, *, opset: int, parity_x, console=None) -> dict:
    """Export one model to ONNX, run the self-checks, print and return them."""
    from edgec.bench import onnx_weight_stats
    from edgec.export.check import check_export
    from edgec.export.onnx_export import export_onnx

    from edgec.export.metadata import write_model_metadata

    res = export_onnx(model, tuple(run["input_shape"]), out, opset=opset)
    # class names (and an audio model's front end) travel inside the file to the device runner
    write_model_metadata(out, classes=run.get("classes"), normalization=run.get("normalization"))
    parity = check_export(model, out, parity_x)
    stats = onnx_weight_stats(out)
    info = {"path": str(out), "quantized": res.quantized, "opset": opset, "parity": parity.as_dict(),
            "file_bytes": out.stat().st_size, "weight_bytes_deployed": stats["weight_bytes_deployed"],
            "sparse_index_bytes": stats["sparse_index_bytes"], "params_nonzero": stats["params_nonzero"],
            "params_total": stats["params_total"], "weights": res.weight_tensors}
    atomic_write_text(out.with_suffix(".check.json"), json.dumps(info, indent=2))
    if console is not None:
        ok = parity.top1_agreement >= 0.99
        colour = "green" if ok else "red"
        console.print(
            f"exported {out.name}: onnx.checker {'ok' if parity.checker_ok else 'FAILED'}; parity on {parity.samples} real samples: "
            f"max |diff| {parity.max_abs_diff:.4g}, top-1 agreement [{colour}]{parity.top1_agreement:.2%}[/]; "
            f"ORT integer kernels: {parity.fused_compute}/{parity.compute_nodes} Conv/Gemm fused "
            f"{dict(parity.integer_ops) or ''}; file {info['file_bytes'] / 1024:.1f} KB, "
            f"deployed weights {info['weight_bytes_deployed'] / 1024:.1f} KB "
            f"(+{info['sparse_index_bytes'] / 1024:.1f} KB sparse bitmask), {info['params_nonzero']:,} non-zero params")
        if not ok:
            console.print("[red]warning: exported model disagrees with PyTorch on more than 1% of samples[/]")
    return info


def export_run(run_dir: Path, *, target: str | None = None, opset: int | None = None, out: Path | None = None,
               fmt: str = "onnx", console=None) -> dict:
    """``edgec export RUN_DIR``: the compressed model -> ONNX (and a TensorRT engine for tensorrt)."""
    from edgec.compress import rebuild_model

    run_dir = Path(run_dir)
    run = read_run(run_dir)
    recipe = run["identity"]["recipe"]
    trained_for = recipe.get("target", "x86")
    target = target or trained_for
    if target != trained_for:
        raise ExportError(
            f"this run was trained for target {trained_for!r}, whose integer ranges differ from {target!r}",
            hint=f"re-run compress with `--set target={target}` so QAT trains for that target's ranges")
    if fmt != "onnx":
        raise ExportError(f"unknown format {fmt!r}", hint="use --format onnx")
    opset = opset or recipe.get("export", {}).get("opset", 17)
    model = rebuild_model(run_dir, "final")
    px, _ = _eval_arrays(run, recipe.get("export", {}).get("parity_samples", 1000))
    out = Path(out) if out else run_dir / "export" / "model_compressed.onnx"
    info = export_model(model, run, out, opset=opset, parity_x=px, console=console)
    if hasattr(model, "members"):  # eed: also the deployable dynamic ensemble (member graphs + ensemble.json)
        from edgec.ensemble_bench import ENSEMBLE_DIR, export_ensemble

        eed = next(s for s in reversed(recipe["stages"]) if s["method"] == "eed")
        info["ensemble"] = export_ensemble(model, run, out.parent / ENSEMBLE_DIR, opset=opset, parity_x=px,
                                           agree=eed.get("agree"), console=console,
                                           extra_meta={"scores": eed["scores"], "target_sparsity": eed["target_sparsity"]})
    if target == "tensorrt":
        from edgec.export.tensorrt import build_engine

        info["engine"] = str(build_engine(out, out.with_suffix(".engine"), int8=True))
    return info


def _fidelity_gate(run_dir: Path, run: dict, rows: list[dict], px, models: dict, *, allow_low_fidelity: bool,
                   console=None):
    """Fidelity of model_compressed.onnx to the FP32 input model (edgec.export.fidelity): adds
    ``fidelity_top1`` / ``fidelity_sqnr_db`` to the compressed row and writes export/fidelity.json.
    Returns the FidelityError to raise (below ``export.min_fidelity``, not allowed) or None. The gate
    applies only to a model given with --weights: a randomly initialised input has nothing to keep."""
    from edgec.export.fidelity import check_fidelity, fidelity_error

    ecfg = run["identity"]["recipe"].get("export", {})
    threshold = ecfg.get("min_fidelity", 0.9)
    fid = check_fidelity(models["input"], run_dir / "export" / "model_compressed.onnx", px,
                         quant_model=models["final"])
    rows[1].update(fidelity_top1=fid.top1_agreement, fidelity_sqnr_db=fid.sqnr_db)
    rows[0].update(fidelity_top1=1.0)
    atomic_write_text(run_dir / "export" / "fidelity.json", json.dumps(fid.as_dict(), indent=2, default=float))
    if console is not None:
        from rich.markup import escape  # layer names carry "[quantized]"

        console.print(f"fidelity to the FP32 model on {fid.samples} real samples: top-1 agreement "
                      f"{fid.top1_agreement:.2%}, output SQNR {fid.sqnr_db:.1f} dB, KL {fid.kl:.3g}; "
                      f"worst layers: {escape(fid.describe_worst())}")
    gated = threshold is not None and run["identity"].get("weights_sha256") is not None
    if gated and fid.top1_agreement < threshold:
        if not allow_low_fidelity:
            return fidelity_error(fid, threshold)
        if console is not None:
            console.print("[yellow]fidelity below export.min_fidelity: kept because of --allow-low-fidelity[/]")
    return None


def finish_run(run_dir: Path, *, console=None, allow_low_fidelity: bool = False) -> dict:
    """Export FP32 input + compressed model, bench both in ORT with accuracy, write the report."""
    from edgec.bench import bench, print_bench_table
    from edgec.compress import rebuild_model
    from edgec.prune import sparsity_stats
    from edgec.recipe import QUANT_METHODS
    from edgec.report import write_report

    run_dir = Path(run_dir)
    run = read_run(run_dir)
    recipe = run["identity"]["recipe"]
    bcfg = recipe.get("bench", {})
    ecfg = recipe.get("export", {})
    ex, ey, groups = _eval_data(run, bcfg.get("eval_samples"))
    n_par = ecfg.get("parity_samples", 1000)
    px = ex[:: max(1, len(ex) // n_par)][:n_par]  # spread over the eval set (often sorted by class)
    opset = ecfg.get("opset", 17)
    rows, benches, models = [], [], {}
    quant_stage = next((s for s in recipe["stages"] if s["method"] in QUANT_METHODS), None)
    bits = f"w{quant_stage['weight_bits']}a{quant_stage['act_bits']}" if quant_stage else "fp32"
    for which, name in (("input", "model_fp32"), ("final", "model_compressed")):
        model = models[which] = rebuild_model(run_dir, which)
        info = export_model(model, run, run_dir / "export" / f"{name}.onnx", opset=opset, parity_x=px,
                            console=console)
        b = bench(info["path"], eval_x=ex, eval_y=ey, threads=bcfg.get("threads", 1),
                  batch=bcfg.get("batch", 1), warmup=bcfg.get("warmup", 10), runs=bcfg.get("runs", 100),
                  eval_groups=groups)
        benches.append(b)
        sp = sparsity_stats(model)
        rows.append({"name": "fp32 input" if which == "input" else recipe.get("name", "compressed"),
                     "format": "onnx-int8" if info["quantized"] else "onnx-fp32",
                     "bits": bits if which == "final" else "fp32",
                     "accuracy": b["accuracy"], "latency_p50_ms": b["latency_ms"]["p50"],
                     "latency_p90_ms": b["latency_ms"]["p90"], "throughput_per_s": b["throughput_per_s"],
                     "file_bytes": b["file_bytes"], "weight_bytes_deployed": b["weight_bytes_deployed"],
                     "sparse_index_bytes": b["sparse_index_bytes"], "sparsity": sp["sparsity"],
                     "params_nonzero": b["params_nonzero"], "parity_top1": info["parity"]["top1_agreement"],
                     "parity_max_abs_diff": info["parity"]["max_abs_diff"],
                     "integer_kernels": f"{info['parity']['fused_compute']}/{info['parity']['compute_nodes']}",
                     "batch": b["batch"], "threads": b["threads"], "samples": b["samples"], "path": info["path"],
                     **({"accuracy_by_group": b["accuracy_by_group"]} if b.get("accuracy_by_group") else {})})
    if console is not None:
        print_bench_table(benches, console)
    low_fidelity = _fidelity_gate(run_dir, run, rows, px, models, allow_low_fidelity=allow_low_fidelity,
                                  console=console)
    # adversarially trained runs: PGD accuracy of both artifacts; eed: the dynamic ensemble + its rows
    from edgec.ensemble_bench import robustness_rows

    extra = robustness_rows(run_dir, run, rows, ex, ey, px, opset=opset, console=console)
    paths = write_report(run_dir, rows + extra, title=f"edgec {recipe.get('name')} on {run['identity']['data']}")
    if console is not None and len(rows) == 2 and rows[0]["accuracy"] is not None:
        a0, a1 = rows[0]["accuracy"], rows[1]["accuracy"]
        speed = rows[0]["latency_p50_ms"] / rows[1]["latency_p50_ms"]
        console.print(f"[bold]accuracy {a0:.2%} -> {a1:.2%} ({(a1 - a0) * 100:+.2f} pt), "
                      f"fidelity to FP32 {rows[1].get('fidelity_top1', float('nan')):.2%}, "
                      f"ORT p50 speed-up x{speed:.2f}, deployed weights "
                      f"{rows[0]['weight_bytes_deployed'] / 1024:.1f} KB -> {rows[1]['weight_bytes_deployed'] / 1024:.1f} KB[/]")
        console.print(f"report: {paths['md']}  plot: {paths['png']}")
    if low_fidelity is not None:  # after the report: it shows what was measured
        raise low_fidelity
    return {"rows": rows + extra, "paths": {k: str(v) for k, v in paths.items()}}

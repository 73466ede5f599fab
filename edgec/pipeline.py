"""One compress run, in one direction: load and validate -> stages -> export -> bench -> report.

1. everything is loaded and validated up front (recipe, data, model, teachers, byte budgets): every
   error before any training;
2. the stages run in order with the shared engine (:func:`edgec.stages.runner.run_stages`);
3. the FP32 input model and the compressed model, as they are in memory, are exported to ONNX and
   checked (:func:`edgec.export.artifact.export_model`);
4. both artifacts are measured in ONNX Runtime (accuracy, size, memory; latency of the two in one
   interleaved run per batch, :mod:`edgec.bench.run_latency`), robust accuracy when the recipe
   trains adversarially, EED's dynamic ensemble when there is one;
5. the report is written (:func:`edgec.report.write_report`).

Every arrow is also a file in the run directory (:mod:`edgec.runs`), so ``edgec export RUN_DIR`` and
``edgec bench`` re-run steps 3 and 4 alone from disk. The typed :class:`edgec.recipe.Recipe` travels
through all steps; the data is loaded once.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgec import __version__
from edgec.atomic import atomic_torch_save, atomic_write_text
from edgec.errors import ExportError, RunDirError
from edgec.recipe import Recipe, dump_recipe, load_recipe
from edgec.runlock import describe_holder, lock_run_dir, make_out_dir
from edgec.runs import IN_MEMORY, build_model, check_model_file, file_sha256, fingerprint, model_file_of, \
    prepare_run_dir, read_run, rebuild_model, run_recipe

__all__ = ["CompressRequest", "RunResult", "compress", "export_run", "finish_run"]


@dataclass
class CompressRequest:
    """What ``edgec compress`` was asked (the CLI's options); the Python API builds one too."""

    model: str
    data: str
    recipe: str
    weights: str | None = None
    overrides: tuple[str, ...] = ()
    out: Path = Path("runs/latest")
    device: str = "auto"
    resume: bool = False
    force: bool = False
    trust_pickle: bool = False
    export: bool = True
    allow_low_fidelity: bool = False  # keep an artifact below export.min_fidelity (no FidelityError)


@dataclass
class RunResult:
    """The outcome of a compress run: where it is, the report rows, and the models in memory."""

    run_dir: Path
    rows: list[dict] = field(default_factory=list)
    report: dict[str, str] = field(default_factory=dict)  # md / json / png paths
    artifacts: dict[str, dict] = field(default_factory=dict)  # export checks by artifact name
    model: Any = None  # the compressed model (CPU, eval mode)
    input_model: Any = None  # the FP32 model as given
    latency: dict | None = None  # the interleaved latency comparison behind the rows

    def __fspath__(self) -> str:
        return str(self.run_dir)


@dataclass
class _Inputs:
    recipe: Recipe
    data: Any  # edgec.data.DataBundle
    model: Any
    teachers: dict[int, Any]
    identity: dict


def _abs_spec(spec: str) -> str:
    """Make a file-based model spec absolute so the run can be rebuilt from anywhere."""
    path, sep, factory = spec.rpartition(":")
    if sep and (path.endswith(".py") or "/" in path) and Path(path).exists():
        return f"{Path(path).resolve()}:{factory}"
    return spec


def _abs_data(spec: str) -> str:
    kind, sep, arg = spec.partition(":")
    if sep and kind in ("cifar10", "imagefolder") and Path(arg).exists():
        return f"{kind}:{Path(arg).resolve()}"
    if sep and kind == "python":
        return f"python:{_abs_spec(arg)}"
    return spec


def resolve_teachers(recipe: Recipe, input_model, *, num_classes: int, in_channels: int,
                     trust_pickle: bool) -> dict[int, Any]:
    teachers = {}
    for i, st in enumerate(recipe.stages):
        kd = getattr(st, "kd", None)
        if kd is None:
            continue
        if kd.teacher == "input":
            teachers[i] = copy.deepcopy(input_model).eval()
        else:
            teachers[i] = build_model(kd.teacher, num_classes=num_classes, in_channels=in_channels,
                                      weights=kd.teacher_weights, trust_pickle=trust_pickle).eval()
    return teachers


def check_byte_budgets(recipe: Recipe, model, example_input=None) -> None:
    """Every ``prune`` stage's ``target_bytes`` must be reachable by pruning this model (checked before
    any training; raises RecipeError naming what takes the bytes)."""
    from edgec.budget import deployment_norm_bits, plan_bytes
    from edgec.errors import RecipeError

    for i, st in enumerate(recipe.stages):
        if st.method == "prune" and st.target_bytes is not None:
            try:
                plan_bytes(model, target_bytes=st.target_bytes, deployed_bits=st.deployed_bits,
                           norm_bits=deployment_norm_bits(recipe), include_first_last=st.prune_first_last,
                           example_input=example_input)
            except RecipeError as e:
                raise RecipeError(f"stages.{i}.target_bytes: {e.message}", hint=e.hint) from e


def _plain_print(*objects) -> None:
    """Log lines without a rich console (library use, benchmarks): rich markup stripped, not printed raw."""
    from rich.text import Text

    print(*(Text.from_markup(o).plain if isinstance(o, str) else o for o in objects))


def _model_identity(model) -> str:
    """The SPEC recorded for an in-memory model: its class and a hash of its initial state."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    cls = type(model)
    return f"{IN_MEMORY}{cls.__module__}.{cls.__qualname__} {h.hexdigest()[:16]}>"


def load_inputs(req: CompressRequest, *, model=None, data=None, recipe: Recipe | None = None) -> _Inputs:
    """Step 1: recipe, data, model and teachers, all validated before any training.

    ``model`` / ``data`` / ``recipe`` given as objects (Python API) replace the request's SPECs."""
    import torch

    from edgec.data import load_data
    from edgec.stages import get_handler

    recipe = recipe if recipe is not None else load_recipe(req.recipe, list(req.overrides))
    for st in recipe.stages:
        get_handler(st.method)
    data = data if data is not None else load_data(req.data, seed=recipe.seed)
    num_classes, in_channels = data.num_classes, data.input_shape[0]
    if model is None:
        torch.manual_seed(recipe.seed)  # a model without --weights is initialised reproducibly
        model = build_model(req.model, num_classes=num_classes, in_channels=in_channels, weights=req.weights,
                            trust_pickle=req.trust_pickle)
        model_spec = _abs_spec(req.model)
    else:
        model_spec = _model_identity(model)
    teachers = resolve_teachers(recipe, model, num_classes=num_classes, in_channels=in_channels,
                                trust_pickle=req.trust_pickle)
    from edgec.capture import example_from_data

    check_byte_budgets(recipe, model, example_from_data(data))
    from edgec.quant.precision import check_recipe_layers

    check_recipe_layers(recipe, model)  # a `layers:` glob that names no layer: refused before any training
    if data.num_classes < 2:  # one class "trains" to 100 % accuracy and measures nothing
        from edgec.errors import DataError

        raise DataError(f"the data {data.describe()} has {data.num_classes} class; classification needs at least 2",
                        hint="check the data SPEC: every class needs its own folder / label")
    identity = {"model": model_spec, "data": _abs_data(req.data if req.data else data.spec),
                "weights_sha256": file_sha256(Path(req.weights)) if req.weights else None,
                "recipe": recipe.model_dump(mode="json")}
    return _Inputs(recipe, data, model, teachers, identity)


def _write_run_files(run_dir: Path, inp: _Inputs, req: CompressRequest) -> dict:
    data = inp.data
    run = {"edgec": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "fingerprint": fingerprint(inp.identity), "identity": inp.identity, "weights": req.weights,
           "num_classes": data.num_classes, "input_shape": list(data.input_shape), "classes": data.classes,
           "normalization": data.normalization}
    model_file = model_file_of(inp.identity["model"])  # `edgec export` re-imports it: refused if it changes
    run["model_file_sha256"] = file_sha256(model_file) if model_file is not None and model_file.is_file() else None
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "run.json", json.dumps(run, indent=2))
    atomic_write_text(run_dir / "recipe.yaml", dump_recipe(inp.recipe))
    atomic_torch_save({"model": inp.model.state_dict()}, run_dir / "model_input.pt")
    atomic_write_text(run_dir / "state.json", json.dumps({"completed": 0}))
    return run


def compress(req: CompressRequest, *, console=None, model=None, data=None, recipe: Recipe | None = None) -> RunResult:
    """Run a compression recipe end to end (steps 1-5); returns the run's :class:`RunResult`."""
    from edgec.distributed import init_distributed, is_main

    inp = load_inputs(req, model=model, data=data, recipe=recipe)
    dist = init_distributed(req.device)
    inp.identity["world_size"] = dist.world_size
    run_dir = Path(req.out)
    lock = lock_run_dir(run_dir) if is_main() else None  # one writer per run directory, for the whole run
    try:
        continuing = prepare_run_dir(run_dir, inp.identity, resume=req.resume, force=req.force) if is_main() else False
    except RunDirError:
        if lock is not None:
            lock.discard()
        raise
    try:
        return _compress_locked(req, inp, dist, run_dir, continuing, lock, console=console, model=model)
    finally:
        if lock is not None:
            lock.release()


def _compress_locked(req: CompressRequest, inp: _Inputs, dist, run_dir: Path, continuing: bool, lock, *, console,
                     model) -> RunResult:
    """Steps 2-5 of :func:`compress`, with ``run_dir`` locked by this process."""
    import torch

    from edgec.distributed import barrier, is_main, shutdown_distributed
    from edgec.stages.runner import run_stages

    log = console.print if console is not None else _plain_print
    recipe, data = inp.recipe, inp.data
    barrier()
    if lock is not None and lock.taken_over:
        log(f"[yellow]took over the lock of a run that is gone: {describe_holder(lock.taken_over)}[/]")
    if not req.weights and model is None:
        log("[yellow]no --weights given: compressing a randomly initialised model[/]")
    log(f"data: {data.describe()}")
    log(f"recipe: {recipe.name} ({len(recipe.stages)} stages, target {recipe.target}) -> {run_dir}")

    completed = 0
    if continuing:  # the input model as the first attempt saw it (also the KD teacher "input")
        if (run_dir / "state.json").is_file():
            completed = int(json.loads((run_dir / "state.json").read_text())["completed"])
        inp.model.load_state_dict(torch.load(run_dir / "model_input.pt", map_location="cpu",
                                             weights_only=True)["model"])
        inp.teachers = resolve_teachers(recipe, inp.model, num_classes=data.num_classes,
                                        in_channels=data.input_shape[0], trust_pickle=req.trust_pickle)
    elif is_main():
        _write_run_files(run_dir, inp, req)
    barrier()
    input_model = copy.deepcopy(inp.model).cpu().eval()
    final = run_stages(inp.model, recipe, data=data, run_dir=run_dir, dist=dist, teachers=inp.teachers,
                       resume=req.resume, completed=completed, log=log)
    if dist.world_size > 1:
        shutdown_distributed()
    result = RunResult(run_dir=run_dir, model=final.cpu().eval(), input_model=input_model)
    if not is_main() or not req.export:
        return result
    if not recipe.export.enabled:
        log("export.enabled is false in the recipe: nothing exported or benched (run `edgec export RUN_DIR` later)")
        return result
    return finish_run(run_dir, read_run(run_dir), recipe, data, input_model, result.model, console=console,
                      result=result, allow_low_fidelity=req.allow_low_fidelity)


# ---------------------------------------------------------------------------------------------
# steps 3-5


def _parity_inputs(ex, n: int):
    return ex[:: max(1, len(ex) // n)][:n]  # spread over the eval set (often sorted by class)


def _eval_arrays(data, recipe: Recipe):
    """Eval inputs, labels and per-sample groups for the artifacts' measurement. A ``bench.eval_samples``
    limit draws its seeded, class-stratified subset from the data SPEC (eval folders are sorted by class)."""
    from edgec.data import load_data, to_numpy

    n = recipe.bench.eval_samples
    if n is not None and n < len(data.eval):
        data = load_data(data.spec, seed=recipe.seed, max_eval=n)
    x, y = to_numpy(data.eval)
    return x, y, dict(data.groups or {})


def _bits(recipe: Recipe) -> str:
    from edgec.stages import quantizing_methods

    quant = next((s for s in recipe.stages if s.method in quantizing_methods()), None)
    return f"w{quant.weight_bits}a{quant.act_bits}" if quant else "fp32"


def _nm_expectation(recipe: Recipe, model, which: str):
    """The N:M pattern the compressed artifact must show (edgec.export.sparsity); None for the input
    model and for recipes without a ``pattern``."""
    if which != "final" or not any(getattr(st, "pattern", None) for st in recipe.stages):
        return None
    from edgec.export.sparsity import expected_layers

    return expected_layers(recipe, model)


def _row(name: str, which: str, info: dict, b: dict | None, bits: str, sparsity: float) -> dict:
    b = b or {}
    lat = b.get("latency_ms") or {}
    row = {"name": name, "format": "onnx-int8" if info["quantized"] else "onnx-fp32",
           "bits": bits if which == "final" else "fp32", "accuracy": b.get("accuracy"),
           "latency_p50_ms": lat.get("p50"), "latency_p90_ms": lat.get("p90"),
           "throughput_per_s": b.get("throughput_per_s"), "file_bytes": info["file_bytes"],
           "weight_bytes_deployed": info["weight_bytes_deployed"], "sparse_index_bytes": info["sparse_index_bytes"],
           "sparsity": sparsity, "params_nonzero": info["params_nonzero"],
           "parity_top1": info["parity"]["top1_agreement"], "parity_max_abs_diff": info["parity"]["max_abs_diff"],
           "integer_kernels": f"{info['parity']['fused_compute']}/{info['parity']['compute_nodes']}",
           "batch": b.get("batch"), "threads": b.get("threads"), "samples": b.get("samples"), "path": info["path"],
           "device": b.get("target")}
    if b.get("accuracy_by_group"):
        row["accuracy_by_group"] = b["accuracy_by_group"]
    row.update(_graph_fields(info["path"], b))
    return row


def _graph_fields(path: str, b: dict) -> dict:
    """MACs, params and peak activation memory of the exported graph (the bench's, or counted here)."""
    from edgec.export.graph_stats import SUMMARY_KEYS, graph_summary

    return {k: b[k] for k in SUMMARY_KEYS} if all(k in b for k in SUMMARY_KEYS) else graph_summary(path)


def _fidelity_gate(run_dir: Path, run: dict, recipe: Recipe, rows: list[dict], px, input_model, final_model, *,
                   allow_low_fidelity: bool, console=None):
    """Fidelity of model_compressed.onnx to the FP32 input model (edgec.export.fidelity): adds
    ``fidelity_top1`` / ``fidelity_sqnr_db`` to the compressed row and writes export/fidelity.json.
    Returns the FidelityError to raise (below ``export.min_fidelity``, not allowed) or None. The gate
    applies to a trained input (``--weights``, or an in-memory model through the Python API; a randomly
    initialised model has nothing to keep) of a recipe that quantizes."""
    from edgec.export.fidelity import check_fidelity, fidelity_error

    threshold = recipe.export.min_fidelity
    fid = check_fidelity(input_model, run_dir / "export" / "model_compressed.onnx", px, quant_model=final_model)
    rows[1].update(fidelity_top1=fid.top1_agreement, fidelity_sqnr_db=fid.sqnr_db)
    rows[0].update(fidelity_top1=1.0)
    atomic_write_text(run_dir / "export" / "fidelity.json", json.dumps(fid.as_dict(), indent=2, default=float))
    if console is not None:
        from rich.markup import escape  # layer names carry "[quantized]"

        console.print(f"fidelity to the FP32 model on {fid.samples} real samples: top-1 agreement "
                      f"{fid.top1_agreement:.2%}, output SQNR {fid.sqnr_db:.1f} dB, KL {fid.kl:.3g}; "
                      f"worst layers: {escape(fid.describe_worst())}")
    ident = run["identity"]
    trained = ident.get("weights_sha256") is not None or str(ident.get("model", "")).startswith(IN_MEMORY)
    # gated where the artifact is meant to compute the input model's function at lower precision: a
    # recipe that quantizes. A prune/distill-only run is meant to change the model; the accuracy gate
    # (bench.max_drop, exit 7) judges it
    quantizes = _bits(recipe) != "fp32"
    if threshold is not None and trained and quantizes and fid.top1_agreement < threshold:
        if not allow_low_fidelity:
            return fidelity_error(fid, threshold)
        if console is not None:
            console.print("[yellow]fidelity below export.min_fidelity: kept because of --allow-low-fidelity[/]")
    return None


def finish_run(run_dir: Path, run: dict, recipe: Recipe, data, input_model, final_model, *, console=None,
               result: RunResult | None = None, allow_low_fidelity: bool = False) -> RunResult:
    """Steps 3-5 on the models in memory: export + check both, bench them in ORT, write the report."""
    from edgec.bench import bench, print_bench_table
    from edgec.bench.robustness import robustness_rows
    from edgec.export.artifact import export_model
    from edgec.masks import sparsity_stats
    from edgec.report import write_report

    run_dir = Path(run_dir)
    result = result or RunResult(run_dir=run_dir, model=final_model, input_model=input_model)
    ex, ey, groups = _eval_arrays(data, recipe)
    px = _parity_inputs(ex, recipe.export.parity_samples)
    rows, benches = [], []
    for which, fname, model in (("input", "model_fp32", input_model), ("final", "model_compressed", final_model)):
        info = export_model(model, run, run_dir / "export" / f"{fname}.onnx", opset=recipe.export.opset,
                            parity_x=px, console=console, nm=_nm_expectation(recipe, model, which))
        result.artifacts[fname] = info
        b = None
        if recipe.bench.enabled:
            b = bench(info["path"], eval_x=ex, eval_y=ey, threads=recipe.bench.threads, batch=recipe.bench.batch,
                      warmup=recipe.bench.warmup, runs=recipe.bench.runs, eval_groups=groups, latency=False)
            benches.append(b)
        name = "fp32 input" if which == "input" else recipe.name
        rows.append(_row(name, which, info, b, _bits(recipe), sparsity_stats(model)["sparsity"]))
        if "nm_sparsity" in info:  # the report's note: verified on the file, speed not measurable here
            from edgec.export.sparsity import summary

            rows[-1]["nm_sparsity"] = summary(info["nm_sparsity"])
    from edgec.mixed_precision import check_exported

    check_exported(run_dir, recipe, data, result.artifacts["model_compressed"]["path"],
                   log=console.print if console is not None else _plain_print)  # a max_drop, measured in ORT
    low_fidelity = _fidelity_gate(run_dir, run, recipe, rows, px, input_model, final_model,
                                  allow_low_fidelity=allow_low_fidelity, console=console)
    ensemble_dir = None
    if hasattr(final_model, "members"):  # eed: the deployable dynamic ensemble (member graphs + ensemble.json)
        from edgec.export.ensemble import ENSEMBLE_DIR, export_run_ensemble

        result.artifacts["ensemble"] = export_run_ensemble(final_model, run, recipe, run_dir / "export",
                                                           opset=recipe.export.opset, parity_x=px, console=console)
        ensemble_dir = run_dir / "export" / ENSEMBLE_DIR
    if recipe.bench.enabled:
        from edgec.bench.run_latency import apply_to_benches, interleaved_latency, latency_line

        result.latency = interleaved_latency(rows, recipe, ex)  # at bench.batch and every bench.batches
        apply_to_benches(benches, rows, result.latency)  # the table shows the timing the report uses
        if console is not None:
            print_bench_table(benches, console)
            console.print(latency_line(result.latency, recipe.bench.threads))
        adv = robustness_rows(run, recipe, rows, {"input": input_model, "final": final_model}, ex, ey,
                              console=console)
        if ensemble_dir is not None:
            from edgec.bench.ensemble import run_ensemble_rows

            rows += run_ensemble_rows(ensemble_dir, recipe, ex, ey, adv=adv, console=console)
        if recipe.bench.remote:  # the same artifacts measured on the target device (edgec.bench.remote)
            from edgec.bench.on_device import device_rows

            rows += device_rows(rows[:2], recipe, ex, ey, groups, console=console)
            if ensemble_dir is not None:
                rows += run_ensemble_rows(ensemble_dir, recipe, ex, ey, adv=adv, console=console,
                                          remote=recipe.bench.remote)
    else:
        (console.print if console is not None else _plain_print)(
            "bench.enabled is false in the recipe: artifacts exported and checked, not measured")
    result.rows = rows
    from edgec.report_pruning import pruning_report
    from edgec.report_sections import precision_report

    paths = write_report(run_dir, rows, title=f"edgec {recipe.name} on {run['identity']['data']}",
                         precision=precision_report(run_dir, recipe),  # stages/stageN.precision.json
                         pruning=pruning_report(run_dir))  # metrics.jsonl's prune_channels events
    result.report = {k: str(v) for k, v in paths.items()}
    if console is not None and recipe.bench.enabled and rows[0]["accuracy"] is not None:
        _print_summary(console, rows, paths)
    if low_fidelity is not None:  # after the report: it shows what was measured
        low_fidelity.result = result
        raise low_fidelity
    check_accuracy_gate(recipe, rows, ey, result)
    return result


def check_accuracy_gate(recipe: Recipe, rows: list[dict], labels, result: RunResult | None = None) -> None:
    """Raise AccuracyDropped (exit 7, after the report is written) when the compressed artifact's accuracy
    is more than ``bench.max_drop`` below the input artifact's, or at chance (within 2 points of always
    answering the most frequent eval class) while the input is clearly above it."""
    import numpy as np

    from edgec.errors import AccuracyDropped

    max_drop = recipe.bench.max_drop
    a0, a1 = rows[0].get("accuracy"), rows[1].get("accuracy") if len(rows) > 1 else None
    if max_drop is None or a0 is None or a1 is None or labels is None or len(labels) == 0:
        return
    chance = float(np.bincount(np.asarray(labels)).max() / len(labels))
    collapsed = a1 <= chance + 0.02 and a0 > chance + 0.1
    if a0 - a1 <= max_drop and not collapsed:
        return
    why = f"at chance level ({chance:.2%}: the most frequent class)" if collapsed else \
        f"more than bench.max_drop={max_drop:g} below the input's"
    err = AccuracyDropped(
        f"accuracy gate: the compressed model's exported accuracy {a1:.2%} is {why}; input model {a0:.2%} "
        f"({(a1 - a0) * 100:+.2f} pt). The report is written; the run is not fit to deploy",
        hint="check the training settings (lr, epochs, optimizer), compress less aggressively, or set "
             "bench.max_drop in the recipe (null turns the gate off)")
    err.results = result
    raise err


def _print_summary(console, rows: list[dict], paths: dict) -> None:
    a0, a1 = rows[0]["accuracy"], rows[1]["accuracy"]
    from edgec.bench.run_latency import batch_speedups

    console.print(f"[bold]accuracy {a0:.2%} -> {a1:.2%} ({(a1 - a0) * 100:+.2f} pt), "
                  f"fidelity to FP32 {rows[1].get('fidelity_top1', float('nan')):.2%}, ORT p50 speed-up "
                  f"{batch_speedups(rows[1])} over {rows[1]['latency_rounds']} interleaved rounds, deployed weights "
                  f"{rows[0]['weight_bytes_deployed'] / 1024:.1f} KB -> {rows[1]['weight_bytes_deployed'] / 1024:.1f} KB[/]")
    console.print(f"report: {paths['md']}  plot: {paths['png']}")


# ---------------------------------------------------------------------------------------------
# `edgec export RUN_DIR`: step 3 alone, from disk


def export_run(run_dir: Path, *, target: str | None = None, opset: int | None = None, out: Path | None = None,
               fmt: str = "onnx", console=None, model=None, data=None, trust_model_file: bool = False) -> dict:
    """The run's compressed model -> ONNX (and the dynamic ensemble for eed, a TensorRT engine for tensorrt).

    ``model`` / ``data``: a fresh instance of the architecture / the DataBundle, for runs started from
    an in-memory model or dataset (Python API)."""
    from edgec.data import load_data, to_numpy
    from edgec.export.artifact import export_model

    from edgec.errors import InputError
    from edgec.recipe import OPSETS

    run_dir = Path(run_dir)
    lo, hi = OPSETS
    if opset is not None and not lo <= opset <= hi:  # before 17 s of rebuilding and exporting
        raise InputError(f"--opset {opset} is not supported; edgec exports ONNX opsets {lo}..{hi}",
                         hint=f"pass --opset between {lo} and {hi}, or leave it out (the recipe's export.opset)")
    run = read_run(run_dir)
    if model is None:
        check_model_file(run_dir, run, trust=trust_model_file)  # before anything is written
    recipe = run_recipe(run)
    out = Path(out) if out else run_dir / "export" / "model_compressed.onnx"
    if out.is_dir():
        raise InputError(f"--out {out} is a folder", hint="pass the path of the .onnx file to write")
    make_out_dir(out.parent, "--out")  # unwritable / under a file: refused before the export runs
    target = target or recipe.target
    if target != recipe.target:
        raise ExportError(
            f"this run was trained for target {recipe.target!r}, whose integer ranges differ from {target!r}",
            hint=f"re-run compress with `--set target={target}` so QAT trains for that target's ranges")
    if fmt != "onnx":
        raise ExportError(f"unknown format {fmt!r}", hint="use --format onnx")
    opset = opset or recipe.export.opset
    final = rebuild_model(run_dir, "final", model=model, trust_model_file=trust_model_file)
    if data is not None:
        px = _parity_inputs(to_numpy(data.eval)[0], recipe.export.parity_samples)
    elif run["identity"]["data"].startswith(IN_MEMORY):
        raise RunDirError(f"{run_dir} was compressed on an in-memory dataset ({run['identity']['data']}); its "
                          "parity samples cannot be reloaded from a SPEC",
                          hint="export it in Python: edgec.export_run(RUN_DIR, data=<the DataBundle or (train, eval)>)")
    else:
        data = load_data(run["identity"]["data"], seed=recipe.seed, max_eval=recipe.export.parity_samples)
        px, _ = to_numpy(data.eval)
    info = export_model(final, run, out, opset=opset, parity_x=px, console=console,
                        nm=_nm_expectation(recipe, final, "final"))
    if hasattr(final, "members"):  # eed: also the deployable dynamic ensemble (member graphs + ensemble.json)
        from edgec.export.ensemble import export_run_ensemble

        info["ensemble"] = export_run_ensemble(final, run, recipe, out.parent, opset=opset, parity_x=px,
                                               console=console)
    if target == "tensorrt":
        from edgec.export.tensorrt import build_engine

        info["engine"] = str(build_engine(out, out.with_suffix(".engine"), int8=True))
    return info

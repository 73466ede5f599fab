"""The ``edgec`` command line: thin Typer commands, each calling one core function.

Module load imports no torch/onnxruntime (docs/design.md principle 6); every command imports what it
needs. Every EdgecError is caught here: one clear message, its exit code, no traceback unless
``--verbose``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgec.errors import EdgecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="edgec: prune, quantize and distil models for edge devices; export to ONNX/TensorRT; "
                       "measure latency and accuracy of the exported artifact.")
recipes_app = typer.Typer(no_args_is_help=True, help="List, show and validate recipes.")
app.add_typer(recipes_app, name="recipes")

def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False, emoji=False)  # "30:100:70" is not an emoji


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show tracebacks on errors")] = False):
    """(``--verbose`` is read by :func:`main` before the command runs.)"""


# ---------------------------------------------------------------------------------------------
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo"),
    force: Annotated[bool, typer.Option(help="overwrite an existing demo run")] = True,
):
    """The whole pipeline on sklearn's 8x8 digits: FP32 baseline -> prune+QAT+KD -> ONNX int8 -> bench."""
    from edgec.demo import run_demo

    run_demo(out, force=force, console=_console())


@app.command()
def compress(
    model: Annotated[str, typer.Option(help="zoo name (see `edgec models`), path/to/file.py:factory or package.module:factory")],
    data: Annotated[str, typer.Option(help="digits | cifar10:PATH | imagefolder:PATH | python:module:factory | "
                                           "speechcommands:PATH | fsdd:PATH | tau2020mobile:PATH (see `edgec data`)")],
    recipe: Annotated[str, typer.Option(help="shipped recipe name (see `edgec recipes list`) or a YAML file")],
    weights: Annotated[Optional[str], typer.Option(help="state_dict checkpoint of the model (loaded with weights_only=True)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field, e.g. --set stages.0.epochs=3")] = None,
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/latest"),
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "auto",
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    force: Annotated[bool, typer.Option(help="overwrite --out even if it holds another run")] = False,
    trust_pickle: Annotated[bool, typer.Option(help="allow loading pickled whole modules (runs arbitrary code!)")] = False,
    remote: Annotated[Optional[str], typer.Option(help="also bench the artifacts on this device over SSH (recipe bench.remote): a devices-file name or ssh://user@host[:port]")] = None,
    devices: Annotated[Optional[Path], typer.Option(help="devices file for --remote / bench.remote (default $EDGEC_DEVICES)")] = None,
    no_export: Annotated[bool, typer.Option("--no-export", help="stop after training (run `edgec export` later)")] = False,
    allow_low_fidelity: Annotated[bool, typer.Option("--allow-low-fidelity", help="keep an artifact whose agreement with the FP32 model is below export.min_fidelity (exit 0 instead of 6)")] = False,
):
    """Compress a trained model with a recipe, then export, bench and report."""
    import os

    from edgec.pipeline import CompressRequest, compress as run

    if remote is not None:
        set_ = [*(set_ or ()), f"bench.remote={remote}"]
    if devices is not None:
        os.environ["EDGEC_DEVICES"] = str(devices.resolve())  # read where bench.remote is resolved

    run(CompressRequest(model=model, data=data, recipe=recipe, weights=weights, overrides=tuple(set_ or ()),
                        out=out, device=device, resume=resume, force=force, trust_pickle=trust_pickle,
                        export=not no_export, allow_low_fidelity=allow_low_fidelity), console=_console())


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="run directory of `edgec compress`")],
    format: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    target: Annotated[Optional[str], typer.Option(help="x86 | arm64 | tensorrt (default: the run's target)")] = None,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (13..21)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output file (default RUN_DIR/export/model_compressed.onnx)")] = None,
    trust_model_file: Annotated[bool, typer.Option(help="re-import the run's file.py model even if it changed since the run (runs its code!)")] = False,
):
    """Export a run's compressed model (Q/DQ ONNX) and check it against PyTorch."""
    from edgec.pipeline import export_run

    if target is not None:
        from edgec.targets import get_target

        get_target(target)
    export_run(run_dir, target=target, opset=opset, out=out, fmt=format, console=_console(),
               trust_model_file=trust_model_file)


@app.command()
def bench(
    model: Annotated[Path, typer.Argument(help="an .onnx file, or a dynamic ensemble (ensemble.json or its folder)")],
    data: Annotated[Optional[str], typer.Option(help="data SPEC for accuracy (its eval split)")] = None,
    threads: Annotated[int, typer.Option(help="intra-op threads")] = 1,
    batch: Annotated[int, typer.Option(help="batch size")] = 1,
    warmup: Annotated[int, typer.Option(help="warm-up runs")] = 10,
    runs: Annotated[int, typer.Option(help="timed runs")] = 100,
    provider: Annotated[Optional[list[str]], typer.Option(help="ORT execution provider(s), e.g. CUDAExecutionProvider")] = None,
    budget_ms: Annotated[Optional[float], typer.Option(help="exit non-zero when p50 latency exceeds this")] = None,
    eval_samples: Annotated[Optional[int], typer.Option(help="accuracy on a seeded class-stratified subset of N eval samples")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the results to this JSON file")] = None,
    rounds: Annotated[int, typer.Option(help="ensemble: interleaved rounds of dynamic vs all-K timing (on --runs inputs)")] = 3,
    pgd_samples: Annotated[int, typer.Option(help="ensemble: PGD robust accuracy on a seeded subset of N eval samples (0 = off)")] = 200,
    pgd_steps: Annotated[int, typer.Option(help="ensemble: PGD iterations (step eps/4, random start)")] = 10,
    pgd_eps: Annotated[Optional[float], typer.Option(help="ensemble: PGD radius in pixel units (default: the run's adversarial training eps)")] = None,
    run: Annotated[Optional[Path], typer.Option("--run", help="ensemble: the run directory whose PyTorch model the PGD attack is computed on (default: the run the artifact lies in)")] = None,
    remote: Annotated[Optional[str], typer.Option(help="bench on a device over SSH: a name from the devices file, or ssh://user@host[:port]")] = None,
    devices: Annotated[Optional[Path], typer.Option(help="devices file (YAML; default $EDGEC_DEVICES)")] = None,
    accept_new_host_key: Annotated[bool, typer.Option("--accept-new-host-key", help="trust the device's host key on first contact (a changed key is still refused)")] = False,
):
    """Latency (p50/p90/p99), throughput, peak memory and accuracy of an ONNX model in ONNX Runtime.

    For a dynamic ensemble (eed; RUN_DIR/export/ensemble/ensemble.json): sub-models used per input,
    latency with early exit vs always all K members (interleaved rounds), clean accuracy and PGD
    accuracy (attack white-box on the run's PyTorch ensemble, evaluated on the ORT artifact).

    With --remote the same measurement runs on that device (its Python and onnxruntime, over SSH)."""
    from edgec.atomic import atomic_write_text
    from edgec.errors import BudgetExceeded
    from edgec.runtime.ensemble import is_ensemble_path

    console = _console()
    if is_ensemble_path(model):
        from edgec.bench.ensemble import bench_ensemble_artifact, print_ensemble_table

        def measure():
            return bench_ensemble_artifact(model, data=data, run_dir=run, eval_samples=eval_samples,
                                           pgd_samples=pgd_samples, pgd_steps=pgd_steps, pgd_eps=pgd_eps,
                                           threads=threads, batch=batch, rounds=rounds, warmup=warmup, runs=runs,
                                           budget_ms=budget_ms, console=console, remote=remote,
                                           devices_file=devices, accept_new_host_key=accept_new_host_key)

        def show(res):
            print_ensemble_table(res, console)
    else:
        from edgec.bench import bench as run_bench, print_bench_table

        def measure():
            ex = ey = None
            if data is not None:
                from edgec.data import load_data, to_numpy

                ex, ey = to_numpy(load_data(data, max_eval=eval_samples).eval)  # seeded, class-stratified subset
            return run_bench(model, eval_x=ex, eval_y=ey, threads=threads, batch=batch, warmup=warmup, runs=runs,
                             providers=provider, budget_ms=budget_ms, remote=remote, devices_file=devices,
                             accept_new_host_key=accept_new_host_key)

        def show(res):
            print_bench_table([res], console)
    try:
        res, err = measure(), None
    except BudgetExceeded as exc:  # the results are shown and saved, then the budget fails the command
        res, err = exc.results, exc
    show(res)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(res, indent=2, default=str))
    if err is not None:
        raise err


# ---------------------------------------------------------------------------------------------
@app.command()
def analyze(
    run_dir: Annotated[Optional[Path], typer.Argument(help="run directory of `edgec compress` (its FP32 input model, data and recipe)")] = None,
    model: Annotated[Optional[str], typer.Option(help="instead of RUN_DIR: a model SPEC (zoo name, path/to/file.py:factory, package.module:factory)")] = None,
    data: Annotated[Optional[str], typer.Option(help="with --model: data SPEC (eval split measured, train split calibrates)")] = None,
    weights: Annotated[Optional[str], typer.Option(help="with --model: its state_dict (weights_only=True)")] = None,
    recipe: Annotated[str, typer.Option(help="with --model: the recipe whose quantization settings are analysed")] = "ptq-int8",
    samples: Annotated[int, typer.Option(min=1, help="held-out eval samples measured (seeded, class-stratified)")] = 1000,
    calibration_samples: Annotated[int, typer.Option(min=1, help="calibration samples per variant (PTQ, from the train split)")] = 256,
    layers: Annotated[Optional[str], typer.Option(help="analyse only the layers matching this glob, e.g. 'layer3.*'")] = None,
    ort: Annotated[bool, typer.Option("--ort", help="measure each variant's exported ONNX in ONNX Runtime (slower) instead of the PyTorch simulation")] = False,
    profile: Annotated[bool, typer.Option("--profile", help="fill int8/float time: profile the FP32 and the uniform quantized export in ONNX Runtime (on with --ort)")] = False,
    out: Annotated[Optional[Path], typer.Option(help="write sensitivity.json and sensitivity.png into this folder")] = None,
    trust_model_file: Annotated[bool, typer.Option(help="re-import the run's file.py model even if it changed since the run (runs its code!)")] = False,
):
    """Per-layer quantization sensitivity: accuracy drop and KL vs FP32 with only layer i quantized, and with
    only layer i left float (each variant PTQ-calibrated as the exporter would write it)."""
    from edgec.errors import InputError
    from edgec.sensitivity import analyze_model, analyze_run, print_sensitivity, write_sensitivity

    console = _console()
    if (run_dir is None) == (model is None):
        raise InputError("give either RUN_DIR or --model (with --data), not both or neither",
                         hint="edgec analyze runs/mine   or   edgec analyze --model digits_cnn --weights w.pt --data digits")

    def progress(i, n, name):
        console.print(f"[dim]{i + 1}/{n} {name}[/]")

    if run_dir is not None:
        res = analyze_run(run_dir, samples=samples, calibration_samples=calibration_samples, layers=layers, ort=ort,
                          profile=profile, trust_model_file=trust_model_file, progress=progress)
    else:
        if data is None:
            raise InputError("--model needs --data", hint="e.g. --data digits")
        from edgec.data import load_data
        from edgec.recipe import load_recipe
        from edgec.runs import build_model

        rec = load_recipe(recipe)
        if weights is None:
            console.print("[yellow]no --weights given: analysing a randomly initialised model[/]")
        bundle = load_data(data, seed=rec.seed, max_eval=samples)
        net = build_model(model, num_classes=bundle.num_classes, in_channels=bundle.input_shape[0], weights=weights,
                          trust_pickle=False)
        res = analyze_model(net, bundle, recipe=rec, samples=samples, calibration_samples=calibration_samples,
                            layers=layers, ort=ort, profile=profile, seed=rec.seed, progress=progress)
    print_sensitivity(res, console)
    if out is not None:
        paths = write_sensitivity(res, out)
        console.print(f"wrote {paths['json']} and {paths['png']}")


@app.command()
def profile(
    models: Annotated[list[Path], typer.Argument(help="one or more .onnx files (e.g. RUN/export/model_fp32.onnx "
                                                      "RUN/export/model_compressed.onnx); the first is the reference")],
    batch: Annotated[int, typer.Option(help="batch size")] = 1,
    threads: Annotated[int, typer.Option(help="intra-op threads")] = 1,
    warmup: Annotated[int, typer.Option(help="warm-up calls per model")] = 10,
    runs: Annotated[int, typer.Option(help="profiled calls per model (interleaved)")] = 50,
    top: Annotated[int, typer.Option(help="rows shown (and plotted), longest first; 0 = all")] = 15,
    out: Annotated[Optional[Path], typer.Option(help="write DIR/profile.json and DIR/profile.png")] = None,
    provider: Annotated[Optional[list[str]], typer.Option(help="ORT execution provider(s)")] = None,
    remote: Annotated[Optional[str], typer.Option(help="profile on a device over SSH: a name from the devices file, or ssh://user@host[:port]")] = None,
    devices: Annotated[Optional[Path], typer.Option(help="devices file (YAML; default $EDGEC_DEVICES)")] = None,
    accept_new_host_key: Annotated[bool, typer.Option("--accept-new-host-key", help="trust the device's host key on first contact")] = False,
):
    """Per-layer time from ONNX Runtime's profiler, float and quantized artifacts side by side.

    Each profiled kernel (fused ones included, e.g. QLinearConv) is mapped back to the source model's
    layer (module path), so the same layer of every artifact is one row (edgec/bench/layers.py)."""
    from edgec.bench.profile import print_profile_table, profile_models, write_profile

    res = profile_models(models, batch=batch, threads=threads, runs=runs, warmup=warmup, providers=provider,
                         remote=remote, devices_file=devices, accept_new_host_key=accept_new_host_key)
    console = _console()
    print_profile_table(res, console, top=top or None)
    if out is not None:
        paths = write_profile(res, out, top=top or None)
        console.print(f"profile: {paths['json']}  plot: {paths['png']}")


@app.command()
def models(pattern: Annotated[str, typer.Argument(help="glob, e.g. 'resnet*'")] = "*"):
    """List the model zoo."""
    from rich.table import Table

    from edgec.models import list_models, model_info

    table = Table(title="edgec model zoo")
    for col in ("name", "input", "classes", "params", "description"):
        table.add_column(col)
    for name in list_models(pattern):
        info = model_info(name)
        table.add_row(name, "x".join(map(str, info["input_shape"])), str(info["num_classes"]),
                      f"{info['params']:,}", info["description"])
    _console().print(table)


@app.command("data")
def data_kinds_cmd():
    """List the data kinds a --data SPEC can name."""
    from rich.table import Table

    from edgec.data import data_kinds

    table = Table(title="edgec data kinds (--data SPEC)")
    table.add_column("kind")
    table.add_column("SPEC")
    for name, help_text in data_kinds():
        table.add_row(name, help_text)
    _console().print(table)


@recipes_app.command("list")
def recipes_list():
    """List the shipped recipes."""
    from rich.table import Table

    from edgec.recipe import load_recipe, shipped_recipes

    table = Table(title="shipped recipes")
    for col in ("name", "stages", "target", "description"):
        table.add_column(col)
    for name in shipped_recipes():
        r = load_recipe(name)
        table.add_row(name, " -> ".join(s.method for s in r.stages), r.target, r.description)
    _console().print(table)


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="shipped recipe name or YAML path")]):
    """Print a recipe's YAML (with its header comments)."""
    from edgec.recipe import resolve_source
    from edgec.safeyaml import read_text

    label, path = resolve_source(name)
    typer.echo(read_text(path, label))


@recipes_app.command("validate")
def recipes_validate(
    name: Annotated[str, typer.Argument(help="shipped recipe name or YAML path")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. stages.0.epochs=3")] = None,
):
    """Validate a recipe (and overrides); print it resolved with all defaults."""
    from edgec.recipe import dump_recipe, load_recipe

    r = load_recipe(name, list(set_ or ()))
    typer.echo(dump_recipe(r))
    _console().print(f"[green]{name}: valid[/]")


def main() -> None:
    verbose = "--verbose" in sys.argv or "-v" in sys.argv[1:2]
    try:
        app(standalone_mode=False)
    except EdgecError as exc:
        if verbose:
            raise
        _print_error(exc)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # the environment, not edgec: a full disk, permissions, a path under a file
        if verbose:
            raise
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error: cannot access{where}: {exc.strerror or exc}\n  hint: check the path, its permissions and "
              "free space (run with --verbose for the traceback)", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - usage errors and unexpected failures
        usage = _usage_error(exc)
        if usage is not None:
            sys.exit(usage)
        if verbose:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc}\n  (run with --verbose for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


def _usage_error(exc: Exception) -> int | None:
    """A command-line usage error (missing option, bad value, unknown command): print it the way the
    parser formats it and return its exit code (2); None for any other exception. Typer's parser
    (click, or typer's own in typer >= 0.29 which no longer installs click) raises these with a
    ``show()`` method and an ``exit_code``; an ``Exit`` carries only the code."""
    kinds = {c.__name__ for c in type(exc).__mro__}
    if "Exit" in kinds and hasattr(exc, "exit_code"):
        return int(exc.exit_code)
    if hasattr(exc, "show") and hasattr(exc, "exit_code") and ({"ClickException", "UsageError"} & kinds):
        exc.show()
        return int(exc.exit_code)
    return None


def _print_error(exc: EdgecError) -> None:
    print(f"error: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()

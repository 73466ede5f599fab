"""``edgec compress``: load and validate everything, run the recipe's stages, export, bench, report.

One direction: recipe + model + data are validated up front (all errors before any training);
stages run in order with the shared engine; the compressed model goes to the run directory; then
``edgec.pipeline.finish_run`` exports and measures the artifacts and writes the report.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgec import __version__
from edgec.errors import RunDirError
from edgec.recipe import Recipe, dump_recipe, load_recipe
from edgec.atomic import atomic_torch_save, atomic_write_text
from edgec.runs import file_sha256, fingerprint, prepare_run_dir, read_run


@dataclass
class CompressRequest:
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


def build_model(model_spec: str, *, num_classes: int, in_channels: int, weights: str | None,
                trust_pickle: bool):
    from edgec.models import resolve_model

    return resolve_model(model_spec, num_classes=num_classes, in_channels=in_channels, weights=weights,
                         trust_pickle=trust_pickle)


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


def check_byte_budgets(recipe: Recipe, model) -> None:
    """Every ``prune`` stage's ``target_bytes`` must be reachable by pruning this model (checked before
    any training; raises RecipeError naming what takes the bytes)."""
    from edgec.budget import deployment_norm_bits, plan_bytes
    from edgec.errors import RecipeError

    for i, st in enumerate(recipe.stages):
        if st.method == "prune" and st.target_bytes is not None:
            try:
                plan_bytes(model, target_bytes=st.target_bytes, deployed_bits=st.deployed_bits,
                           norm_bits=deployment_norm_bits(recipe), include_first_last=st.prune_first_last)
            except RecipeError as e:
                raise RecipeError(f"stages.{i}.target_bytes: {e.message}", hint=e.hint) from e


def _plain_print(*objects) -> None:
    """Log lines without a rich console (library use, benchmarks): rich markup stripped, not printed raw."""
    from rich.text import Text

    print(*(Text.from_markup(o).plain if isinstance(o, str) else o for o in objects))


def compress(req: CompressRequest, *, console=None) -> Path:
    """Run a compression recipe end to end; returns the run directory."""
    import torch

    from edgec.data import load_data
    from edgec.distributed import init_distributed, is_main, barrier
    from edgec.stages import StageContext, get_handler
    from edgec.targets import get_target

    log = console.print if console is not None else _plain_print
    # ---- 1. load and validate everything up front -------------------------------------------
    recipe = load_recipe(req.recipe, list(req.overrides))
    for st in recipe.stages:
        get_handler(st.method)
    data = load_data(req.data, seed=recipe.seed)
    num_classes, in_channels = data.num_classes, data.input_shape[0]
    torch.manual_seed(recipe.seed)  # a model without --weights is initialised reproducibly
    model = build_model(req.model, num_classes=num_classes, in_channels=in_channels, weights=req.weights,
                        trust_pickle=req.trust_pickle)
    teachers = resolve_teachers(recipe, model, num_classes=num_classes, in_channels=in_channels,
                                trust_pickle=req.trust_pickle)
    check_byte_budgets(recipe, model)
    dist = init_distributed(req.device)
    identity = {"model": _abs_spec(req.model), "data": _abs_data(req.data),
                "weights_sha256": file_sha256(Path(req.weights)) if req.weights else None,
                "recipe": recipe.model_dump(mode="json"), "world_size": dist.world_size}
    run_dir = Path(req.out)
    continuing = False
    if is_main():
        continuing = prepare_run_dir(run_dir, identity, resume=req.resume, force=req.force)
    barrier()
    if not req.weights:
        log("[yellow]no --weights given: compressing a randomly initialised model[/]")
    log(f"data: {data.describe()}")
    log(f"recipe: {recipe.name} ({len(recipe.stages)} stages, target {recipe.target}) -> {run_dir}")

    # ---- 2. record what was asked -----------------------------------------------------------
    state = {"completed": 0}
    if continuing and (run_dir / "state.json").is_file():
        state = json.loads((run_dir / "state.json").read_text())
    if continuing:  # the input model as the first attempt saw it (also the KD teacher "input")
        model.load_state_dict(torch.load(run_dir / "model_input.pt", map_location="cpu", weights_only=True)["model"])
        teachers = resolve_teachers(recipe, model, num_classes=num_classes, in_channels=in_channels,
                                    trust_pickle=req.trust_pickle)
    if is_main() and not continuing:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "run.json", json.dumps({
            "edgec": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "fingerprint": fingerprint(identity), "identity": identity, "weights": req.weights,
            "num_classes": num_classes, "input_shape": list(data.input_shape), "classes": data.classes,
            "normalization": data.normalization}, indent=2))
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        atomic_torch_save({"model": model.state_dict()}, run_dir / "model_input.pt")
        atomic_write_text(run_dir / "state.json", json.dumps(state))
    barrier()

    # ---- 3. stages ----------------------------------------------------------------------------
    torch.manual_seed(recipe.seed)
    target = get_target(recipe.target)
    model = model.to(dist.device)
    done = int(state["completed"])
    for i, cfg in enumerate(recipe.stages):
        handler = get_handler(cfg.method)
        ctx = StageContext(index=i, data=data, target=target, seed=recipe.seed, run_dir=run_dir, dist=dist,
                           input_model=teachers.get(i), teachers=teachers, resume=req.resume and i == done,
                           rebuild=i < done, log=log, recipe=recipe)
        model = handler.prepare(model, cfg, ctx)
        if i < done:
            if i == done - 1:
                model.load_state_dict(torch.load(run_dir / "stages" / f"stage{i}.pt", map_location=dist.device,
                                                 weights_only=True)["model"])
            continue
        log(f"[bold]stage {i}: {cfg.method}[/]")
        metrics = handler.run(model, cfg, ctx)
        model = handler.convert(model, cfg, ctx)
        if is_main():
            atomic_torch_save({"model": model.state_dict()}, run_dir / "stages" / f"stage{i}.pt")
            ctx.record(event="stage_done", method=cfg.method, metrics=metrics)
            atomic_write_text(run_dir / "state.json", json.dumps({"completed": i + 1}))
        barrier()
    if is_main():
        atomic_torch_save({"model": model.state_dict()}, run_dir / "model_final.pt")
    barrier()
    if dist.world_size > 1:
        from edgec.distributed import shutdown_distributed

        shutdown_distributed()
    if is_main() and req.export and (recipe.export.enabled or recipe.bench.enabled):
        from edgec.pipeline import finish_run

        finish_run(run_dir, console=console, allow_low_fidelity=req.allow_low_fidelity)
    return run_dir


def rebuild_model(run_dir: Path, which: str = "final"):
    """Rebuild a run's model on CPU: ``"input"`` (FP32 as given) or ``"final"`` (compressed)."""
    import torch

    from edgec.distributed import DistContext
    from edgec.recipe import validate_recipe
    from edgec.stages import StageContext, get_handler
    from edgec.targets import get_target

    run = read_run(run_dir)
    ident = run["identity"]
    model = build_model(ident["model"], num_classes=run["num_classes"], in_channels=run["input_shape"][0],
                        weights=None, trust_pickle=False)
    model.load_state_dict(torch.load(Path(run_dir) / "model_input.pt", map_location="cpu", weights_only=True)["model"])
    if which == "input":
        return model.eval()
    final = Path(run_dir) / "model_final.pt"
    if not final.is_file():
        raise RunDirError(f"{run_dir} has no compressed model yet (model_final.pt missing)",
                          hint="the compress run did not finish: continue it with `edgec compress ... --resume`")
    recipe = validate_recipe(ident["recipe"], [], label="run recipe")
    dist = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for i, cfg in enumerate(recipe.stages):
        ctx = StageContext(index=i, data=None, target=get_target(recipe.target), seed=recipe.seed,
                           run_dir=Path(run_dir), dist=dist, input_model=None, rebuild=True, log=lambda *a: None,
                           recipe=recipe)
        model = get_handler(cfg.method).prepare(model, cfg, ctx)
    model.load_state_dict(torch.load(final, map_location="cpu", weights_only=True)["model"])
    return model.eval()

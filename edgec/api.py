"""The Python API: compress an in-memory model without the command line.

    import edgec
    result = edgec.compress(model, (train_set, eval_set), "qat-int8", out="runs/mine",
                            overrides=["stages.0.epochs=1"])
    result.rows[1]["accuracy"], result.report["md"], result.model   # report rows, files, the compressed model

``model``: an ``nn.Module`` (its current weights are the FP32 input) or a model SPEC as on the command
line; ``data``: a :class:`edgec.data.DataBundle`, a data SPEC (``"digits"``, ``"cifar10:PATH"``...) or a
pair ``(train_dataset, eval_dataset)`` of map-style datasets yielding ``(tensor, label)``; ``recipe``: a
shipped recipe name, a YAML path, a dict, or a :class:`edgec.recipe.Recipe`. The run directory,
checkpoints, ``--resume`` and the report are the same as ``edgec compress`` writes (the CLI calls
this same pipeline, :func:`edgec.pipeline.compress`).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgec.errors import InputError

__all__ = ["compress", "export_run"]


def _recipe(recipe: Any, overrides: Sequence[str]):
    from edgec.recipe import Recipe, load_recipe, validate_recipe

    if isinstance(recipe, Recipe):
        if overrides:
            return validate_recipe(recipe.model_dump(mode="json"), list(overrides), label="recipe")
        return recipe
    if isinstance(recipe, dict):
        import copy

        return validate_recipe(copy.deepcopy(recipe), list(overrides), label="recipe")
    if isinstance(recipe, (str, Path)):
        return load_recipe(str(recipe), list(overrides))
    raise InputError(f"recipe must be a shipped recipe name, a YAML path, a dict or an edgec Recipe, "
                     f"got {type(recipe).__name__}")


def _data(data: Any, seed: int):
    from edgec.data import DataBundle, bundle_from_datasets, load_data
    from edgec.runs import IN_MEMORY

    if isinstance(data, DataBundle):
        return data, data.spec
    if isinstance(data, str):
        return load_data(data, seed=seed), data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        train, evald = data
        bundle = bundle_from_datasets(train, evald, where="edgec.compress(data=(train, eval))",
                                      spec=f"{IN_MEMORY}{type(train).__name__} {len(train)}/{len(evald)}>")
        return bundle, bundle.spec
    raise InputError(f"data must be a DataBundle, a data SPEC string or a (train_dataset, eval_dataset) pair, "
                     f"got {type(data).__name__}")


def compress(model: Any, data: Any, recipe: Any, *, out: str | Path = "runs/latest", weights: str | None = None,
             overrides: Sequence[str] = (), device: str = "auto", resume: bool = False, force: bool = False,
             export: bool = True, trust_pickle: bool = False, console: Any = None):
    """Compress ``model`` on ``data`` with ``recipe``; returns :class:`edgec.pipeline.RunResult`
    (``run_dir``, report ``rows``, ``report`` paths, export ``artifacts``, the compressed ``model``)."""
    from torch import nn

    from edgec.pipeline import CompressRequest, compress as run_pipeline

    rec = _recipe(recipe, overrides)
    bundle, data_spec = _data(data, rec.seed)
    if isinstance(model, nn.Module):
        if weights is not None:
            raise InputError("weights= is for a model SPEC; an nn.Module is compressed with the weights it holds",
                             hint="load them first: model.load_state_dict(torch.load(path))")
        model_obj, model_spec = model, None
    elif isinstance(model, str):
        model_obj, model_spec = None, model
    else:
        raise InputError(f"model must be an nn.Module or a model SPEC string, got {type(model).__name__}")
    req = CompressRequest(model=model_spec or "", data=data_spec, recipe=rec.name, weights=weights,
                          overrides=tuple(overrides), out=Path(out), device=device, resume=resume, force=force,
                          trust_pickle=trust_pickle, export=export)
    return run_pipeline(req, console=console, model=model_obj, data=bundle, recipe=rec)


def export_run(run_dir: str | Path, *, model: Any = None, data: Any = None, **kwargs):
    """``edgec export RUN_DIR`` from Python; ``model`` / ``data``: a fresh instance of the architecture /
    the data, for runs started from an in-memory model / dataset."""
    from edgec.pipeline import export_run as run_export
    from edgec.runs import read_run, run_recipe

    bundle = None
    if data is not None:
        bundle, _ = _data(data, run_recipe(read_run(Path(run_dir))).seed)
    return run_export(Path(run_dir), model=model, data=bundle, **kwargs)

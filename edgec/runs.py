"""The run directory: every arrow of the pipeline is a file here (docs/design.md).

    RUN_DIR/
      run.json            what was asked: model spec, weights hash, data spec, resolved recipe
      recipe.yaml         the resolved recipe (after --set overrides)
      state.json          stages completed so far (for --resume)
      model_input.pt      the FP32 input model's weights
      checkpoints/        per-stage training checkpoints (atomic, per epoch)
      stages/stageN.pt    model state after stage N (structure: replay the prepares)
      stages/stageN.arch.json  layer shapes after a stage that changes them (edgec.architecture)
      model_final.pt      compressed model state
      calibration/        calibration-set manifest
      metrics.jsonl       training metrics
      export/             ONNX artifacts + export checks
      report.{json,md}, pareto.png
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from edgec.errors import RunDirError
from edgec.runlock import LOCK_FILE, lock_run_dir

RUN_FILE = "run.json"

__all__ = ["RUN_FILE", "build_model", "file_sha256", "fingerprint", "is_run_dir", "lock_run_dir", "prepare_run_dir",
           "read_run", "rebuild_model", "run_recipe"]


def file_sha256(path: Path) -> str:
    from edgec.runtime.ensemble import file_sha256 as sha  # one implementation; the runner needs it torch-free

    return sha(path)


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not an edgec run directory (no {RUN_FILE})",
                          hint="pass the --out folder of an `edgec compress` run")
    return json.loads(path.read_text())


def run_recipe(run: dict):
    """The run's resolved recipe (``run.json``), validated into the typed :class:`edgec.recipe.Recipe`."""
    from edgec.recipe import validate_recipe

    return validate_recipe(json.loads(json.dumps(run["identity"]["recipe"])), [], label="run recipe")


def build_model(model_spec: str, *, num_classes: int, in_channels: int, weights: str | None, trust_pickle: bool):
    """A model from its SPEC (zoo name, ``file.py:factory``, ``package.module:factory``) and optional weights."""
    from edgec.models import resolve_model

    return resolve_model(model_spec, num_classes=num_classes, in_channels=in_channels, weights=weights,
                         trust_pickle=trust_pickle)


def model_file_of(spec: str) -> Path | None:
    """The Python file a ``path/to/file.py:factory`` model SPEC imports (None for zoo names and modules)."""
    path, sep, _ = str(spec).rpartition(":")
    return Path(path) if sep and path.endswith(".py") else None


def check_model_file(run_dir: Path, run: dict, *, trust: bool) -> None:
    """Refuse to re-import a run's ``file.py`` model whose contents changed since the run (its code runs on
    import), unless ``trust``."""
    recorded = run.get("model_file_sha256")
    path = model_file_of(run["identity"]["model"])
    if trust or not recorded or path is None or not path.is_file():
        return
    now = file_sha256(path)
    if now != recorded:
        raise RunDirError(f"the model file {path} of {run_dir} changed since the run (sha256 {recorded[:12]}... -> "
                          f"{now[:12]}...); rebuilding the model imports that file, which runs its code",
                          hint="pass --trust-model-file (trust_model_file=True) if you changed it and trust it, or "
                               "restore the file as it was")


def rebuild_model(run_dir: Path, which: str = "final", *, model: Any = None, trust_model_file: bool = False):
    """Rebuild a run's model on CPU: ``"input"`` (FP32 as given) or ``"final"`` (compressed).

    The architecture comes from the run's model SPEC, or from ``model`` (a fresh instance of the same
    class) for a run that was started from an in-memory model through the Python API; the structure of
    every stage is replayed (``prepare`` with ``rebuild=True``), then the saved state is loaded.
    """
    import torch

    from edgec.distributed import DistContext
    from edgec.stages import get_handler
    from edgec.stages.base import StageContext
    from edgec.targets import get_target

    run_dir = Path(run_dir)
    run = read_run(run_dir)
    ident = run["identity"]
    if model is None:
        if ident["model"].startswith(IN_MEMORY):
            raise RunDirError(f"{run_dir} was compressed from an in-memory model ({ident['model']}), which edgec "
                              "cannot rebuild from its name",
                              hint="rebuild it in Python: edgec.export_run(RUN_DIR, model=<a fresh instance>)")
        check_model_file(run_dir, run, trust=trust_model_file)
        model = build_model(ident["model"], num_classes=run["num_classes"], in_channels=run["input_shape"][0],
                            weights=None, trust_pickle=False)
    model.load_state_dict(torch.load(run_dir / "model_input.pt", map_location="cpu", weights_only=True)["model"])
    if which == "input":
        return model.eval()
    final = run_dir / "model_final.pt"
    if not final.is_file():
        raise RunDirError(f"{run_dir} has no compressed model yet (model_final.pt missing)",
                          hint="the compress run did not finish: continue it with `edgec compress ... --resume`")
    recipe = run_recipe(run)
    dist = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for i, cfg in enumerate(recipe.stages):
        ctx = StageContext(index=i, data=None, target=get_target(recipe.target), seed=recipe.seed, run_dir=run_dir,
                           dist=dist, rebuild=True, log=lambda *a: None, recipe=recipe,
                           input_shape=tuple(run["input_shape"]))
        model = get_handler(cfg.method).prepare(model, cfg, ctx)
    model.load_state_dict(torch.load(final, map_location="cpu", weights_only=True)["model"])
    return model.eval()


IN_MEMORY = "<in-memory "  # model SPEC recorded for a run started from an nn.Module (edgec.compress)


def is_run_dir(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a ``run.json`` that edgec wrote (the only folders ``--force`` replaces)."""
    try:
        doc = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"edgec", "fingerprint", "identity"} <= set(doc)


def prepare_run_dir(run_dir: Path, identity: dict, *, resume: bool, force: bool) -> bool:
    """Check ``run_dir`` may hold this run. Returns True when an earlier attempt is continued.

    ``force`` replaces only a run directory edgec wrote (:func:`is_run_dir`); any other non-empty
    folder is refused. Call it with the run directory locked (:func:`edgec.runlock.lock_run_dir`)."""
    run_dir = Path(run_dir)
    fp = fingerprint(identity)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file", hint="choose a folder path for --out")
    existing = run_dir / RUN_FILE
    if run_dir.is_dir() and any(c.name != LOCK_FILE for c in run_dir.iterdir()):
        if is_run_dir(run_dir):
            old = json.loads(existing.read_text())
            same = old.get("fingerprint") == fp
            if same and resume:
                return True
            if force:
                _wipe(run_dir)
                return False
            if same:
                raise RunDirError(f"{run_dir} already holds this run",
                                  hint="pass --resume to continue it, --force to start it over, or another --out")
            diff = [k for k in identity if old.get("identity", {}).get(k) != identity[k]]
            raise RunDirError(f"{run_dir} holds a different run (differs in: {', '.join(diff) or 'settings'})",
                              hint="choose another --out, or pass --force to overwrite it")
        raise RunDirError(f"{run_dir} is not empty and is not an edgec run directory"
                          + (" (--force replaces only run directories edgec created; nothing was deleted)"
                             if force else ""),
                          hint="choose an empty or new --out folder")
    elif resume:
        raise RunDirError(f"--resume given but {run_dir} holds no run to continue",
                          hint="drop --resume to start a new run")
    return False


def _wipe(run_dir: Path) -> None:
    for child in run_dir.iterdir():
        if child.name == LOCK_FILE:  # held by this process for the whole run
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()

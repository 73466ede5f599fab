"""The run directory: every arrow of the pipeline is a file here (DESIGN.md).

    RUN_DIR/
      run.json            what was asked: model spec, weights hash, data spec, resolved recipe
      recipe.yaml         the resolved recipe (after --set overrides)
      state.json          stages completed so far (for --resume)
      model_input.pt      the FP32 input model's weights
      checkpoints/        per-stage training checkpoints (atomic, per epoch)
      stages/stageN.pt    model state after stage N (structure: replay the prepares)
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

from edgec.errors import RunDirError

RUN_FILE = "run.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not an edgec run directory (no {RUN_FILE})",
                          hint="pass the --out folder of an `edgec compress` run")
    return json.loads(path.read_text())


def prepare_run_dir(run_dir: Path, identity: dict, *, resume: bool, force: bool) -> bool:
    """Check ``run_dir`` may hold this run. Returns True when an earlier attempt is continued."""
    run_dir = Path(run_dir)
    fp = fingerprint(identity)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file", hint="choose a folder path for --out")
    existing = run_dir / RUN_FILE
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if existing.is_file():
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
        if not force:
            raise RunDirError(f"{run_dir} is not empty and is not an edgec run directory",
                              hint="choose an empty or new --out folder, or pass --force to use it anyway")
        _wipe(run_dir)
    elif resume:
        raise RunDirError(f"--resume given but {run_dir} holds no run to continue",
                          hint="drop --resume to start a new run")
    return False


def _wipe(run_dir: Path) -> None:
    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()

"""Calibration subsets and their manifests (which indices, seed, sha256 of the indices), so PTQ
and INT8 engine builds can be reproduced and verified later."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgec.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from torch.utils.data import Dataset, Subset

__all__ = ["calibration_subset", "indices_sha256", "load_manifest", "save_manifest", "subset_from_manifest"]


def indices_sha256(indices: Sequence[int]) -> str:
    """sha256 of the JSON list of indices (compact separators), as stored in manifests."""
    return hashlib.sha256(json.dumps([int(i) for i in indices], separators=(",", ":")).encode()).hexdigest()


def calibration_subset(dataset: Dataset, n: int, *, seed: int) -> tuple[Subset, dict]:
    """A seeded choice of ``n`` samples (indices sorted) and its manifest.

    The manifest ``{"n", "seed", "indices", "dataset_len", "sha256"}`` lets a later run check it
    uses the same samples (:func:`subset_from_manifest`).
    """
    from torch.utils.data import Subset

    total = len(dataset)  # type: ignore[arg-type]
    if not isinstance(n, int) or n < 1:
        raise DataError(f"calibration size must be a positive integer, got {n!r}")
    if n > total:
        raise DataError(
            f"asked for {n} calibration samples but the dataset has only {total}",
            hint=f"use at most {total} calibration samples, or a larger split",
        )
    rng = np.random.default_rng([int(seed), 0xCA1])
    indices = sorted(int(i) for i in rng.choice(total, size=n, replace=False))
    manifest = {
        "n": n,
        "seed": int(seed),
        "indices": indices,
        "dataset_len": total,
        "sha256": indices_sha256(indices),
    }
    return Subset(dataset, indices), manifest


_MANIFEST_KEYS = ("n", "seed", "indices", "dataset_len", "sha256")


def _validate_manifest(manifest: dict, source: str) -> dict:
    if not isinstance(manifest, dict):
        raise DataError(f"calibration manifest {source} is not a JSON object")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise DataError(f"calibration manifest {source} lacks {', '.join(missing)}")
    if indices_sha256(manifest["indices"]) != manifest["sha256"] or len(manifest["indices"]) != manifest["n"]:
        raise DataError(
            f"calibration manifest {source} is inconsistent: its indices do not match its sha256/n",
            hint="the file was edited or truncated; regenerate it with calibration_subset()",
        )
    return manifest


def save_manifest(manifest: dict, path: Path | str) -> None:
    """Write a manifest as JSON atomically (tmp file + os.replace)."""
    path = Path(path)
    _validate_manifest(manifest, repr(str(path)))
    from edgec.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")


def load_manifest(path: Path | str) -> dict:
    """Read and check a manifest written by :func:`save_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration manifest {str(path)!r} does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read calibration manifest {str(path)!r}: {e}") from e
    return _validate_manifest(manifest, repr(str(path)))


def subset_from_manifest(dataset: Dataset, manifest: dict) -> Subset:
    """The Subset a manifest describes, after checking it fits ``dataset``."""
    from torch.utils.data import Subset

    _validate_manifest(manifest, "")
    total = len(dataset)  # type: ignore[arg-type]
    if manifest["dataset_len"] != total:
        raise DataError(
            f"calibration manifest was made for a dataset of {manifest['dataset_len']} samples, "
            f"this one has {total}",
            hint="use the same data spec and max_train/max_eval as the run that wrote the manifest",
        )
    return Subset(dataset, list(manifest["indices"]))

"""Where decoded images and audio features are cached: ``$EDGEC_CACHE`` (default
``~/.cache/edgec``), written atomically."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$EDGEC_CACHE`` or ``~/.cache/edgec``."""
    env = os.environ.get("EDGEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgec"


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    from edgec.atomic import atomic_write

    atomic_write(path, lambda fh: np.save(fh, arr))

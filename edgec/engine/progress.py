"""Rich progress bar and JSONL metrics lines (rank 0 only)."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from edgec.distributed import DistContext


def _progress_enabled(dist: DistContext) -> bool:
    if dist.rank != 0 or os.environ.get("EDGEC_NO_PROGRESS", "") == "1":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Progress:
    """A transient per-epoch rich bar; a no-op when disabled."""

    def __init__(self, enabled: bool, desc: str, epoch: int, epochs: int, total: int, done: int):
        self._p = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._p.add_task(f"{desc} {epoch + 1}/{epochs}", total=total, completed=done, loss="-", acc="-")
        self._p.start()

    def update(self, loss: float, acc: float | None) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1, loss=f"{loss:.4f}", acc="-" if acc is None else f"{acc:.3f}")

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def _write_metrics(path: Path | None, record: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False, default=_json_default) + "\n")
        f.flush()


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return repr(o)


def _clean(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v

"""The :class:`DataBundle` a data kind loads, the :class:`DataKind` that loads it, and the
helpers every loader shares: seeded subsets, tensor datasets, hold-out splits, numpy export.

Every dataset yields ``(x: float32 (C,H,W), y: int64 scalar)``, already normalised; the
``normalization`` dict of the bundle says how (``x = (pixel * input_scale - mean) / std`` per
channel) so a device-side user can reproduce the preprocessing. Train-time augmentation is *not*
baked into the dataset: ``bundle.augment(batch, generator)`` is applied by the training engine on
a float batch, deterministically given the generator.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgec.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch.utils.data import Dataset, Subset

__all__ = ["DataBundle", "DataKind", "holdout_split", "to_numpy"]


@dataclass
class DataBundle:
    """Everything a run needs to know about its data.

    ``augment`` is a batch-level train augmentation ``(x: float (N,C,H,W), generator) -> x``
    applied by the training engine (``None``: no augmentation). ``normalization`` holds
    ``mean``/``std`` lists (per channel) and ``input_scale`` (raw pixel -> [0, 1]) so the
    preprocessing can be reproduced on a device: ``x = (pixel * input_scale - mean) / std``.
    """

    spec: str
    train: Dataset
    eval: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    classes: list[str]
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    normalization: dict = field(default_factory=dict)
    #: per-sample metadata of the eval split, aligned with ``eval``: name -> array (N,), e.g.
    #: ``{"speaker": ...}`` or ``{"device": ...}`` for audio data (accuracy per group)
    groups: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line for logs and reports."""
        return (
            f"{self.spec}: {len(self.train)} train / {len(self.eval)} eval samples, "  # type: ignore[arg-type]
            f"{self.num_classes} classes, input {tuple(self.input_shape)}"
        )


@dataclass(frozen=True)
class DataKind:
    """One form of data spec, ``name[:ARG]``: its help line and its loader.

    ``load(spec, arg, seed=, max_train=, max_eval=)`` gets the whole (stripped) spec and the part
    after the first ``:``; ``takes_arg=False`` kinds are called with an empty ``arg`` too (they
    reject a non-empty one themselves).
    """

    name: str
    #: ``SPEC -- description``, one line (``edgec`` help, error hints)
    help: str
    load: Callable[..., DataBundle]
    takes_arg: bool = True


# --------------------------------------------------------------------------------------------
# helpers shared by the loaders


def _stratified_indices(labels: np.ndarray, n: int | None, seed: int, salt: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``n`` samples, class proportions kept.

    Each class is shuffled; a sample's key is its fractional position within its class, so the
    first ``n`` keys take (nearly) the same fraction of every class.
    """
    total = len(labels)
    if n is None or n >= total:
        return np.arange(total)
    rng = np.random.default_rng([seed, salt])
    perm = rng.permutation(total)
    lab = np.asarray(labels, dtype=np.int64)[perm]
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]
    rank_sorted = np.arange(total) - np.searchsorted(sorted_lab, sorted_lab, side="left")
    rank = np.empty(total, dtype=np.int64)
    rank[order] = rank_sorted
    counts = np.bincount(lab)
    key = (rank + 0.5) / counts[lab]
    return np.sort(perm[np.argsort(key, kind="stable")[:n]])


def _random_indices(total: int, n: int | None, seed: int, salt: int) -> np.ndarray:
    if n is None or n >= total:
        return np.arange(total)
    rng = np.random.default_rng([seed, salt])
    return np.sort(rng.choice(total, size=n, replace=False))


def _tensor_dataset(x: torch.Tensor, y: np.ndarray) -> Dataset:
    import torch
    from torch.utils.data import TensorDataset

    return TensorDataset(x, torch.as_tensor(np.asarray(y, dtype=np.int64)))


def _check_path(arg: str, what: str) -> Path:
    path = Path(arg).expanduser()
    if not path.exists():
        raise DataError(
            f"{what} path {str(path)!r} does not exist (resolved from {str(path.resolve())!r})",
            hint="check the path in the data spec; relative paths are taken from the current directory",
        )
    return path.resolve()


# --------------------------------------------------------------------------------------------
# hold-out splits


def holdout_split(dataset: Dataset, fraction: float, *, seed: int) -> tuple[Subset, Subset]:
    """Seeded split into ``(rest, holdout)``; ``holdout`` has ``round(fraction * len)`` samples
    (at least 1, and at least 1 left in ``rest``). Both index lists are sorted."""
    from torch.utils.data import Subset

    total = len(dataset)  # type: ignore[arg-type]
    if not 0.0 < float(fraction) < 1.0:
        raise DataError(f"hold-out fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    if total < 2:
        raise DataError(f"cannot split a dataset of {total} sample(s) into two parts")
    k = min(max(1, round(total * float(fraction))), total - 1)
    perm = np.random.default_rng([int(seed), 0x401D]).permutation(total)
    hold = sorted(int(i) for i in perm[:k])
    rest = sorted(int(i) for i in perm[k:])
    return Subset(dataset, rest), Subset(dataset, hold)


# --------------------------------------------------------------------------------------------
# numpy export (ONNX Runtime evaluation)


def _tensor_source(ds: Any) -> tuple[Any, np.ndarray | None] | None:
    """(TensorDataset, indices or None) when ``ds`` is a TensorDataset or nested Subsets of one."""
    from torch.utils.data import Subset, TensorDataset

    idx: np.ndarray | None = None
    while isinstance(ds, Subset):
        sub = np.asarray(ds.indices, dtype=np.int64)
        idx = sub if idx is None else sub[idx]
        ds = ds.dataset
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds, idx
    return None


def to_numpy(dataset: Dataset, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack the first ``limit`` samples into ``x`` float32 (N,...) and ``y`` int64 (N,)."""
    total = len(dataset)  # type: ignore[arg-type]
    n = total if limit is None else max(0, min(int(limit), total))
    src = _tensor_source(dataset)
    if src is not None:
        tds, idx = src
        sel = np.arange(n) if idx is None else idx[:n]
        x = tds.tensors[0][sel].detach().cpu().numpy().astype(np.float32, copy=False)
        y = tds.tensors[1][sel].detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
        return np.ascontiguousarray(x), y
    xs, ys = [], []
    for i in range(n):
        x, y = dataset[i][:2]
        xs.append(np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float32))
        ys.append(int(y))
    if not xs:
        return np.empty((0,), np.float32), np.empty((0,), np.int64)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)

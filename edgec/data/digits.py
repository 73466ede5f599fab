"""``digits``: the scikit-learn 8x8 handwritten digits (tiny; tests and demos)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgec.data.bundle import DataBundle, DataKind, _stratified_indices, _tensor_dataset
from edgec.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from torch.utils.data import Dataset

HELP = "digits -- sklearn 8x8 handwritten digits (1x8x8, 10 classes, stratified 80/20 split)"


def load_digits(spec: str, arg: str, *, seed: int, max_train: int | None, max_eval: int | None) -> DataBundle:
    if arg:
        raise DataError(f"the digits dataset takes no argument, got {spec!r}", hint="use: digits")
    import torch
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    d = sklearn_digits()
    x = (d.data.astype(np.float64) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    idx_train, idx_eval = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y
    )
    idx_train = np.sort(idx_train)[_stratified_indices(y[np.sort(idx_train)], max_train, seed, 1)]
    idx_eval = np.sort(idx_eval)[_stratified_indices(y[np.sort(idx_eval)], max_eval, seed, 2)]
    mean = float(x[idx_train].mean())
    std = float(x[idx_train].std()) or 1.0

    def make(idx: np.ndarray) -> Dataset:
        xs = torch.from_numpy(((x[idx] - mean) / std).astype(np.float32))
        return _tensor_dataset(xs, y[idx])

    return DataBundle(
        spec="digits",
        train=make(idx_train),
        eval=make(idx_eval),
        num_classes=10,
        input_shape=(1, 8, 8),
        classes=[str(i) for i in range(10)],
        augment=None,
        normalization={"mean": [mean], "std": [std], "input_scale": 1.0 / 16.0},
    )


KIND = DataKind("digits", HELP, load_digits, takes_arg=False)

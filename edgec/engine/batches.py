"""Batches of a dataset by index lists, and the per-epoch augment seed; no global RNG is touched."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from edgec.distributed import DistContext
from edgec.errors import InputError


def _batches_of(dataset: Dataset, batches: list[list[int]]) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x, y) for each list of indices; no global RNG is touched."""
    if isinstance(dataset, torch.utils.data.TensorDataset):
        if len(dataset.tensors) < 2:
            raise InputError("training data must yield (input, target) pairs; this TensorDataset has one tensor")
        for idx in batches:
            ix = torch.as_tensor(idx, dtype=torch.long)
            yield dataset.tensors[0][ix], dataset.tensors[1][ix]
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=0, generator=torch.Generator().manual_seed(0)
    )
    for batch in loader:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise InputError(f"training data must yield (input, target) pairs; got a {type(batch).__name__}")
        yield batch[0], batch[1]


def _chunk(indices: list[int], size: int, limit: int | None) -> list[list[int]]:
    out = [indices[i : i + size] for i in range(0, len(indices), size)]
    return out[:limit] if limit is not None else out


def _augment_seed(seed: int, epoch: int, dist: DistContext) -> int:
    if dist.world_size == 1:
        return seed + epoch
    return (seed + epoch) * 1_000_003 + dist.rank + 1

"""Top-1 accuracy and mean cross-entropy: the public ``evaluate`` and the sums the loop shards over ranks."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from edgec.engine.batches import _batches_of, _chunk


@torch.no_grad()
def _eval_sums(model: nn.Module, dataset: Dataset, indices: list[int], batch_size: int, device: torch.device) -> Tensor:
    """[loss_sum, correct, count] (float64, on ``device``) over ``indices`` in eval mode."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    try:
        for x, y in _batches_of(dataset, _chunk(indices, batch_size, None)):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits = model(x)
            if y.ndim == logits.ndim:  # soft / one-hot targets
                loss = torch.nn.functional.cross_entropy(logits.float(), y.float(), reduction="sum")
                target = y.argmax(-1)
            else:
                loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
                target = y
            sums += torch.stack(
                [
                    loss.double(),
                    (logits.argmax(-1) == target).sum().double(),
                    torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                ]
            )
    finally:
        model.train(was_training)
    return sums


def _sums_to_metrics(sums: Tensor) -> dict:
    loss_sum, correct, count = (float(v) for v in sums.cpu().tolist())
    n = int(count)
    return {
        "accuracy": correct / n if n else float("nan"),
        "loss": loss_sum / n if n else float("nan"),
        "samples": n,
    }


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device = "cpu") -> dict:
    """Top-1 accuracy and mean cross-entropy of ``model`` (moved to ``device``) on ``dataset``.

    Runs in eval mode without gradients and restores the model's train/eval mode afterwards.
    Returns ``{"accuracy", "loss", "samples"}``.
    """
    dev = torch.device(device)
    model.to(dev)
    sums = _eval_sums(model, dataset, list(range(len(dataset))), batch_size, dev)
    return _sums_to_metrics(sums)

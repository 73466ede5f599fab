"""Accuracy broken down per group of eval samples (speaker, recording device, seen vs unseen device).

A data bundle's ``groups`` maps a key to a per-sample array aligned with its eval split
(``{"device": ["a", "s4", ...], "device_seen": ["seen", "unseen", ...]}``). Any key works; keys that
do not split the eval set into 2..``max_values`` groups (per-file names, hundreds of speakers) are
left out, because their per-value accuracies are noise, not a breakdown.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MAX_GROUP_VALUES", "group_accuracy"]

MAX_GROUP_VALUES = 32


def group_accuracy(pred: np.ndarray, y: np.ndarray, groups: dict[str, Any] | None, *,
                   max_values: int = MAX_GROUP_VALUES) -> dict[str, dict[str, dict[str, float | int]]]:
    """``{key: {value: {"accuracy": float, "samples": int}}}`` for each usable group key.

    ``pred`` and ``y`` are 1-D class indices of the same eval samples that ``groups`` describes;
    a group array of another length is an error (it would silently describe other samples).
    """
    pred = np.asarray(pred).reshape(-1)
    y = np.asarray(y).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"pred and y differ in length: {pred.shape[0]} vs {y.shape[0]}")
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for key, values in sorted((groups or {}).items()):
        values = np.asarray(values)
        if values.shape != y.shape:
            raise ValueError(f"group {key!r} has {values.shape[0] if values.ndim else 0} entries for "
                             f"{y.shape[0]} eval samples")
        names = np.unique(values.astype(str))
        if not 2 <= len(names) <= max_values:
            continue
        correct = pred == y
        out[key] = {str(v): {"accuracy": float(correct[values.astype(str) == v].mean()),
                             "samples": int((values.astype(str) == v).sum())} for v in names}
    return out

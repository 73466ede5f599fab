"""Model zoo and model specs.

* ``list_models("resnet*")``, ``model_info(name)``, ``create_model(name, num_classes=...)``: the
  built-in zoo (timm-style, with "did you mean" on unknown names).
* ``resolve_model(spec, weights=...)``: a zoo name, ``path/to/file.py:factory`` or
  ``package.module:factory``, optionally with weights loaded strictly.
* ``load_weights(model, path)`` / ``save_weights(model, path)``.

Importing this package does not import torch (docs/design.md principle 6); torch is imported by the
functions that build or load models.
"""
from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgec.errors import ModelError
from edgec.models.hub import load_weights, resolve_model, save_weights
from edgec.registry import Registry

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ZooEntry",
    "create_model",
    "list_models",
    "load_weights",
    "model_info",
    "resolve_model",
    "save_weights",
]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    factory: str  # "package.module:function", imported on first use
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int


ZOO: Registry[ZooEntry] = Registry("model", ModelError)


def _add(entry: ZooEntry) -> None:
    ZOO.add(entry.name, entry)


for _depth in (8, 20, 32, 56):
    _add(
        ZooEntry(
            name=f"resnet{_depth}",
            description=f"CIFAR ResNet-{_depth} (He et al. 2016; 16/32/64 channels, 1x1 conv+BN projection shortcuts)",
            factory=f"edgec.models.resnet_cifar:resnet{_depth}",
            input_shape=(3, 32, 32),
            num_classes=10,
        )
    )
_add(
    ZooEntry(
        name="digits_cnn",
        description="3-conv CNN (32/64/64 channels) for 8x8 grayscale sklearn digits",
        factory="edgec.models.small:digits_cnn",
        input_shape=(1, 8, 8),
        num_classes=10,
    )
)
for _tau in ("1", "1.5", "2", "3", "6", "8"):
    _add(
        ZooEntry(
            name=f"bcresnet{_tau}",
            description=f"BC-ResNet-{_tau} keyword spotting (Kim et al. 2021), 40 log-mels x 1 s",
            factory=f"edgec.models.bcresnet:bcresnet{_tau.replace('.', '_')}",
            input_shape=(1, 40, 101),
            num_classes=12,
        )
    )
for _suffix, _norm in (("", "ResNorm"), ("_rfn", "RFN"), ("_nonorm", "no freq. norm")):
    _add(
        ZooEntry(
            name=f"bcresnet_asc{_suffix}",
            description=f"BC-ResNet-ASC (c=80) acoustic scenes, {_norm}; 40 log-mels x 10 s (mels % 40 == 0)",
            factory=f"edgec.models.bcresnet:bcresnet_asc{_suffix}",
            input_shape=(1, 40, 1001),
            num_classes=10,
        )
    )


def list_models(pattern: str = "*") -> list[str]:
    """Zoo model names matching a shell-style ``pattern`` (``"resnet*"``), in natural order
    (resnet8 before resnet20)."""
    return sorted(ZOO.names(pattern), key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def model_info(name: str) -> dict[str, Any]:
    """Description, default ``input_shape`` (C, H, W), default ``num_classes`` and ``params``
    (parameter count with the default number of classes)."""
    entry = ZOO.get(name)
    return {
        "name": entry.name,
        "description": entry.description,
        "input_shape": entry.input_shape,
        "num_classes": entry.num_classes,
        "params": _param_count(entry.name),
    }


@functools.lru_cache(maxsize=None)
def _param_count(name: str) -> int:
    return sum(p.numel() for p in create_model(name).parameters())


def create_model(name: str, *, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
    """A freshly initialised zoo model; ``None`` keeps the entry's default."""
    entry = ZOO.get(name)
    module_name, attr = entry.factory.split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(
        num_classes=entry.num_classes if num_classes is None else num_classes,
        in_channels=entry.input_shape[0] if in_channels is None else in_channels,
    )

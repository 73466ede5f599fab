"""A tiny deterministic classification problem shared by the engine tests and their scripts.

Two Gaussian-ish classes split by a fixed random hyperplane in 8-D: linearly separable, so a
small MLP reaches > 95% accuracy in a few epochs on CPU in well under a second.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

IN_FEATURES = 8


def make_data(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    w = torch.randn(IN_FEATURES, generator=torch.Generator().manual_seed(1234))  # same plane for every split
    y = (x @ w > 0).long()
    return TensorDataset(x, y)


def make_model(seed: int = 0, *, dropout: float = 0.1, batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(IN_FEATURES, 32)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 2)]
    return nn.Sequential(*layers)


def ce_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return nn.functional.cross_entropy(logits, y), logits


def noise_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small Gaussian jitter drawn from the engine's per-epoch generator (exercises its state)."""
    return x + 0.05 * torch.randn(x.shape, generator=g)

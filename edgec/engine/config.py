"""Training configuration, hooks into the loop, and the config fingerprint checked on resume."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from edgec.errors import InputError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "step", "onecycle")
# Fields that change how a run is observed, not what it computes: free to differ on resume.
_NOT_FINGERPRINTED = frozenset({"log_every", "checkpoint_every_steps", "find_unused_parameters"})

LossFn = Callable[[nn.Module, Tensor, Tensor], "tuple[Tensor, Tensor | None]"]
EvalFn = Callable[[nn.Module, Dataset], dict]
Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class TrainConfig:
    """How to train. ``batch_size`` is per process under DDP; ``warmup_epochs`` may be fractional."""

    epochs: int
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | constant | step | onecycle
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    amp: bool = True  # used only on CUDA (fp16 autocast + GradScaler)
    seed: int = 0
    eval_every: int = 1  # epochs; 0 = only after the last epoch
    max_steps_per_epoch: int | None = None
    log_every: int = 10
    checkpoint_every_steps: int | None = None  # besides every epoch
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step

    def __post_init__(self) -> None:
        from edgec.registry import did_you_mean

        problems: list[str] = []
        if not isinstance(self.epochs, int) or self.epochs < 1:
            problems.append(f"epochs must be an integer >= 1 (got {self.epochs!r})")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size must be an integer >= 1 (got {self.batch_size!r})")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number (got {self.lr!r})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"unknown optimizer {self.optimizer!r}; {did_you_mean(str(self.optimizer), OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"unknown schedule {self.schedule!r}; {did_you_mean(str(self.schedule), SCHEDULES)}")
        if self.momentum < 0 or self.weight_decay < 0:
            problems.append("momentum and weight_decay must be >= 0")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0 (got {self.warmup_epochs!r})")
        elif isinstance(self.epochs, int) and self.warmup_epochs >= self.epochs > 0 and self.warmup_epochs > 0:
            problems.append(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0 or None (got {self.grad_clip!r})")
        if self.eval_every < 0:
            problems.append(f"eval_every must be >= 0 (got {self.eval_every!r})")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            problems.append(f"max_steps_per_epoch must be >= 1 or None (got {self.max_steps_per_epoch!r})")
        if self.log_every < 1:
            problems.append(f"log_every must be >= 1 (got {self.log_every!r})")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            problems.append(f"checkpoint_every_steps must be >= 1 or None (got {self.checkpoint_every_steps!r})")
        if problems:
            raise InputError("invalid training config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class Hooks:
    """Optional callbacks into the loop; all run on every rank."""

    on_step_start: Callable[[int], None] | None = None  # global step about to run (0-based)
    after_backward: Callable[[], None] | None = None  # grads are unscaled (AMP) and DDP-averaged here
    after_step: Callable[[], None] | None = None  # after optimizer.step(), before the LR step
    on_epoch_end: Callable[[int, dict], None] | None = None  # (epoch 0-based, epoch metrics); before its checkpoint


def _cfg_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_FINGERPRINTED}


def config_fingerprint(cfg: TrainConfig) -> str:
    """sha256 over every field that influences the trained weights (not logging/checkpoint cadence)."""
    blob = json.dumps(_cfg_dict(cfg), sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

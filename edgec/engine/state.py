"""The state of one ``fit`` call: what is set up once, and what moves as the run goes on."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from edgec.distributed import DistContext
from edgec.engine.config import Augment, EvalFn, Hooks, LossFn, TrainConfig
from edgec.engine.progress import _write_metrics

# running metric sums of the epoch (whole epoch) and of the current log window (win_*)
RUNNING_KEYS = ("loss_sum", "correct", "count", "acc_count", "win_loss", "win_correct", "win_count", "win_acc_count")
WINDOW_KEYS = ("win_loss", "win_correct", "win_count", "win_acc_count")


@dataclass(eq=False)
class Run:
    """Everything one ``fit`` call works with; the loop, checkpoint and restore code share it."""

    # ---- fixed for the whole run ----
    model: nn.Module
    loss_fn: LossFn
    train_set: Dataset
    eval_set: Dataset | None
    cfg: TrainConfig
    hooks: Hooks
    augment: Augment | None
    extra_state: dict[str, nn.Module]
    ckpt_path: Path | None
    metrics_path: Path | None
    desc: str
    dist: DistContext
    eval_fn: EvalFn | None
    device: torch.device
    use_amp: bool
    n_train: int
    sampler: torch.utils.data.DistributedSampler | None
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    trainable: list[Tensor]
    outside_params: list[Tensor]  # trainable parameters that are not the model's (grads averaged by hand)
    fingerprint: str
    cfg_dict: dict[str, Any]
    train_model: nn.Module  # the model, or its DDP wrapper once restored

    # ---- moves as the run goes on ----
    start_epoch: int = 0
    start_step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"eval_acc": None, "epoch": None})
    running: dict[str, float] = field(default_factory=dict)
    aug_state: Tensor | None = None
    last_good: str | None = None  # where the newest checkpoint on disk stands
    # state entries already non-finite when training started (e.g. an uncalibrated inf threshold):
    # the divergence guard watches every other parameter and buffer
    nonfinite_at_start: frozenset[str] = frozenset()
    probe: Tensor | None = None  # the last training batch: the guard runs the model on it before a checkpoint

    @property
    def ddp(self) -> bool:
        return self.dist.world_size > 1

    @property
    def main(self) -> bool:
        return self.dist.rank == 0

    def where(self, epochs_done: int, step_in_epoch: int, step: int) -> str:
        if step_in_epoch == 0:
            return f"end of epoch {epochs_done}/{self.cfg.epochs}, step {step}"
        return f"epoch {epochs_done + 1}/{self.cfg.epochs}, step {step}"

    def kept(self) -> str:
        if self.ckpt_path is None:
            return "no checkpoint is kept (no checkpoint path was given)"
        if self.last_good is None:
            return f"no checkpoint has been written yet to {self.ckpt_path}"
        return f"the last good checkpoint ({self.last_good}) is kept at {self.ckpt_path}"

    def log(self, record: dict) -> None:
        if self.main:
            _write_metrics(self.metrics_path, {"stage": self.desc, **record})

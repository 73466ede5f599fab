"""Parameter groups, optimizer and per-step LR schedule from a :class:`TrainConfig`."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgec.engine.config import TrainConfig
from edgec.errors import InputError


def _param_groups(model: nn.Module, params: Iterable[Any] | None) -> list[dict]:
    if params is None:
        chosen: list[Any] = [p for p in model.parameters() if p.requires_grad]
    else:
        chosen = list(params)
    if not chosen:
        raise InputError("nothing to train: no parameter requires grad (check params= or requires_grad flags)")
    if all(isinstance(p, dict) for p in chosen):
        groups = [dict(g, params=list(g["params"])) for g in chosen]
    elif any(isinstance(p, dict) for p in chosen):
        raise TypeError("params= must be all nn.Parameters or all param-group dicts, not a mix")
    else:
        groups = [{"params": chosen}]
    seen: set[int] = set()
    for g in groups:
        for p in g["params"]:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params= holds a {type(p).__name__}, expected nn.Parameter")
            if id(p) in seen:
                raise TypeError("params= lists the same parameter twice")
            seen.add(id(p))
    return groups


def _make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = cfg.epochs * steps_per_epoch
    warm = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)
    if cfg.schedule == "onecycle":
        pct = cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs > 0 else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=total,
            pct_start=pct,
            cycle_momentum=cfg.optimizer != "sgd" or cfg.momentum > 0,
        )
    schedule = cfg.schedule

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * t))
        frac = step / total  # "step": x0.1 at 50% and again at 75% of all steps
        return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)

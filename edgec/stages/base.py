"""What every stage handler shares: the context it runs in and the KD-aware training call."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from edgec import masks as P
from edgec.data import DataBundle, holdout_split
from edgec.kd import calibration_metrics, fit_temperature, kd_objective
from edgec.targets import TargetProfile


@dataclass
class StageContext:
    index: int
    data: DataBundle
    target: TargetProfile
    seed: int
    run_dir: Path
    dist: Any  # edgec.distributed.DistContext
    teachers: dict[int, nn.Module] = field(default_factory=dict)  # resolved KD teachers by stage index
    resume: bool = False
    rebuild: bool = False  # structure only: no calibration, no training
    recipe: Any = None  # the validated edgec.recipe.Recipe (stages that look ahead, e.g. prune's byte budget)
    input_shape: tuple[int, ...] | None = None  # per-sample shape when data is None (rebuild): graph capture
    log: Any = print

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoints" / f"stage{self.index}.pt"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def record(self, **fields: Any) -> None:
        """Append one JSON line to the run's metrics (main process only)."""
        if self.dist.rank == 0:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps({"stage": self.index, **fields}) + "\n")


class Handler(Protocol):
    def prepare(self, model: nn.Module, cfg: Any, ctx: StageContext) -> nn.Module: ...
    def run(self, model: nn.Module, cfg: Any, ctx: StageContext) -> dict: ...
    def convert(self, model: nn.Module, cfg: Any, ctx: StageContext) -> nn.Module: ...


def _subset(dataset, n: int | None, seed: int):
    if n is None or n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, sorted(torch.randperm(len(dataset), generator=g)[:n].tolist()))


@torch.no_grad()
def _logits(model: nn.Module, dataset, device, batch_size: int = 256):
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    zs, ys = [], []
    for x, y in loader:
        zs.append(model(x.to(device)).float().cpu())
        ys.append(y)
    return torch.cat(zs), torch.cat(ys)


def calibrate_teacher(teacher: nn.Module, train_set, kd: Any, ctx: StageContext):
    """Fit the teacher's temperature T_c on a held-out share of ``train_set`` (docs/methods.md, teacher calibration).

    Returns the remaining training data (the held-out share is excluded from training) and T_c;
    teacher NLL/ECE/ACE before and after go to the run's metrics.
    """
    train_set, held = holdout_split(train_set, kd.calibration_fraction, seed=ctx.seed)
    z, y = _logits(teacher, held, ctx.device)
    before = calibration_metrics(z, y)
    t_c = fit_temperature(z, y)
    after = calibration_metrics(z, y, t_c)
    ctx.record(event="teacher_calibration", temperature=t_c, held_out=len(held), before=before, after=after)
    ctx.log(f"teacher calibration on {len(held)} held-out samples: T_c={t_c:.3f}, "
            f"NLL {before['nll']:.4f}->{after['nll']:.4f}, ECE {before['ece']:.4f}->{after['ece']:.4f}, "
            f"ACE {before['ace']:.4f}->{after['ace']:.4f}")
    return train_set, t_c


def train_config(cfg: Any, ctx: StageContext, epochs: int | None = None):
    from edgec.engine import TrainConfig

    return TrainConfig(epochs=cfg.epochs if epochs is None else epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                       schedule=cfg.schedule, warmup_epochs=cfg.warmup_epochs, grad_clip=cfg.grad_clip,
                       seed=ctx.seed + ctx.index)


def train_stage(model: nn.Module, cfg: Any, ctx: StageContext, *, hooks_extra: dict | None = None,
                desc: str = "train") -> dict:
    """Train ``model`` with CE, or with KD when ``cfg.kd`` is set; masks are kept fixed.

    Teacher calibration (docs/methods.md, teacher calibration): with ``kd.calibrate`` a temperature T_c is fit on
    a held-out share of the training data, which is then excluded from this stage's training;
    the student distils from softmax(z_T / (T_c * tau)).
    """
    from edgec.engine import Hooks, fit

    if cfg.epochs == 0:
        return {}
    train_set = ctx.data.train
    kd = getattr(cfg, "kd", None)
    teacher = None
    t_c = 1.0
    if kd is not None:
        teacher = ctx.teachers[ctx.index].to(ctx.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if kd.calibrate:
            train_set, t_c = calibrate_teacher(teacher, train_set, kd, ctx)
    train_set = _subset(train_set, cfg.max_train_samples, ctx.seed)

    def loss_fn(m, x, y):
        z = m(x)
        if teacher is None:
            return F.cross_entropy(z, y), z
        with torch.no_grad():
            zt = teacher(x) / t_c
        return kd_objective(z, zt, y, tau=kd.temperature, alpha=kd.alpha), z

    adv = getattr(cfg, "adversarial", None)
    if adv is not None:  # PGD-AT around whatever the loss is (CE or KD); attack noise from the global RNG
        from edgec.attacks import Attack, InputSpace, adversarial_loss

        loss_fn = adversarial_loss(loss_fn, Attack.from_config(adv), InputSpace.from_bundle(ctx.data), ratio=adv.ratio)

    masked = bool(P.masked_layers(model))
    extra = hooks_extra or {}
    after_backward = extra.get("after_backward")
    hooks = Hooks(
        on_step_start=extra.get("on_step_start"),
        after_backward=(lambda: (P.mask_gradients(model), after_backward and after_backward())) if masked or after_backward else None,
        after_step=(lambda: P.apply_masks(model)) if masked else None,
    )
    tc = train_config(cfg, ctx)
    params = extra.get("params")
    return fit(model, loss_fn=loss_fn, train_set=train_set, eval_set=ctx.data.eval, cfg=tc,
               ckpt_path=ctx.ckpt_path, resume=ctx.resume, hooks=hooks, augment=ctx.data.augment,
               params=params, metrics_path=ctx.metrics_path, desc=f"stage {ctx.index} {desc}", dist=ctx.dist)


def steps_per_epoch(n_samples: int, batch_size: int, world_size: int) -> int:
    per_rank = -(-n_samples // world_size)
    return max(1, -(-per_rank // batch_size))

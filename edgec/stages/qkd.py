"""``qkd``: Quantization-aware Knowledge Distillation (Kim, Bhalgat, Lee, Patel, Kwak 2019).

docs/methods.md, QKD. The student is the input model quantized to k bits (LSQ, first/last layer
at 8 bits by default); the teacher is a full-precision model SPEC (default: the input model).

    SS  (self-studying):  L_S = CE(y, z_S)                                      teacher unused
    CS  (co-studying):    L_S = (1-a)*CE(y, z_S) + a*tau^2*KL(sm(z_T/tau) || sm(z_S/tau))   z_T detached
                          L_T = (1-b)*CE(y, z_T) + b*tau^2*KL(sm(z_S/tau) || sm(z_T/tau))   z_S detached
                          both trained, teacher in train mode
    TU  (tutoring):       L_S as in CS, teacher frozen in eval mode

Short runs split ``epochs`` in the ratio 30:100:70 (the paper's CIFAR schedule) unless
``phase_epochs`` is given. With ``kd.calibrate`` the teacher's temperature is fit before TU (on the
teacher that CS produced) and applied to the teacher logits of the tutoring phase.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgec.stages.config import KD, Optim, Quant
from edgec.stages.registry import register_stage

import torch
import torch.nn.functional as F
from torch import Tensor

from edgec import masks as P
from edgec.kd import kd_loss
from edgec.quant.quantizers import LSQQuantizer
from edgec.stages.base import _subset, calibrate_teacher, train_config
from edgec.stages.qat import prepare_quantized, quant_spec

PHASES = ("ss", "cs", "tu")


class QKDStage(Optim, Quant):
    """Quantization-aware KD (docs/methods.md, QKD): Self-studying -> Co-studying -> Tutoring."""

    method: Literal["qkd"]
    weight_bits: int = Field(4, ge=2, le=8)
    act_bits: int = Field(4, ge=2, le=8)
    first_layer_bits: int | None = Field(8, ge=2, le=8)
    last_layer_bits: int | None = Field(8, ge=2, le=8)
    weight_quantizer: Literal["lsq", "minmax"] = "lsq"
    act_quantizer: Literal["lsq", "ema"] = "lsq"
    epochs: int = Field(3, ge=0, description="total; split over SS/CS/TU in the ratio of `split`")
    split: tuple[int, int, int] = Field((30, 100, 70), description="SS:CS:TU epoch ratio (paper's CIFAR 30/100/70)")
    phase_epochs: tuple[int, int, int] | None = Field(None, description="explicit SS, CS, TU epochs (overrides split)")
    alpha: float = Field(0.5, ge=0, le=1, description="student: (1-a)*CE + a*tau^2*KL(T||S)")
    beta: float = Field(0.5, ge=0, le=1, description="teacher in CS: (1-b)*CE + b*tau^2*KL(S||T)")
    kd: KD = Field(default_factory=lambda: KD(temperature=2.0))
    quantizer_lr: float | None = Field(None, gt=0)
    teacher_lr: float | None = Field(None, gt=0, description="teacher lr in CS (default: lr)")


def split_epochs(total: int, ratio: tuple[int, int, int]) -> tuple[int, int, int]:
    """Largest-remainder split of ``total`` epochs in ``ratio``; every phase gets >= 1 when total >= 3."""
    raw = [total * r / sum(ratio) for r in ratio]
    out = [int(x) for x in raw]
    for i in sorted(range(3), key=lambda i: raw[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    if total >= 3:
        while 0 in out:
            out[out.index(0)] += 1
            out[out.index(max(out))] -= 1
    return tuple(out)  # type: ignore[return-value]


def qkd_losses(phase: str, z_s: Tensor, z_t: Tensor | None, y: Tensor, *, alpha: float, beta: float,
               tau: float) -> tuple[Tensor, Tensor | None]:
    """(L_S, L_T) of a phase; L_T is None outside co-studying."""
    ce_s = F.cross_entropy(z_s, y)
    if phase == "ss":
        return ce_s, None
    l_s = (1 - alpha) * ce_s + alpha * kd_loss(z_s, z_t, tau)  # kd_loss detaches its teacher side
    if phase == "tu":
        return l_s, None
    l_t = (1 - beta) * F.cross_entropy(z_t, y) + beta * kd_loss(z_t, z_s, tau)
    return l_s, l_t


def teacher_l2(teacher) -> float:
    return float(sum(p.detach().double().pow(2).sum() for p in teacher.parameters()))


class QKDHandler:
    def prepare(self, model, cfg, ctx):
        return prepare_quantized(model, cfg, ctx, quant_spec(cfg, cfg.weight_quantizer, cfg.act_quantizer),
                                 trains=True)

    def run(self, model, cfg, ctx):
        from edgec.engine import Hooks, fit

        epochs = cfg.phase_epochs or split_epochs(cfg.epochs, cfg.split)
        teacher = ctx.teachers[ctx.index].to(ctx.device)
        train_set = _subset(ctx.data.train, cfg.max_train_samples, ctx.seed)
        masked = bool(P.masked_layers(model))
        hooks = Hooks(after_backward=(lambda: P.mask_gradients(model)) if masked else None,
                      after_step=(lambda: P.apply_masks(model)) if masked else None)
        step_ids = {id(m.step) for m in model.modules() if isinstance(m, LSQQuantizer)}
        student_groups = [{"params": [p for p in model.parameters() if id(p) not in step_ids]}]
        steps = [p for p in model.parameters() if id(p) in step_ids]
        if steps:
            student_groups.append({"params": steps, **({"lr": cfg.quantizer_lr} if cfg.quantizer_lr else {})})
        metrics: dict = {"phase_epochs": list(epochs)}
        t_c = 1.0
        for phase, n in zip(PHASES, epochs):
            if n == 0:
                continue
            cotrain = phase == "cs"
            if phase == "tu" and cfg.kd.calibrate:
                teacher.eval()
                train_set, t_c = calibrate_teacher(teacher, train_set, cfg.kd, ctx)
            teacher.train(cotrain)
            for p in teacher.parameters():
                p.requires_grad_(cotrain)
            groups = list(student_groups)
            if cotrain:
                groups.append({"params": list(teacher.parameters()),
                               **({"lr": cfg.teacher_lr} if cfg.teacher_lr else {})})

            def loss_fn(m, x, y, phase=phase, cotrain=cotrain):
                z_s = m(x)
                z_t = None
                if phase != "ss":
                    if cotrain:
                        z_t = teacher(x)
                    else:
                        with torch.no_grad():
                            z_t = teacher(x) / t_c
                l_s, l_t = qkd_losses(phase, z_s, z_t, y, alpha=cfg.alpha, beta=cfg.beta, tau=cfg.kd.temperature)
                return (l_s if l_t is None else l_s + l_t), z_s

            ckpt = ctx.ckpt_path.with_name(f"{ctx.ckpt_path.stem}_{phase}.pt")
            m = fit(model, loss_fn=loss_fn, train_set=train_set, eval_set=ctx.data.eval,
                    cfg=train_config(cfg, ctx, epochs=n), ckpt_path=ckpt, resume=ctx.resume, hooks=hooks,
                    augment=ctx.data.augment, params=groups, extra_state={"teacher": teacher},
                    metrics_path=ctx.metrics_path, desc=f"stage {ctx.index} qkd-{phase}", dist=ctx.dist)
            metrics[phase] = m
            ctx.record(event="qkd_phase", phase=phase, epochs=n, teacher_l2=teacher_l2(teacher),
                       teacher_temperature=t_c, metrics=m)
        teacher.eval()
        from edgec.mixed_precision import check_trained

        check_trained(model, ctx)
        return metrics

    def convert(self, model, cfg, ctx):
        return model


register_stage("qkd", QKDStage, QKDHandler(), quantizes=True)

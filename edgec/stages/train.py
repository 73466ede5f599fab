"""``train`` (plain fine-tune) and ``distill`` (KD from a teacher): no structural change."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgec.stages.config import Adversarial, KD, Optim
from edgec.stages.registry import register_stage

from edgec.stages.base import train_stage


class TrainStage(Optim):
    method: Literal["train"]
    kd: KD | None = None
    adversarial: Adversarial | None = None


class DistillStage(Optim):
    method: Literal["distill"]
    kd: KD = Field(default_factory=KD)


class TrainHandler:
    def prepare(self, model, cfg, ctx):
        return model

    def run(self, model, cfg, ctx):
        return train_stage(model, cfg, ctx, desc=cfg.method)

    def convert(self, model, cfg, ctx):
        return model


register_stage("train", TrainStage, TrainHandler())
register_stage("distill", DistillStage, TrainHandler())

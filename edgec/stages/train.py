"""``train`` (plain fine-tune) and ``distill`` (KD from a teacher): no structural change."""
from __future__ import annotations

from edgec.stages import HANDLERS
from edgec.stages.base import train_stage


class TrainHandler:
    def prepare(self, model, cfg, ctx):
        return model

    def run(self, model, cfg, ctx):
        return train_stage(model, cfg, ctx, desc=cfg.method)

    def convert(self, model, cfg, ctx):
        return model


HANDLERS.add("train", TrainHandler())
HANDLERS.add("distill", TrainHandler())

"""``psg``: train with position-based scaled gradients (docs/methods.md, PSG); see edgec.scaled_gradient."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgec.stages.config import KD, Optim
from edgec.stages.registry import register_stage

from edgec import scaled_gradient as PSG
from edgec.stages.base import train_stage


class PSGStage(Optim):
    """Position-based scaled gradient (docs/methods.md, PSG): train a full-precision model so it
    quantizes (or prunes) post-training. Follow it with a ``ptq`` stage (``weight_range: psg``)."""

    method: Literal["psg"]
    bits: int | None = Field(4, ge=2, le=8, description="target weight bit width (None: pruning variant only)")
    lambda_s: float = Field(150.0, gt=0, description="gradient scale (150 for 4 bits in the authors' code)")
    eps_rel: float = Field(1e-8, ge=0, description="epsilon = eps_rel * a (a = layer range)")
    range_momentum: float = Field(0.1, gt=0, le=1, description="EMA momentum of the per-layer range")
    target_sparsity: float | None = Field(None, ge=0, lt=1, description="pruning variant: pull the smallest weights to 0")
    first_last_bits: int = Field(8, ge=2, le=8, description="bits of the first conv and last linear when bits < 4")
    kd: KD | None = None


class PSGHandler:
    def prepare(self, model, cfg, ctx):
        PSG.ensure_state(model)
        return model

    def run(self, model, cfg, ctx):
        def after_backward():
            PSG.scale_gradients(model, bits=cfg.bits, lambda_s=cfg.lambda_s, eps_rel=cfg.eps_rel,
                                momentum=cfg.range_momentum, target_sparsity=cfg.target_sparsity,
                                first_last_bits=cfg.first_last_bits)

        return train_stage(model, cfg, ctx, hooks_extra={"after_backward": after_backward}, desc="psg")

    def convert(self, model, cfg, ctx):
        return model


register_stage("psg", PSGStage, PSGHandler())

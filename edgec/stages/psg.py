"""``psg``: train with position-based scaled gradients (METHODS.md section 3); see edgec.psg."""
from __future__ import annotations

from edgec import psg as PSG
from edgec.stages import HANDLERS
from edgec.stages.base import train_stage


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


HANDLERS.add("psg", PSGHandler())

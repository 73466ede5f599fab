"""``ptq``: post-training quantization, calibration only (min-max / percentile / EMA observers)."""
from __future__ import annotations

from edgec.stages import HANDLERS
from edgec.stages.qat import prepare_quantized, quant_spec


class PTQHandler:
    def prepare(self, model, cfg, ctx):
        return prepare_quantized(model, cfg, ctx, quant_spec(cfg, "minmax", cfg.observer, cfg.percentile))

    def run(self, model, cfg, ctx):
        return {}

    def convert(self, model, cfg, ctx):
        return model


HANDLERS.add("ptq", PTQHandler())

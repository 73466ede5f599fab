"""``ptq``: post-training quantization, calibration only (min-max / percentile / EMA observers)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgec.stages.config import Quant
from edgec.stages.registry import register_stage

from edgec.stages.qat import prepare_quantized, quant_spec


class PTQStage(Quant):
    method: Literal["ptq"]
    observer: Literal["minmax", "percentile", "ema"] = "minmax"
    percentile: float = Field(99.99, gt=50, le=100)
    weight_quantizer: Literal["minmax"] = "minmax"
    weight_range: Literal["minmax", "psg"] = Field(
        "minmax", description="per-channel min-max, or PSG's per-layer EMA range (after a psg stage)")
    norm_bits: int | None = Field(
        None, ge=2, le=8, description="BatchNorms that cannot be folded into a conv (SubSpectralNorm's): quantize "
                                      "their per-channel scale and shift to this many bits (int8 storage, one scale "
                                      "each); None leaves them float32")


class PTQHandler:
    def prepare(self, model, cfg, ctx):
        return prepare_quantized(model, cfg, ctx, quant_spec(cfg, "minmax", cfg.observer, cfg.percentile))

    def run(self, model, cfg, ctx):
        return {}

    def convert(self, model, cfg, ctx):
        return model


register_stage("ptq", PTQStage, PTQHandler(), quantizes=True)

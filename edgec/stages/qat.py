"""``qat``: quantization-aware training (LSQ or EMA/min-max quantizers, STE), optional KD."""
from __future__ import annotations

import torch

from edgec.quant.prepare import QuantSpec, calibrate, quantize_model
from edgec.quant.quantizers import LSQQuantizer
from edgec.stages import HANDLERS
from edgec.data import calibration_subset, save_manifest
from edgec.stages.base import train_stage


def quant_spec(cfg, weight_quantizer: str, act_quantizer: str, percentile: float = 99.99) -> QuantSpec:
    return QuantSpec(weight_bits=cfg.weight_bits, act_bits=cfg.act_bits, weight_quantizer=weight_quantizer,
                     act_quantizer=act_quantizer, percentile=percentile, first_layer_bits=cfg.first_layer_bits,
                     last_layer_bits=cfg.last_layer_bits, unsupported=cfg.unsupported)


def prepare_quantized(model, cfg, ctx, spec: QuantSpec):
    gm, report = quantize_model(model.cpu(), spec, ctx.target)
    gm = gm.to(ctx.device)
    if report.left_float:
        ctx.log(f"[yellow]left in float (unsupported for quantization): {', '.join(report.left_float)}[/]")
    if not ctx.rebuild:
        calib, manifest = calibration_subset(ctx.data.train, min(cfg.calibration_samples, len(ctx.data.train)),
                                             seed=ctx.seed)
        if ctx.dist.rank == 0:
            manifest["data"] = ctx.data.spec
            save_manifest(manifest, ctx.run_dir / "calibration" / f"stage{ctx.index}.json")
        loader = torch.utils.data.DataLoader(calib, batch_size=min(128, cfg.calibration_samples))
        seen = calibrate(gm, loader, ctx.device)
        ctx.record(event="quantize", calibration_samples=seen, **report.as_dict())
    return gm


class QATHandler:
    def prepare(self, model, cfg, ctx):
        return prepare_quantized(model, cfg, ctx, quant_spec(cfg, cfg.weight_quantizer, cfg.act_quantizer))

    def run(self, model, cfg, ctx):
        params = None
        if cfg.quantizer_lr is not None:
            step_params = [m.step for m in model.modules() if isinstance(m, LSQQuantizer)]
            ids = {id(p) for p in step_params}
            params = [{"params": [p for p in model.parameters() if id(p) not in ids]},
                      {"params": step_params, "lr": cfg.quantizer_lr}]
        return train_stage(model, cfg, ctx, hooks_extra={"params": params} if params else None, desc="qat")

    def convert(self, model, cfg, ctx):
        return model


HANDLERS.add("qat", QATHandler())

"""``qat``: quantization-aware training (LSQ or EMA/min-max quantizers, STE), optional KD."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from edgec.stages.config import KD, Optim, Quant
from edgec.stages.registry import register_stage

import torch

from edgec.quant.prepare import QuantSpec, calibrate, quantize_model
from edgec.quant.quantizers import LSQQuantizer
from edgec.data import calibration_subset, save_manifest
from edgec.stages.base import train_stage


class QATStage(Optim, Quant):
    method: Literal["qat"]
    weight_quantizer: Literal["lsq", "minmax"] = "lsq"
    act_quantizer: Literal["lsq", "ema"] = "lsq"
    kd: KD | None = None
    lr: float = Field(0.002, gt=0)
    quantizer_lr: float | None = Field(None, gt=0, description="lr of LSQ step sizes (default: lr)")
    norm_bits: int | None = Field(
        None, ge=2, le=8, description="BatchNorms that cannot be folded into a conv (SubSpectralNorm's): quantize "
                                      "their per-channel scale and shift to this many bits (int8 storage, one scale "
                                      "each); None leaves them float32")


def quant_spec(cfg, weight_quantizer: str, act_quantizer: str, percentile: float = 99.99) -> QuantSpec:
    from edgec.quant.precision import overrides_from_config

    return QuantSpec(weight_bits=cfg.weight_bits, act_bits=cfg.act_bits, weight_quantizer=weight_quantizer,
                     act_quantizer=act_quantizer, percentile=percentile, first_layer_bits=cfg.first_layer_bits,
                     last_layer_bits=cfg.last_layer_bits, unsupported=cfg.unsupported, lsq_init=cfg.lsq_init,
                     norm_bits=getattr(cfg, "norm_bits", None), layers=overrides_from_config(cfg.layers))


def _quantized(model, cfg, ctx, spec: QuantSpec, loader, device):
    """``model`` quantized by ``spec`` (and calibrated on ``loader`` unless it is None)."""
    from edgec.capture import example_input

    gm, report = quantize_model(model.cpu(), spec, ctx.target, example_input(ctx))
    gm = gm.to(device)
    seen = 0
    if loader is not None:
        seen = calibrate(gm, loader, device)
        if getattr(cfg, "weight_range", "minmax") == "psg":
            apply_psg_ranges(model, gm, ctx)
    return gm, report, seen


def _probe(cfg, ctx, exclude: list[int]):
    """The QAT probe for max_drop (edgec.mixed_precision): trains a quantized graph in place, with the stage's
    loss and optimizer, for ``precision.probe`` of its training samples (epochs x samples), on training
    samples outside the max_drop set; nothing is checkpointed, the test split is not used."""
    import dataclasses
    import math
    import tempfile

    from torch.utils.data import Subset

    from edgec.distributed import DistContext

    pol = cfg.precision
    per_epoch = min(cfg.max_train_samples or len(ctx.data.train), len(ctx.data.train))
    total = max(1, math.ceil(pol.probe * cfg.epochs * per_epoch))
    taken = set(exclude)
    g = torch.Generator().manual_seed(ctx.seed + 11)
    pool = [i for i in torch.randperm(len(ctx.data.train), generator=g).tolist() if i not in taken]
    epochs, n = math.ceil(total / len(pool)), min(total, len(pool))

    def probe(gm) -> dict:
        pcfg = cfg.model_copy(update={"epochs": epochs, "max_train_samples": None, "warmup_epochs": 0.0})
        data = dataclasses.replace(ctx.data, train=Subset(ctx.data.train, sorted(pool[:n])), eval=None)
        with tempfile.TemporaryDirectory(prefix="edgec-probe-") as tmp:
            pctx = dataclasses.replace(ctx, run_dir=Path(tmp), data=data, resume=False,
                                       dist=DistContext.single(ctx.device))
            (Path(tmp) / "checkpoints").mkdir()
            train_stage(gm.to(ctx.device), pcfg, pctx, desc="precision probe")
        return {"samples": n * epochs, "epochs": epochs, "share": pol.probe}

    return probe


def prepare_quantized(model, cfg, ctx, spec: QuantSpec, *, can_float: bool = True, trains: bool = False):
    """The stage's quantized graph: per-layer precision chosen by measurement first (edgec.mixed_precision;
    ``can_float=False``: only bit promotions; ``trains``: the stage trains the graph, so max_drop is judged
    after a short QAT probe), then quantized and calibrated."""
    from edgec import mixed_precision

    loader = manifest = None
    if not ctx.rebuild:
        calib, manifest = calibration_subset(ctx.data.train, min(cfg.calibration_samples, len(ctx.data.train)),
                                             seed=ctx.seed)
        if ctx.dist.rank == 0:
            manifest["data"] = ctx.data.spec
            save_manifest(manifest, ctx.run_dir / "calibration" / f"stage{ctx.index}.json")
        loader = torch.utils.data.DataLoader(calib, batch_size=min(128, cfg.calibration_samples))
    pol = getattr(cfg, "precision", None)
    probe = None
    if trains and not ctx.rebuild and pol is not None and pol.max_drop is not None and cfg.epochs > 0:
        probe = _probe(cfg, ctx, mixed_precision.eval_indices(len(ctx.data.train), pol.eval_samples, ctx.seed,
                                                              manifest))
    spec = mixed_precision.choose(model, spec, ctx, pol=pol, can_float=can_float,
                                  build=lambda s: _quantized(model, cfg, ctx, s, loader, "cpu")[0],
                                  calib_manifest=manifest, probe=probe)
    gm, report, seen = _quantized(model, cfg, ctx, spec, loader, ctx.device)
    if report.left_float:
        ctx.log(f"[yellow]left in float (unsupported for quantization): {', '.join(report.left_float)}[/]")
    if report.kept_float:
        ctx.log(f"kept float: {', '.join(report.kept_float)}")
    if report.quantized_norms:
        ctx.log(f"unfoldable norms as int{spec.norm_bits} scale + shift: {len(report.quantized_norms)}")
    if not ctx.rebuild:
        ctx.record(event="quantize", calibration_samples=seen, **report.as_dict())
    return gm


@torch.no_grad()
def apply_psg_ranges(float_model, gm, ctx) -> None:
    """Quantize weights on PSG's target grid: Delta = a/n per layer (its EMA range).

    BatchNorm folding scales each output channel by c = gamma/sigma, which maps the grid k*Delta to
    k*Delta*|c|: a per-channel scale represents it exactly. c is read off as the ratio of folded to
    original weights.
    """
    from edgec.errors import InputError
    from edgec.quant.modules import QUANT_MODULES

    done = 0
    for name, q in gm.named_modules():
        if not isinstance(q, QUANT_MODULES):
            continue
        try:
            orig = float_model.get_submodule(name)
        except AttributeError:
            continue
        rng = getattr(orig, "psg_range", None)
        if rng is None:
            continue
        a = torch.maximum(rng[0].abs(), rng[1])
        bits = int(round(torch.log2(torch.tensor(float(q.wq.qmax - q.wq.qmin + 2))).item()))
        n = 2 ** (bits - 1) - 1
        wo = orig.weight.flatten(1).to(q.weight)
        wf = q.weight.flatten(1)
        c = ((wf * wo).sum(1) / (wo * wo).sum(1).clamp_min(1e-20)).abs()
        q.wq.absmax.copy_((a / n) * c * q.wq.qmax)
        done += 1
    if done == 0:
        raise InputError("ptq weight_range=psg needs a preceding psg stage",
                         hint="put a `method: psg` stage before this ptq stage, or use weight_range: minmax")
    ctx.log(f"weights quantized on the PSG grid of {done} layers")


class QATHandler:
    def prepare(self, model, cfg, ctx):
        return prepare_quantized(model, cfg, ctx, quant_spec(cfg, cfg.weight_quantizer, cfg.act_quantizer),
                                 trains=True)

    def run(self, model, cfg, ctx):
        from edgec.mixed_precision import check_trained

        params = None
        if cfg.quantizer_lr is not None:
            step_params = [m.step for m in model.modules() if isinstance(m, LSQQuantizer)]
            ids = {id(p) for p in step_params}
            params = [{"params": [p for p in model.parameters() if id(p) not in ids]},
                      {"params": step_params, "lr": cfg.quantizer_lr}]
        metrics = train_stage(model, cfg, ctx, hooks_extra={"params": params} if params else None, desc="qat")
        check_trained(model, ctx)
        return metrics

    def convert(self, model, cfg, ctx):
        return model


register_stage("qat", QATStage, QATHandler(), quantizes=True)

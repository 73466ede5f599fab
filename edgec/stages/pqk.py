"""``pqk``: Pruning, Quantization and Knowledge distillation (Kim, Chang, Kwak; Interspeech 2021).

docs/methods.md, PQK. One network, one weight tensor per layer, two paths:

    student  z_S = f(x; Q(w * m))   quantized weights and activations, student BatchNorm
    teacher  z_T = f(x; w)          = w*m + w*(1-m): the pruned-away weights added back,
                                    full precision, teacher BatchNorm

Phase 1 (``epochs``): QAT of the student with CE while one *global* magnitude threshold over all
prunable weights is recomputed every ``update_every`` steps, sparsity on the cubic schedule
s_t = s_f - s_f (1 - t/t_f)^3. Pruned weights keep their values (the mask acts in the forward
only), so a weight can come back while the threshold moves, and phase 2 has them for the teacher.

Phase 2 (``kd_epochs``), mask frozen, two forward passes per batch:

    L = CE(y, z_S) + CE(y, z_T) + tau^2 KL(sm(z_T/tau) || sm(z_S/tau)) + tau^2 KL(sm(z_S/tau) || sm(z_T/tau))

each KL with its target side detached. Gradient routing (DCIL): the student loss reaches only the
kept weights (through Q(w*m)); the teacher loss reaches only the pruned ones (``_route``: its
forward is a view of ``w`` itself, its backward multiplies by 1-m) unless
``teacher_updates_kept``. Every Conv->BN pair keeps one BatchNorm per path (``DualBatchNorm``).

``convert`` exports only the student: its BatchNorm is folded into the conv exactly (per-channel
scale c = gamma/sigma: Q(w)*c is w's integer code on the step s*|c|), pruned weights are zeroed,
and the result is the same graph a ``qat`` stage produces, so ``edgec export`` needs nothing new.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgec.stages.config import Optim, Quant
from edgec.stages.registry import register_stage

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from edgec import masks as P
from edgec.kd import kd_loss
from edgec.errors import InputError
from edgec.quant.modules import ActQuant, QConv2d, QLinear
from edgec.quant.prepare import _conv_bn, _module, _set_module
from edgec.quant.quantizers import LSQQuantizer, RangeQuantizer
from edgec.stages.base import _subset, steps_per_epoch, train_config
from edgec.stages.qat import prepare_quantized, quant_spec


# --------------------------------------------------------------------------------------------
# the two paths


class PQKStage(Optim, Quant):
    """Pruning + QAT, then KD from the pruned-away weights in the same network (docs/methods.md, PQK)."""

    method: Literal["pqk"]
    target_sparsity: float = Field(..., ge=0, lt=1, description="final global sparsity s_f of the prunable weights")
    epochs: int = Field(3, ge=0, description="phase 1: iterative global magnitude pruning + QAT (CE)")
    kd_epochs: int = Field(2, ge=0, description="phase 2: two-path KD with the mask frozen")
    ramp_fraction: float = Field(0.75, gt=0, le=1, description="share of phase-1 steps over which sparsity ramps (t_f)")
    update_every: int = Field(16, ge=1, description="recompute the global threshold every k steps (DCIL: 16)")
    prune_first_last: bool = Field(False, description="also prune the first conv and the classifier")
    temperature: float = Field(2.0, gt=0, description="tau of both KL terms")
    teacher_updates_kept: bool = Field(
        False, description="teacher loss also updates the kept weights (default: pruned-away weights only)")
    teacher_quantized: bool = Field(
        False, description="teacher path uses the quantized kept weights (default: all weights full precision)")
    weight_quantizer: Literal["lsq", "minmax"] = "lsq"
    act_quantizer: Literal["lsq", "ema"] = "lsq"
    lr: float = Field(0.005, gt=0)
    kd_lr: float | None = Field(None, gt=0, description="phase-2 lr (default: lr)")

    @model_validator(mode="after")
    def _no_float_layers(self):
        # a float layer keeps its own BatchNorm per path and is not masked in the forward: the student
        # export (student_state) does not fold that yet, so refuse it rather than export a wrong model
        bad = [k for k, v in self.layers.items() if v == "float"]
        if bad:
            raise ValueError(f"layers: pqk cannot keep layers float yet ({', '.join(bad)}); give them bits "
                             "(e.g. {weight_bits: 8, act_bits: 8}) or use qat/qkd for float layers")
        return self


class _Route(torch.autograd.Function):
    """Identity in the forward (a view of ``w``: the teacher reads the student's storage);
    the backward passes only the gradient of the pruned-away weights (``keep`` = 1 - mask)."""

    @staticmethod
    def forward(ctx, w: Tensor, keep: Tensor) -> Tensor:
        ctx.save_for_backward(keep)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep, None


class _TwoPath:
    """Mixin of the PQK layers: ``teacher_path`` selects the full-precision dense forward."""

    teacher_path: bool = False
    route: bool = True  # teacher gradients to the pruned-away weights only
    teacher_quantized: bool = False  # teacher path uses Q(w*m) + w*(1-m)

    def teacher_weight(self) -> Tensor:
        mask = getattr(self, "weight_mask", None)
        w = self.weight
        if mask is None:
            return w
        if self.teacher_quantized:
            return self.quantized_weight() + (_Route.apply(w, 1 - mask) if self.route else w) * (1 - mask)
        if self.route and torch.is_grad_enabled() and w.requires_grad:
            # value w*m + w*(1-m) = w; gradient only into w*(1-m): the kept part is the student's
            return _Route.apply(w, 1 - mask)
        return w


class PQKConv2d(_TwoPath, QConv2d):
    def forward(self, x: Tensor) -> Tensor:
        if self.teacher_path:
            return self._conv_forward(x, self.teacher_weight(), self.bias)
        return super().forward(x)


class PQKLinear(_TwoPath, QLinear):
    def forward(self, x: Tensor) -> Tensor:
        if self.teacher_path:
            return F.linear(x, self.teacher_weight(), self.bias)
        return super().forward(x)


class PathActQuant(ActQuant):
    """An activation quantization point that the teacher path passes through unquantized."""

    teacher_path: bool = False

    def forward(self, x: Tensor) -> Tensor:
        return x if self.teacher_path else super().forward(x)


class DualBatchNorm(nn.Module):
    """One BatchNorm (statistics and affine) per path, both starting from the original one."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.student = copy.deepcopy(bn)
        self.teacher = copy.deepcopy(bn)
        self.teacher_path = False

    def forward(self, x: Tensor) -> Tensor:
        return self.teacher(x) if self.teacher_path else self.student(x)


_PATH_MODULES = (PQKConv2d, PQKLinear, PathActQuant, DualBatchNorm)


def set_path(model: nn.Module, teacher: bool) -> None:
    for m in model.modules():
        if isinstance(m, _PATH_MODULES):
            m.teacher_path = teacher


def _swap_class(mod: nn.Module, cls: type) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__ = mod.__dict__  # same parameters, buffers, quantizers and _input_quant link
    return new


def build_two_path(gm: fx.GraphModule, *, route: bool, teacher_quantized: bool) -> fx.GraphModule:
    """Turn a quantized graph with unfolded BatchNorm into the two-path PQK network (in place)."""
    swapped: dict[int, nn.Module] = {}
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if isinstance(mod, (QConv2d, QLinear, ActQuant)):
            cls = PQKConv2d if isinstance(mod, QConv2d) else PQKLinear if isinstance(mod, QLinear) else PathActQuant
            new = _swap_class(mod, cls)
            if isinstance(new, _TwoPath):
                new.route, new.teacher_quantized = route, teacher_quantized
            swapped[id(mod)] = new
            _set_module(gm, str(node.target), new)
        elif _conv_bn(gm, node):
            _set_module(gm, str(node.target), DualBatchNorm(mod))
    for m in gm.modules():  # layers keep their link to the (now swapped) input quantizer
        link = getattr(m, "_input_quant", None)
        if link is not None and id(link) in swapped:
            object.__setattr__(m, "_input_quant", swapped[id(link)])
    gm.recompile()
    return gm


# --------------------------------------------------------------------------------------------
# student export: fold the student BatchNorm exactly into the quantized conv


@torch.no_grad()
def student_state(two_path: nn.Module, standard: nn.Module) -> dict[str, Tensor]:
    """State dict for ``standard`` (the BN-folded quantized graph a ``qat`` stage builds from the
    same float model) holding the PQK student: folded weights, rescaled weight quantizers,
    zeroed pruned weights, the student's activation quantizers."""
    src = dict(two_path.named_modules())
    bn_after = {}
    for node in two_path.graph.nodes:
        if isinstance(_module(two_path, node), DualBatchNorm):
            bn_after[str(node.args[0].target)] = _module(two_path, node).student
    state = {}
    for name, dst in standard.named_modules():
        if isinstance(dst, (QConv2d, QLinear)):
            s = src.get(name)
            if not isinstance(s, (QConv2d, QLinear)):
                raise RuntimeError(f"PQK export: no student layer {name!r} in the two-path network")
            w = s.weight * s.weight_mask if getattr(s, "weight_mask", None) is not None else s.weight
            b = s.bias if s.bias is not None else torch.zeros(w.shape[0], device=w.device)
            c = torch.ones(w.shape[0], device=w.device)
            bn = bn_after.get(name)
            if bn is not None:
                c = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                b = bn.bias + (b - bn.running_mean) * c
            shape = (-1,) + (1,) * (w.dim() - 1)
            state[f"{name}.weight"] = w * c.reshape(shape)
            if dst.bias is not None:
                state[f"{name}.bias"] = b
            elif bn is not None or s.bias is not None:
                raise RuntimeError(f"PQK export: layer {name!r} needs a bias after folding but has none")
            if getattr(dst, "weight_mask", None) is not None:
                state[f"{name}.weight_mask"] = s.weight_mask.clone()
            for k, v in s.wq.state_dict().items():
                state[f"{name}.wq.{k}"] = v.clone()
            if isinstance(s.wq, LSQQuantizer):
                state[f"{name}.wq.step"] = s.wq.step.abs() * c.abs()
            elif isinstance(s.wq, RangeQuantizer):
                state[f"{name}.wq.absmax"] = s.wq.absmax * c.abs()
        elif isinstance(dst, ActQuant):
            s = src.get(name)
            if not isinstance(s, ActQuant):
                raise RuntimeError(f"PQK export: no activation quantizer {name!r} in the two-path network")
            for k, v in s.state_dict().items():
                state[f"{name}.{k}"] = v.clone()
    missing = set(standard.state_dict()) - set(state)
    for k in missing:  # parameter-free structure kept as built (e.g. float layers left unquantized)
        state[k] = _lookup(two_path, k)
    return state


def _lookup(model: nn.Module, key: str) -> Tensor:
    sd = model.state_dict()
    if key in sd:
        return sd[key]
    raise RuntimeError(f"PQK export: {key!r} has no counterpart in the two-path network")


# --------------------------------------------------------------------------------------------
# losses


def pqk_loss(z_s: Tensor, z_t: Tensor, y: Tensor, tau: float) -> tuple[Tensor, dict]:
    """Two-path loss of phase 2; each KL has its target side detached (inside ``kd_loss``)."""
    parts = {"ce_s": F.cross_entropy(z_s, y), "ce_t": F.cross_entropy(z_t, y),
             "kl_t_s": kd_loss(z_s, z_t, tau), "kl_s_t": kd_loss(z_t, z_s, tau)}
    return sum(parts.values()), parts


def global_magnitude_masks(layers: list[nn.Module], sparsity: float) -> None:
    """m = 1[|w| > quantile(|w|, s)] over all prunable weights, pruned ones included (they keep
    their values, so they may come back): exactly round(s * n) zeros."""
    P._mask_smallest(layers, [m.weight.detach().abs() for m in layers], sparsity)


# --------------------------------------------------------------------------------------------
# the stage


def _spec(cfg, fold_bn: bool):
    from dataclasses import replace

    return replace(quant_spec(cfg, cfg.weight_quantizer, cfg.act_quantizer), fold_bn=fold_bn)


def _prunable(model: nn.Module, cfg) -> list[nn.Module]:
    return [m for _, m in P.prunable_layers(model, include_first_last=cfg.prune_first_last)]


class PQKHandler:
    def prepare(self, model, cfg, ctx):
        if ctx.rebuild:  # the structure convert produces: a BN-folded quantized student
            gm = prepare_quantized(model, cfg, ctx, _spec(cfg, fold_bn=True), can_float=False)
            P.ensure_masks([(n, m) for n, m in P.prunable_layers(gm, include_first_last=cfg.prune_first_last)])
            return gm
        float_copy = copy.deepcopy(model).cpu()
        gm = prepare_quantized(model, cfg, ctx, _spec(cfg, fold_bn=False), can_float=False)
        gm = build_two_path(gm, route=not cfg.teacher_updates_kept, teacher_quantized=cfg.teacher_quantized)
        P.ensure_masks([(n, m) for n, m in P.prunable_layers(gm, include_first_last=cfg.prune_first_last)])
        object.__setattr__(gm, "_pqk_float", float_copy)  # not a submodule: not in the state dict
        return gm

    def run(self, model, cfg, ctx):
        from edgec.engine import Hooks, fit

        layers = _prunable(model, cfg)
        train_set = _subset(ctx.data.train, cfg.max_train_samples, ctx.seed)
        metrics: dict = {}
        # ---- phase 1: iterative global magnitude pruning + QAT, CE on the student ----
        total = steps_per_epoch(len(train_set), cfg.batch_size, ctx.dist.world_size) * cfg.epochs
        ramp = int(total * cfg.ramp_fraction)

        def on_step_start(step: int) -> None:
            if step % cfg.update_every == 0 or step == ramp:
                global_magnitude_masks(layers, P.cubic_sparsity(step, ramp, cfg.target_sparsity))

        def student_ce(m, x, y):
            z = m(x)
            return F.cross_entropy(z, y), z

        set_path(model, False)
        if cfg.epochs:
            on_step_start(0)
            # the teacher BatchNorms get no gradient in phase 1
            p1_cfg = dataclasses.replace(train_config(cfg, ctx), find_unused_parameters=True)
            metrics["phase1"] = fit(
                model, loss_fn=student_ce, train_set=train_set, eval_set=ctx.data.eval, cfg=p1_cfg,
                ckpt_path=ctx.ckpt_path.with_name(f"{ctx.ckpt_path.stem}_phase1.pt"), resume=ctx.resume,
                hooks=Hooks(on_step_start=on_step_start), augment=ctx.data.augment,
                metrics_path=ctx.metrics_path, desc=f"stage {ctx.index} pqk-1 prune+qat", dist=ctx.dist)
        global_magnitude_masks(layers, cfg.target_sparsity)  # the mask phase 2 freezes: exactly s_f
        stats = self.mask_stats(layers)
        ctx.record(event="pqk_mask", **stats)
        ctx.log(f"PQK mask: {stats['pruned']}/{stats['prunable']} prunable weights pruned "
                f"({stats['sparsity']:.4f}); their values stay for the teacher")

        # ---- phase 2: student and teacher in one network, two forwards per batch ----
        if cfg.kd_epochs:
            if ctx.dist.world_size > 1:
                raise InputError("PQK phase 2 (two forward passes per step) does not run under torchrun yet",
                                 hint="run this recipe in a single process, or set kd_epochs: 0")
            tau = cfg.temperature

            def two_path_loss(m, x, y):
                set_path(model, False)
                z_s = m(x)
                set_path(model, True)
                try:
                    z_t = m(x)
                finally:
                    set_path(model, False)
                loss, _ = pqk_loss(z_s, z_t, y, tau)
                return loss, z_s

            kd_cfg = train_config(cfg, ctx, epochs=cfg.kd_epochs)
            if cfg.kd_lr is not None:
                kd_cfg = dataclasses.replace(kd_cfg, lr=cfg.kd_lr)
            metrics["phase2"] = fit(
                model, loss_fn=two_path_loss, train_set=train_set, eval_set=ctx.data.eval, cfg=kd_cfg,
                ckpt_path=ctx.ckpt_path.with_name(f"{ctx.ckpt_path.stem}_phase2.pt"), resume=ctx.resume,
                augment=ctx.data.augment, metrics_path=ctx.metrics_path,
                desc=f"stage {ctx.index} pqk-2 kd", dist=ctx.dist)
            metrics["teacher_eval_acc"] = self.teacher_accuracy(model, ctx)
            ctx.record(event="pqk_teacher", eval_acc=metrics["teacher_eval_acc"])
        return metrics

    @staticmethod
    def mask_stats(layers: list[nn.Module]) -> dict:
        n = sum(m.weight_mask.numel() for m in layers)
        pruned = sum(int((m.weight_mask == 0).sum()) for m in layers)
        return {"prunable": n, "pruned": pruned, "sparsity": pruned / max(n, 1)}

    @staticmethod
    @torch.no_grad()
    def teacher_accuracy(model, ctx) -> float:
        model.eval()
        set_path(model, True)
        correct = seen = 0
        try:
            for x, y in torch.utils.data.DataLoader(ctx.data.eval, batch_size=256):
                correct += int((model(x.to(ctx.device)).argmax(1).cpu() == y).sum())
                seen += len(y)
        finally:
            set_path(model, False)
        return correct / max(seen, 1)

    def convert(self, model, cfg, ctx):
        if ctx.rebuild:
            return model
        float_model = getattr(model, "_pqk_float")
        standard = prepare_quantized(float_model, cfg, dataclasses.replace(ctx, rebuild=True), _spec(cfg, fold_bn=True),
                                     can_float=False)
        P.ensure_masks([(n, m) for n, m in P.prunable_layers(standard, include_first_last=cfg.prune_first_last)])
        standard = standard.to(ctx.device)
        standard.load_state_dict(student_state(model, standard))
        P.apply_masks(standard)
        return standard.eval()


register_stage("pqk", PQKStage, PQKHandler(), quantizes=True)

"""Unstructured pruning primitives: importance scores, masks, sparsity schedules.

Masks live on each prunable module as a ``weight_mask`` buffer (1 = kept). They survive later
stages: every training stage masks gradients and re-applies the mask after each optimizer step,
and quantized modules multiply by it before quantizing.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from edgec.registry import Registry

ScoreFn = Callable[[nn.Module], Tensor]
SCORES: Registry[ScoreFn] = Registry("importance score")


@SCORES.register("magnitude")
def magnitude(mod: nn.Module) -> Tensor:
    return mod.weight.detach().abs()


def prunable_layers(model: nn.Module, *, include_first_last: bool = False) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not include_first_last and len(layers) > 2:
        layers = layers[1:-1]
    return layers


def masked_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "weight_mask", None) is not None]


def ensure_masks(layers: list[tuple[str, nn.Module]]) -> None:
    for _, m in layers:
        if getattr(m, "weight_mask", None) is None:
            m.register_buffer("weight_mask", torch.ones_like(m.weight))


def cubic_sparsity(step: int, ramp_steps: int, final: float, initial: float = 0.0) -> float:
    """AGP / cubic schedule: s_t = s_f + (s_i - s_f) * (1 - t/T)^3, held at s_f after T."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return final
    frac = 1.0 - step / ramp_steps
    return final + (initial - final) * frac**3


@torch.no_grad()
def update_masks(layers: list[tuple[str, nn.Module]], sparsity: float, *, scope: str = "global",
                 score: str = "magnitude", scores: list[Tensor] | None = None) -> None:
    """Set masks so that exactly round(sparsity * n) weights are zero (globally or per layer).

    ``scores`` (one tensor per layer, e.g. from ``edgec.importance.compute_scores``) replaces the
    named data-free ``score``. Already-pruned weights score 0, so they stay pruned.
    """
    ensure_masks(layers)
    if scores is None:
        score_fn = SCORES.get(score)
        scores = [score_fn(m) for _, m in layers]
    elif len(scores) != len(layers) or any(s.shape != m.weight.shape for s, (_, m) in zip(scores, layers)):
        raise ValueError("update_masks: need one score tensor per layer, shaped like its weight")
    scores = [s.to(m.weight_mask.device) * m.weight_mask for s, (_, m) in zip(scores, layers)]
    if scope == "layer":
        for (_, m), s in zip(layers, scores):
            _mask_smallest([m], [s], sparsity)
    else:
        _mask_smallest([m for _, m in layers], scores, sparsity)


def _mask_smallest(mods: list[nn.Module], scores: list[Tensor], sparsity: float) -> None:
    flat = torch.cat([s.flatten() for s in scores])
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat)
    if k > 0:
        idx = torch.argsort(flat, stable=True)[:k]  # already-pruned weights score 0: they stay pruned
        keep[idx] = 0
    offset = 0
    for m in mods:
        n = m.weight.numel()
        m.weight_mask.copy_(keep[offset:offset + n].view_as(m.weight))
        offset += n


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    for m in masked_layers(model):
        m.weight.mul_(m.weight_mask)


@torch.no_grad()
def mask_gradients(model: nn.Module) -> None:
    for m in masked_layers(model):
        if m.weight.grad is not None:
            m.weight.grad.mul_(m.weight_mask)


def sparsity_stats(model: nn.Module) -> dict:
    """Zeros among conv/linear weights (after masks), overall and among masked layers."""
    total = zeros = pm_total = pm_zero = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            mask = getattr(m, "weight_mask", None)
            if mask is not None:
                w = w * mask
                pm_total += w.numel()
                pm_zero += int((w == 0).sum())
            total += w.numel()
            zeros += int((w == 0).sum())
    return {"weights": total, "zeros": zeros, "sparsity": zeros / max(total, 1),
            "prunable_weights": pm_total, "prunable_sparsity": pm_zero / max(pm_total, 1)}

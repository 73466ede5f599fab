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


# ---------------------------------------------------------------------------------------------
# N:M semi-structured sparsity (2:4 for NVIDIA sparse tensor cores)
#
# Convention (NVIDIA's: apex ASP ``m4n2_1d``, ModelOpt ``"2:4"``, TensorRT's sparse-weights rule):
# "N:M" keeps at most N non-zero weights in every group of M consecutive weights along the
# reduction (input-channel) dimension, so M - N of each group are zero (2:4: two of every four).
# A Linear weight [O, I] is grouped along I; a conv weight [O, I/g, kh, kw] is read as
# [O, kh, kw, I/g] (ASP permutes it so) and grouped along I/g: for every output channel and every
# kernel position, each run of M input channels holds at most N non-zeros. A layer whose I/g is
# not a multiple of M is left dense (and listed): padding the channels would change the model's
# shape, and a TensorRT kernel groups the channels it is given, so a padded group would not line
# up with the one the engine uses.

NM_GROUP_SIZES = (4, 8, 16)


def parse_pattern(text: str) -> tuple[int, int]:
    """``"N:M"`` -> (N, M), with 0 < N < M and M in NM_GROUP_SIZES; ValueError says what is wrong."""
    parts = str(text).strip().split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"pattern must be 'N:M' with integers, e.g. '2:4'; got {text!r}") from None
    if m not in NM_GROUP_SIZES:
        raise ValueError(f"pattern {text!r}: group size M must be one of {NM_GROUP_SIZES} "
                         "(NVIDIA sparse tensor cores use 2:4)")
    if not 0 < n < m:
        raise ValueError(f"pattern {text!r}: need 0 < N < M (N weights kept of every M)")
    return n, m


def nm_eligible(mod: nn.Module, m: int) -> bool:
    """The layer's reduction groups fit: input channels per group (weight.shape[1]) divisible by M."""
    return mod.weight.dim() >= 2 and mod.weight.shape[1] % m == 0


def nm_groups(t: Tensor, m: int) -> Tensor:
    """``t`` [O, I, *k] as rows of M consecutive input-channel entries: shape [O * prod(k) * I / M, M]."""
    return t.movedim(1, -1).reshape(-1, m)


@torch.no_grad()
def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """A 0/1 mask shaped like ``scores``: in every group of M it keeps the N highest scores, exactly
    M - N zeros. Ties are broken by position (a stable sort: the earlier of equal scores is pruned)."""
    moved = scores.movedim(1, -1)
    groups = moved.reshape(-1, m)
    order = torch.argsort(groups, dim=1, stable=True)
    keep = torch.ones_like(groups, dtype=torch.float32)
    keep.scatter_(1, order[:, :m - n], 0.0)
    return keep.reshape(moved.shape).movedim(-1, 1).contiguous().to(scores.dtype)


@torch.no_grad()
def update_nm_masks(layers: list[tuple[str, nn.Module]], n: int, m: int, *,
                    scores: list[Tensor] | None = None) -> tuple[list[str], list[str]]:
    """N:M masks on the eligible ``layers`` (magnitude scores unless ``scores``, one per layer).

    Returns (names given the pattern, names left dense because their input channels are not a
    multiple of M). An existing mask is kept (new mask = N:M mask AND old mask), so a weight pruned
    before stays pruned: a group then has at least, not exactly, M - N zeros.
    """
    ensure_masks(layers)
    if scores is None:
        scores = [m_.weight.detach().abs().float() for _, m_ in layers]
    if len(scores) != len(layers):
        raise ValueError("update_nm_masks: need one score tensor per layer")
    patterned, dense = [], []
    for (name, mod), s in zip(layers, scores):
        if not nm_eligible(mod, m):
            dense.append(name)
            continue
        old = mod.weight_mask
        mask = nm_mask(s.to(old.device).float() * old, n, m)
        mod.weight_mask.copy_(mask * old)
        patterned.append(name)
    return patterned, dense

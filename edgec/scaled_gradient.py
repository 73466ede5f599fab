"""Position-based Scaled Gradient (Kim, Yoo, Kwak; NeurIPS 2020), docs/methods.md, PSG.

Gradient descent in a warped weight space: each weight's gradient is multiplied by its distance to
the target point, so weights drift towards the quantization grid (or towards 0 for the weights the
pruning variant will remove) and the full-precision model quantizes post-training with little loss.

Per layer, the target grid is the authors' symmetric EMA-range quantizer:
    x_min <- m*min(0, min w) + (1-m)*x_min,   x_max <- m*max(0, max w) + (1-m)*x_max   (m = 0.1)
    a = max(|x_min|, x_max),  n = 2^(b-1) - 1,  Delta = a/n,  Q(w) = Delta*round(clip(w/Delta, -n, n))
and the scaled gradient is  g' = lambda_s * (|w - Q(w)| + eps) * g,  eps = eps_rel * a.
Pruning variant: for the smallest |w| up to the target sparsity, s(w) = |w| + eps; the rest keep the
quantization scaling (or 1 when no bit width is targeted).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def psg_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def ensure_state(model: nn.Module) -> None:
    """Register the EMA range buffers (part of the state_dict, so runs resume exactly)."""
    for _, m in psg_layers(model):
        if getattr(m, "psg_range", None) is None:
            m.register_buffer("psg_range", torch.zeros(2))  # [x_min, x_max]
            m.register_buffer("psg_seen", torch.zeros((), dtype=torch.bool))


@torch.no_grad()
def update_range(mod: nn.Module, momentum: float) -> None:
    w = mod.weight
    lo, hi = torch.clamp(w.min(), max=0), torch.clamp(w.max(), min=0)
    if not bool(mod.psg_seen):
        mod.psg_range.copy_(torch.stack([lo, hi]))
        mod.psg_seen.fill_(True)
    else:
        mod.psg_range.mul_(1 - momentum).add_(momentum * torch.stack([lo, hi]))


def layer_range(mod: nn.Module) -> Tensor:
    """a = max(|x_min|, x_max) of the layer's EMA range."""
    return torch.maximum(mod.psg_range[0].abs(), mod.psg_range[1])


def grid_quantize(w: Tensor, a: Tensor, bits: int) -> Tensor:
    n = 2 ** (bits - 1) - 1
    delta = (a / n).clamp_min(1e-12)
    return delta * torch.round(torch.clamp(w / delta, -n, n))


def gradient_scale(w: Tensor, a: Tensor, bits: int | None, *, lambda_s: float, eps_rel: float,
                   prune_mask: Tensor | None = None) -> Tensor:
    """The per-weight factor that multiplies dL/dw."""
    eps = eps_rel * a
    if bits is None:
        scale = torch.ones_like(w)
    else:
        scale = lambda_s * ((w - grid_quantize(w, a, bits)).abs() + eps)
    if prune_mask is not None:  # True where the weight is a pruning candidate (target point 0)
        scale = torch.where(prune_mask, w.abs() + eps, scale)
    return scale


def layer_bits(index: int, count: int, bits: int | None, first_last_bits: int) -> int | None:
    """First conv and last linear stay at ``first_last_bits`` when the target is below 4 bits."""
    if bits is not None and bits < 4 and index in (0, count - 1):
        return first_last_bits
    return bits


@torch.no_grad()
def prune_candidates(layers: list[nn.Module], sparsity: float) -> list[Tensor]:
    """Global smallest-|w| set of size round(sparsity * n), as boolean masks per layer."""
    flat = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    k = int(round(sparsity * flat.numel()))
    cand = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        cand[torch.argsort(flat, stable=True)[:k]] = True
    out, off = [], 0
    for m in layers:
        n = m.weight.numel()
        out.append(cand[off:off + n].view_as(m.weight))
        off += n
    return out


@torch.no_grad()
def scale_gradients(model: nn.Module, *, bits: int | None, lambda_s: float, eps_rel: float, momentum: float,
                    target_sparsity: float | None, first_last_bits: int) -> None:
    """The PSGD backward: update each layer's range, then multiply its weight gradient in place."""
    layers = [m for _, m in psg_layers(model)]
    cands = prune_candidates(layers, target_sparsity) if target_sparsity else [None] * len(layers)
    for i, (m, cand) in enumerate(zip(layers, cands)):
        update_range(m, momentum)
        if m.weight.grad is None:
            continue
        b = layer_bits(i, len(layers), bits, first_last_bits)
        m.weight.grad.mul_(gradient_scale(m.weight, layer_range(m), b, lambda_s=lambda_s, eps_rel=eps_rel,
                                          prune_mask=cand))


@torch.no_grad()
def grid_mse(model: nn.Module, bits: int) -> float:
    """Mean over layers of E[(w - Q(w))^2] / Delta^2 on the grid each layer would be deployed with:
    PSG's EMA range when the layer has one, else its current min-max range (uniform error: 1/12)."""
    vals = []
    for _, m in psg_layers(model):
        w = m.weight.detach()
        a = layer_range(m) if getattr(m, "psg_seen", None) is not None and bool(m.psg_seen) else w.abs().max()
        delta = a / (2 ** (bits - 1) - 1)
        vals.append(float(((w - grid_quantize(w, a, bits)) ** 2).mean() / delta**2))
    return sum(vals) / len(vals)

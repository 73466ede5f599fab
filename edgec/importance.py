"""Importance scores for pruning, as a registry shared by the ``prune`` stage and EED.

A score gives every weight of the chosen layers a non-negative importance; a mask keeps the most
important ones. Scores (``IMPORTANCE`` registry, ``compute_scores(name, model, layers, ...)``):

``magnitude``   |w|
``taylor``      sum over batches b of |w * dL_b/dw|          (first-order Taylor, Molchanov et al. 2019)
``snip``        |w * dL/dw| / sum over all scored weights    (SNIP connection sensitivity, Lee et al.
                2019; dL/dw of the loss over all the given batches, normalised to sum 1)
``fisher``      sum over batches b of (dL_b/dw)^2            (diagonal empirical Fisher, a proxy of the
                Hessian diagonal)
``fisher_w2``   fisher * w^2                                  (OBD-style saliency with the Fisher proxy)
``random``      uniform [0, 1), seeded

Taylor and SNIP differ in where the absolute value is taken: Taylor accumulates |w*g_b| per batch,
SNIP takes |w * sum_b g_b| once. Data-aware scores run the model in eval mode (BatchNorm
statistics untouched) and take gradients with ``torch.autograd.grad``, so no ``.grad`` is touched.

Masks at an exact sparsity:

* :func:`unstructured_masks` per weight, globally or per layer: exactly ``round(s * n)`` zeros;
* :func:`channel_masks` per output channel, from the L2 norm of each channel's scores: exactly
  ``round(s * C)`` channels removed per layer (or in total with ``scope="global"``), at least one
  kept per layer; :func:`shrink_channels` then removes them physically with Torch-Pruning's
  DependencyGraph (coupled layers such as residual branches are pruned together), and
  :func:`zero_channels` is the same operation as a mask on the unchanged architecture.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgec.errors import InputError
from edgec.registry import Registry

__all__ = [
    "IMPORTANCE",
    "ScoreInputs",
    "compute_scores",
    "unstructured_masks",
    "channel_scores",
    "channel_masks",
    "channel_prunable_layers",
    "shrink_channels",
    "zero_channels",
    "mask_overlap",
]

Layers = Sequence[tuple[str, nn.Module]]
Batch = tuple[Tensor, Tensor]


@dataclass
class ScoreInputs:
    """What data-aware scores need: a few batches, the loss, and a seed (for ``random``)."""

    batches: Sequence[Batch] | None = None
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    seed: int = 0
    device: torch.device | str | None = None


ScoreFn = Callable[[nn.Module, Layers, ScoreInputs], list[Tensor]]
IMPORTANCE: Registry[ScoreFn] = Registry("importance score")
DATA_AWARE = frozenset({"taylor", "snip", "fisher", "fisher_w2"})


def compute_scores(name: str, model: nn.Module, layers: Layers, *, batches: Iterable[Batch] | None = None,
                   loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, seed: int = 0,
                   device: torch.device | str | None = None) -> list[Tensor]:
    """One score tensor per layer (shape of its weight, float32, detached)."""
    fn = IMPORTANCE.get(name)
    batches = list(batches) if batches is not None else None
    if name in DATA_AWARE and not batches:
        raise InputError(f"importance score {name!r} needs data: pass a few (x, y) batches")
    return fn(model, layers, ScoreInputs(batches, loss_fn, seed, device))


# ----------------------------------------------------------------------------------------------
# the scores


@IMPORTANCE.register("magnitude")
def _magnitude(model: nn.Module, layers: Layers, inp: ScoreInputs) -> list[Tensor]:
    return [m.weight.detach().abs().float() for _, m in layers]


@IMPORTANCE.register("random")
def _random(model: nn.Module, layers: Layers, inp: ScoreInputs) -> list[Tensor]:
    g = torch.Generator().manual_seed(inp.seed)
    return [torch.rand(m.weight.shape, generator=g).to(m.weight.device) for _, m in layers]


def _gradients(model: nn.Module, layers: Layers, inp: ScoreInputs) -> Iterable[list[Tensor]]:
    """Per batch: dL/dw of each layer's weight (model in eval mode, no .grad touched)."""
    weights = [m.weight for _, m in layers]
    modes = [(m, m.training) for m in model.modules()]
    flags = [w.requires_grad for w in weights]
    device = inp.device if inp.device is not None else weights[0].device
    model.eval()
    try:
        for w in weights:
            w.requires_grad_(True)
        for x, y in inp.batches or ():
            with torch.enable_grad():
                loss = inp.loss_fn(model(x.to(device)).float(), y.to(device))
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
            yield [torch.zeros_like(w) if g is None else g.detach().float() for w, g in zip(weights, grads)]
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
        for m, mode in modes:
            m.training = mode


@IMPORTANCE.register("taylor")
def _taylor(model: nn.Module, layers: Layers, inp: ScoreInputs) -> list[Tensor]:
    ws = [m.weight.detach().float() for _, m in layers]
    acc = [torch.zeros_like(w) for w in ws]
    for grads in _gradients(model, layers, inp):
        for a, w, g in zip(acc, ws, grads):
            a.add_((w * g).abs())
    return acc


@IMPORTANCE.register("snip")
def _snip(model: nn.Module, layers: Layers, inp: ScoreInputs) -> list[Tensor]:
    ws = [m.weight.detach().float() for _, m in layers]
    gsum = [torch.zeros_like(w) for w in ws]
    n = 0
    for grads in _gradients(model, layers, inp):
        n += 1
        for a, g in zip(gsum, grads):
            a.add_(g)
    sens = [(w * g / max(n, 1)).abs() for w, g in zip(ws, gsum)]
    total = sum(float(s.sum()) for s in sens)
    return [s / total if total > 0 else s for s in sens]


@IMPORTANCE.register("fisher")
def _fisher(model: nn.Module, layers: Layers, inp: ScoreInputs) -> list[Tensor]:
    acc = [torch.zeros_like(m.weight, dtype=torch.float32) for _, m in layers]
    for grads in _gradients(model, layers, inp):
        for a, g in zip(acc, grads):
            a.add_(g * g)
    return acc


@IMPORTANCE.register("fisher_w2")
def _fisher_w2(model: nn.Module, layers: Layers, inp: ScoreInputs) -> list[Tensor]:
    return [f * m.weight.detach().float() ** 2 for f, (_, m) in zip(_fisher(model, layers, inp), layers)]


# ----------------------------------------------------------------------------------------------
# unstructured masks


def _smallest(flat: Tensor, k: int) -> Tensor:
    """Boolean keep-mask with exactly ``k`` False at the smallest values (stable on ties)."""
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep


def unstructured_masks(scores: Sequence[Tensor], sparsity: float, *,
                       scope: Literal["global", "layer"] = "global") -> list[Tensor]:
    """Float {0, 1} masks (1 = kept) with exactly ``round(sparsity * n)`` zeros (n per layer or total)."""
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1) (got {sparsity})")
    if scope == "layer":
        return [_smallest(s.flatten(), int(round(sparsity * s.numel()))).view_as(s).float() for s in scores]
    if scope != "global":
        raise InputError(f"scope must be 'global' or 'layer' (got {scope!r})")
    flat = torch.cat([s.flatten().float() for s in scores])
    keep = _smallest(flat, int(round(sparsity * flat.numel()))).float()
    out, off = [], 0
    for s in scores:
        out.append(keep[off:off + s.numel()].view_as(s))
        off += s.numel()
    return out


def mask_overlap(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Share of pruned weights (zeros) of ``a`` that are also pruned in ``b`` (1.0 = same mask)."""
    za = torch.cat([(m == 0).flatten() for m in a])
    zb = torch.cat([(m == 0).flatten() for m in b])
    return float((za & zb).sum()) / max(int(za.sum()), 1)


# ----------------------------------------------------------------------------------------------
# channels


def channel_prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv / Linear layers whose output channels may go: all but the last layer (the classifier)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return layers[:-1]


def channel_scores(scores: Sequence[Tensor]) -> list[Tensor]:
    """Per output channel: the L2 norm of the channel's weight scores."""
    return [s.flatten(1).norm(dim=1) if s.ndim > 1 else s.abs() for s in scores]


def channel_masks(scores: Sequence[Tensor], sparsity: float, *, scope: Literal["global", "layer"] = "layer",
                  min_keep: int = 1) -> list[Tensor]:
    """Boolean keep-masks over output channels from per-weight ``scores``.

    ``scope="layer"``: exactly ``round(sparsity * C)`` channels removed in every layer (capped so
    ``min_keep`` stay). ``scope="global"``: exactly ``round(sparsity * total)`` removed overall,
    smallest channel scores first, skipping a layer once only ``min_keep`` of its channels are left.
    """
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1) (got {sparsity})")
    ch = channel_scores(scores)
    if scope == "layer":
        return [_smallest(c, min(int(round(sparsity * c.numel())), c.numel() - min_keep)) for c in ch]
    if scope != "global":
        raise InputError(f"scope must be 'global' or 'layer' (got {scope!r})")
    flat = torch.cat([c.float() for c in ch])
    owner = torch.cat([torch.full((c.numel(),), i) for i, c in enumerate(ch)])
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    left = [c.numel() for c in ch]
    removed = 0
    for j in torch.argsort(flat.cpu(), stable=True).tolist():
        if removed == k:
            break
        i = int(owner[j])
        if left[i] > min_keep:
            keep[j] = False
            left[i] -= 1
            removed += 1
    out, off = [], 0
    for c in ch:
        out.append(keep[off:off + c.numel()].to(c.device))
        off += c.numel()
    return out


def _dependency_graph(model: nn.Module, example_input: Tensor):
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise InputError("channel pruning needs torch-pruning", hint="pip install torch-pruning") from exc
    if any(getattr(m, "weight_mask", None) is not None for m in model.modules()):
        raise InputError("channel pruning of a model that carries unstructured weight masks is not supported",
                         hint="run channel pruning before unstructured pruning")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # the tracing forward pass must not move BatchNorm statistics
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    finally:
        for m, mode in modes:
            m.training = mode
    return tp, dg


def _out_fn(tp, mod: nn.Module):
    if isinstance(mod, nn.Conv2d):
        return tp.prune_conv_out_channels
    if isinstance(mod, nn.Linear):
        return tp.prune_linear_out_channels
    raise InputError(f"channel masks are for Conv2d / Linear layers (got {type(mod).__name__})")


@torch.no_grad()
def _zero_group(dg, group) -> None:
    for dep, idxs in group:
        mod = dep.target.module
        idx = torch.as_tensor([int(i) for i in idxs], dtype=torch.long)
        if dg.is_out_channel_pruning_fn(dep.handler):
            for name in ("weight", "bias"):
                p = getattr(mod, name, None)
                if isinstance(p, Tensor) and p.ndim >= 1:
                    p.index_fill_(0, idx.to(p.device), 0.0)
        elif dg.is_in_channel_pruning_fn(dep.handler) and isinstance(mod, (nn.Conv2d, nn.Linear)):
            if isinstance(mod, nn.Conv2d) and mod.groups > 1:
                continue  # depthwise: zeroing its output channels covers it
            mod.weight.index_fill_(1, idx.to(mod.weight.device), 0.0)


def _channel_groups(model: nn.Module, example_input: Tensor, masks: dict[nn.Module, Tensor], *,
                    physical: bool) -> nn.Module:
    """Remove (``physical``) or zero the output channels whose keep-mask is False, group by group."""
    tp, dg = _dependency_graph(model, example_input)
    remaining = {m: list(range(m.weight.shape[0])) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    n_orig = {m: len(r) for m, r in remaining.items()}
    for mod, keep in masks.items():
        if mod not in remaining:
            raise InputError(f"channel mask for a module that is not a Conv2d/Linear of this model: {mod}")
        keep = keep.to(torch.bool).cpu()
        if keep.numel() != n_orig[mod]:
            raise InputError(f"channel mask of {keep.numel()} entries for a layer of {n_orig[mod]} channels")
        idxs = [pos for pos, orig in enumerate(remaining[mod]) if not bool(keep[orig])]
        if not idxs:
            continue
        if len(idxs) == len(remaining[mod]):
            raise InputError("a channel mask removes every channel of a layer; keep at least one")
        group = dg.get_pruning_group(mod, _out_fn(tp, mod), idxs)
        if not dg.check_pruning_group(group):
            raise InputError(f"torch-pruning refused to prune channels {idxs} of {mod}")
        if physical:
            for dep, dep_idxs in group:
                target = dep.target.module
                if target in remaining and dg.is_out_channel_pruning_fn(dep.handler):
                    gone = {int(i) for i in dep_idxs}
                    remaining[target] = [c for p, c in enumerate(remaining[target]) if p not in gone]
            group.prune()
        else:
            _zero_group(dg, group)
    return model


def shrink_channels(model: nn.Module, example_input: Tensor, masks: dict[nn.Module, Tensor]) -> nn.Module:
    """Physically remove the output channels whose mask is False (in place; returns ``model``).

    ``masks`` maps Conv2d/Linear modules of ``model`` to boolean keep-masks over their original
    output channels (as the model was when the masks were made). Torch-Pruning removes each
    channel from every coupled layer too (the next layer's input channels, BatchNorm, residual
    partners), so a mask on one layer of a coupled group prunes the whole group.
    """
    return _channel_groups(model, example_input, masks, physical=True)


def zero_channels(model: nn.Module, example_input: Tensor, masks: dict[nn.Module, Tensor]) -> nn.Module:
    """The masked twin of :func:`shrink_channels` (in place): the same channels and coupled slices
    are zeroed (weights, biases, BatchNorm affine parameters, the consumers' input slices) instead
    of removed, so the outputs equal those of the shrunk model."""
    return _channel_groups(model, example_input, masks, physical=False)


def sample_batches(dataset, n_batches: int, batch_size: int, *, seed: int) -> list[Batch]:
    """``n_batches`` batches drawn without replacement from ``dataset`` by a seeded permutation
    (the same on every rank, so data-aware scores and masks agree under DDP)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)[: n_batches * batch_size].tolist()
    batches = []
    for i in range(0, len(order), batch_size):
        xs, ys = zip(*(dataset[j] for j in order[i:i + batch_size]))
        batches.append((torch.stack(xs), torch.as_tensor([int(y) for y in ys])))
    return batches

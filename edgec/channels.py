"""Structured channel pruning on Torch-Pruning's dependency groups: the engine of the ``prune_channels`` stage.

Torch-Pruning (``tp.pruner.MetaPruner``) finds the coupled layers of every channel (residual adds,
concatenation, depthwise / grouped convs, squeeze-excite gates, norms, Linear heads) and removes a
channel from all of them at once. This module chooses what it ranks by (:func:`make_importance`),
what it may not touch (:func:`protected_layers`), prunes in small increments until a MAC or
parameter budget holds (:func:`prune_until`), and checks after every increment that the model still
runs (:func:`check_forward`), naming the layer when it does not.

Importance (``importance:``):

``l1`` / ``l2``   group magnitude (``tp.importance.GroupMagnitudeImportance``, p = 1 / 2)
``bn_scale``      BatchNorm scale |gamma| (network slimming, ``tp.importance.BNScaleImportance``)
``taylor``        group first-order Taylor |w * dL/dw| (``tp.importance.GroupTaylorImportance``), gradients of
                  a few training batches
``magnitude`` / ``snip`` / ``fisher`` / ``fisher_w2`` / ``random``  the per-weight scores of
                  :mod:`edgec.importance`, summed per channel and averaged over the group by
                  Torch-Pruning's own group reduction (:class:`RegistryImportance`)
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from edgec.errors import InputError

__all__ = ["TP_IMPORTANCE", "REGISTRY_IMPORTANCE", "count", "protected_layers", "make_importance",
           "build_pruner", "prune_until", "check_forward", "RegistryImportance", "taylor_gradients"]

TP_IMPORTANCE = ("l1", "l2", "bn_scale", "taylor")
REGISTRY_IMPORTANCE = ("magnitude", "snip", "fisher", "fisher_w2", "random")
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def _tp():
    import torch_pruning as tp

    return tp


@contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one sample through ``model`` (``tp.utils.count_ops_and_params``)."""
    with _eval_mode(model), torch.no_grad():
        macs, params = _tp().utils.count_ops_and_params(model, example[:1])
    return int(macs), int(params)


def _call_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Conv / Linear layers in the order the forward calls them (first call counts)."""
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, _LAYERS):
            def hook(m, args, name=name):
                if id(m) not in seen:
                    seen.add(id(m))
                    order.append((name, m))
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with _eval_mode(model), torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return order


def protected_layers(model: nn.Module, example: torch.Tensor, *, prune_first_last: bool,
                     ignore: Sequence[str] = ()) -> tuple[list[nn.Module], list[str]]:
    """The modules whose output channels stay (Torch-Pruning's ``ignored_layers``) and their names.

    The layer the forward calls last (the classifier: its outputs are the classes) always stays; the
    first one too unless ``prune_first_last``; plus every module whose qualified name matches a glob
    of ``ignore`` (a module's sub-layers with it). A glob that matches nothing is an error."""
    order = _call_order(model, example)
    if not order:
        raise InputError("channel pruning found no Conv / Linear layer that the model's forward calls",
                         hint="prune_channels needs a model built from torch.nn Conv*d / Linear layers")
    names = [order[-1][0]] + ([] if prune_first_last or len(order) < 2 else [order[0][0]])
    modules = dict(model.named_modules())
    for glob in ignore:
        hits = [n for n in modules if n and fnmatch.fnmatchcase(n, glob)]
        if not hits:
            raise InputError(f"ignore glob {glob!r} matches no module of the model",
                             hint=f"module names look like: {', '.join(n for n, _ in order[:6])}")
        names += [n for n in hits if n not in names]
    return [modules[n] for n in names], names


class RegistryImportance:
    """A score of :mod:`edgec.importance` (per weight of every Conv / Linear) aggregated over a
    Torch-Pruning group: Torch-Pruning's group magnitude (p = 1, group mean, mean-normalised) read
    from the score tensors instead of the weights. :meth:`refresh` recomputes the scores."""

    def __init__(self, name: str, batches_fn: Callable[[int], list] | None, seed: int = 0):
        self.name, self.batches_fn, self.seed = name, batches_fn, seed
        self.inner = _tp().importance.GroupMagnitudeImportance(p=1, target_types=list(_LAYERS))
        self.scores: dict[nn.Module, torch.Tensor] = {}

    def refresh(self, model: nn.Module, step: int) -> None:
        from edgec import importance as I

        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
        batches = self.batches_fn(step) if self.name in I.DATA_AWARE else None
        scores = I.compute_scores(self.name, model, layers, batches=batches, seed=self.seed + step)
        self.scores = {m: s for (_, m), s in zip(layers, scores)}

    @torch.no_grad()
    def __call__(self, group):
        swapped = []
        try:
            for dep, _ in group:
                layer = dep.layer
                s = self.scores.get(layer)
                if s is not None and s.shape == layer.weight.shape and all(layer is not w for w, _ in swapped):
                    swapped.append((layer, layer.weight.data))
                    layer.weight.data = s.to(layer.weight.device)
            return self.inner(group)
        finally:
            for layer, data in swapped:
                layer.weight.data = data


def make_importance(name: str, *, batches_fn: Callable[[int], list] | None = None, seed: int = 0):
    """The importance object Torch-Pruning ranks groups by (module docstring)."""
    imp = _tp().importance
    if name == "l1":
        return imp.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return imp.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        return imp.BNScaleImportance()
    if name == "taylor":
        return imp.GroupTaylorImportance()
    if name in REGISTRY_IMPORTANCE:
        return RegistryImportance(name, batches_fn, seed)
    raise InputError(f"unknown channel importance {name!r}",
                     hint=f"choose one of {', '.join(TP_IMPORTANCE + REGISTRY_IMPORTANCE)}")


def taylor_gradients(model: nn.Module, batches: list, device) -> None:
    """Accumulate dL/dw of a few batches into ``.grad`` (what GroupTaylorImportance reads); eval mode."""
    model.zero_grad(set_to_none=True)
    with _eval_mode(model), torch.enable_grad():
        for x, y in batches:
            F.cross_entropy(model(x.to(device)).float(), y.to(device)).backward()


def build_pruner(model: nn.Module, example: torch.Tensor, importance, *, ignored: list[nn.Module],
                 global_pruning: bool, round_to: int | None, max_layer_ratio: float, resolution: int,
                 bn_reg: float | None = None):
    """A ``tp.pruner.MetaPruner`` (``BNScalePruner`` with ``bn_reg``) whose every ``step()`` removes
    another ``max_layer_ratio / resolution`` of the prunable channels (of each layer, or overall with
    ``global_pruning``), never more than ``max_layer_ratio`` of one layer."""
    tp = _tp()
    kw = dict(importance=importance, global_pruning=global_pruning, pruning_ratio=max_layer_ratio,
              max_pruning_ratio=max_layer_ratio, iterative_steps=resolution, ignored_layers=ignored,
              round_to=round_to)
    try:
        with _eval_mode(model), torch.enable_grad():
            if bn_reg is not None:
                return tp.pruner.BNScalePruner(model, example[:1], reg=bn_reg, **kw)
            return tp.pruner.MetaPruner(model, example[:1], **kw)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's tracer fails with many exception types
        raise InputError(f"Torch-Pruning could not trace the model's channel dependencies: "
                         f"{type(exc).__name__}: {exc}",
                         hint="channel pruning needs a forward of torch ops on tensors; add the layers it "
                              "cannot follow to `ignore:`, or prune this model unstructured (stage prune)") from exc


def _shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _LAYERS):
            out[name] = tuple(m.weight.shape[:2])
    return out


def check_forward(model: nn.Module, example: torch.Tensor, before: dict[str, tuple[int, int]]) -> None:
    """Run the pruned model once; when it fails, name the layer the forward stopped after and the
    layers whose channels changed (the usual cause: a view / reshape with a hard-coded channel count)."""
    done: list[str] = []
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: done.append(n))
             for n, m in model.named_modules() if n and not list(m.children())]
    try:
        with _eval_mode(model), torch.no_grad():
            model(example[:1])
        return
    except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises
        changed = {n: (before[n], s) for n, s in _shapes(model).items() if n in before and before[n] != s}
        last = done[-1] if done else "(none: the first layer)"
        shrunk = [n for n in done if n in changed]
        culprit = shrunk[-1] if shrunk else last
        ch = changed.get(culprit)
        raise InputError(
            f"after channel pruning the model's forward fails after layer {last!r}"
            + (f" (layer {culprit!r} went from {ch[0][0]} to {ch[1][0]} output channels)" if ch else "")
            + f": {type(exc).__name__}: {exc}",
            hint=f"the code after {culprit!r} probably hard-codes its channel count (e.g. x.view(n, 64, -1)); "
                 f"compute it from x.shape, or keep that layer with `ignore: [\"{culprit}\"]`") from exc
    finally:
        for h in hooks:
            h.remove()


def prune_until(pruner, model: nn.Module, example: torch.Tensor, holds: Callable[[int, int], bool], *,
                refresh: Callable[[int], None] | None = None) -> tuple[int, int, bool]:
    """``pruner.step()`` until ``holds(macs, params)`` or the pruner's last step; returns
    (MACs, params, held). Each increment is checked with :func:`check_forward`."""
    macs, params = count(model, example)
    while not holds(macs, params):
        if pruner.current_step >= pruner.iterative_steps:
            return macs, params, False
        if refresh is not None:
            refresh(pruner.current_step)
        before = _shapes(model)
        with _eval_mode(model):
            pruner.step()
        model.zero_grad(set_to_none=True)
        check_forward(model, example, before)
        macs, params = count(model, example)
    return macs, params, True

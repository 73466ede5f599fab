"""Size budgets: bytes of non-zero parameters of the exported model -> the sparsity to prune to.

``edgec bench`` counts a model's size from the exported ONNX file (:func:`edgec.bench.onnx_weight_stats`):
the non-zero parameters at the bit width they are stored at. A budget in bytes (``prune`` stage,
``target_bytes``) is turned into a sparsity of the prunable weights by predicting that count from the
model's structure, before any training:

* prunable weights (the ``prune`` stage's conv/linear layers): ``deployed_bits`` each (8: quantized
  weights are stored as int8, also when trained to fewer bits; 32: float export) -- the only part that
  pruning shrinks;
* the other conv/linear weights (first conv and classifier unless ``prune_first_last``): ``deployed_bits``;
* biases at 32 bits: every conv/linear that has one or that a BatchNorm is folded into (a BatchNorm
  directly after a conv/linear -- both QAT and the float ONNX export fold it);
* BatchNorms that cannot be folded (SubSpectralNorm's, RFN's): exported as stored, scale, bias, mean
  and variance at 32 bits each -- or, when the quantizing stage has ``norm_bits``, as an int8 scale and
  shift (:class:`edgec.quant.modules.QChannelAffine`), one byte each.

``kept = floor((target_bytes - fixed) * 8 / deployed_bits)`` prunable weights stay, so
``sparsity = 1 - kept / prunable``. Everything is counted as non-zero except the pruned weights, so the
exported model can only come out smaller (weights or biases that quantize to zero), never larger.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from edgec.errors import RecipeError

__all__ = ["BytePlan", "deployment_norm_bits", "plan_bytes"]

_FLOAT_BN_TENSORS = 4  # BatchNormalization stores scale, bias, running mean, running variance


@dataclass
class BytePlan:
    target_bytes: int
    deployed_bits: int
    norm_bits: int | None
    prunable_weights: int
    kept_weights: int
    target_sparsity: float
    fixed_bytes: dict[str, int] = field(default_factory=dict)  # what pruning does not shrink
    foldable_bn: int = 0
    unfoldable_bn: list[str] = field(default_factory=list)
    traced: bool = True

    @property
    def predicted_bytes(self) -> int:
        return sum(self.fixed_bytes.values()) + math.ceil(self.kept_weights * self.deployed_bits / 8)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "predicted_bytes": self.predicted_bytes}


def _folded_bn(model: nn.Module, example_input=None) -> tuple[set[str], set[str], bool]:
    """(conv/linear names a BatchNorm folds into, names of the BatchNorms folded, traced?)."""
    import copy

    from edgec.capture import capture
    from edgec.quant.prepare import _conv_bn

    try:  # the graph quantization will see (edgec.capture; concrete for the input's shape if need be)
        gm = capture(copy.deepcopy(model) if example_input is not None else model, example_input)
    except Exception:  # noqa: BLE001 - untraceable: count every BatchNorm as unfolded (an upper bound)
        return set(), set(), False
    layers, bns = set(), set()
    for node in gm.graph.nodes:
        if _conv_bn(gm, node):
            layers.add(str(node.args[0].target))
            bns.add(str(node.target))
    return layers, bns, True


def plan_bytes(model: nn.Module, *, target_bytes: int, deployed_bits: int = 8, norm_bits: int | None = None,
               include_first_last: bool = False, example_input=None) -> BytePlan:
    """The sparsity of the prunable weights that brings the exported model to ``target_bytes``.

    ``example_input`` (a batch shaped like the run's samples) lets a model whose forward branches on
    shapes be captured for that shape to see which BatchNorms fold.

    Raises :class:`RecipeError` when the parts pruning cannot shrink already exceed the budget.
    """
    from edgec import masks as P

    if deployed_bits not in (8, 32):
        raise RecipeError(f"deployed_bits must be 8 or 32, got {deployed_bits}")
    prunable = P.prunable_layers(model, include_first_last=include_first_last)
    prunable_ids = {id(m) for _, m in prunable}
    n_prunable = sum(m.weight.numel() for _, m in prunable)
    fold_into, folded_bns, traced = _folded_bn(model, example_input)

    other_w = bias = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if id(m) not in prunable_ids:
                other_w += m.weight.numel()
            if m.bias is not None or name in fold_into:
                bias += m.weight.shape[0]
    unfolded = [(n, m) for n, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in folded_bns]
    quantized = deployed_bits == 8
    if quantized and norm_bits is not None:
        norm_bytes = sum(2 * m.num_features for _, m in unfolded)  # int8 scale + int8 shift
    else:
        norm_bytes = sum(_FLOAT_BN_TENSORS * m.num_features * 4 for _, m in unfolded)
    fixed = {
        "other_weights": math.ceil(other_w * deployed_bits / 8),
        "biases": bias * 4,
        "unfolded_norms": norm_bytes,
    }
    room = target_bytes - sum(fixed.values())
    kept = (room * 8) // deployed_bits if room > 0 else 0
    if kept < 1:
        what = ", ".join(f"{k.replace('_', ' ')} {v:,} B" for k, v in fixed.items() if v)
        hint = ("quantize the unfolded norms too (norm_bits: 8 in the quantizing stage), " if unfolded and
                not (quantized and norm_bits is not None) else "")
        raise RecipeError(
            f"target_bytes={target_bytes:,} cannot be reached by pruning: the parts pruning does not shrink "
            f"already take {sum(fixed.values()):,} B ({what}) at deployed_bits={deployed_bits}",
            hint=f"raise target_bytes, {hint}prune the first and last layers too (prune_first_last: true), "
                 "or start from a narrower model")
    kept = min(kept, n_prunable)
    # +0.25: update_masks zeroes round(sparsity * n) weights; never one fewer than planned
    sparsity = 0.0 if kept >= n_prunable else min((n_prunable - kept + 0.25) / n_prunable, 1.0)
    return BytePlan(target_bytes=target_bytes, deployed_bits=deployed_bits,
                    norm_bits=norm_bits if quantized else None, prunable_weights=n_prunable, kept_weights=kept,
                    target_sparsity=sparsity, fixed_bytes=fixed, foldable_bn=len(folded_bns),
                    unfoldable_bn=[n for n, _ in unfolded], traced=traced)


def deployment_norm_bits(recipe: Any) -> int | None:
    """``norm_bits`` of the recipe's quantizing stage (None: no such stage, or norms left float)."""
    from edgec.recipe import QUANT_METHODS

    if recipe is None:
        return None
    for st in recipe.stages:
        if st.method in QUANT_METHODS:
            return getattr(st, "norm_bits", None)
    return None

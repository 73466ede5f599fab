"""Per-layer precision: which conv/linear layers a quantizing stage keeps float or puts at other bits.

A stage's ``layers:`` block (``edgec.stages.config.Quant``) maps module-name globs (``fnmatch``, where
``*`` also crosses dots: ``layer3.*`` matches ``layer3.0.conv1``) to ``float`` or ``{weight_bits,
act_bits}``. The first glob that matches a layer decides it and wins over ``first_layer_bits`` /
``last_layer_bits``; a glob that matches no conv/linear layer of the model is an error (a typo would
otherwise quantize the layer it meant to protect).

How :func:`edgec.quant.prepare.quantize_model` places quantization points around them:

* a ``float`` layer stays ``nn.Conv*`` / ``nn.Linear`` (the exporter writes a float Conv/Gemm); the
  tensor that feeds it gets no quantization point of its own (the output point of an integer layer
  before it stays: that kernel's output is integer), and its output, with whatever follows it in float
  (ReLU, adds, pooling), gets a point only where an integer layer reads it;
* a layer with ``act_bits`` sets the bits of the quantization points it touches (its input and its
  output): a point between layers with explicit act bits takes the largest; points next to no
  explicit layer keep the stage's bits (and first/last_layer_bits at the model's boundaries).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from edgec.errors import InputError

__all__ = ["LayerOverride", "LayerPrecision", "check_overrides", "check_recipe_layers", "conv_linear_names", "exact_glob",
           "layer_precision", "overrides_from_config", "resolve_precision"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerOverride:
    match: str  # a module-name glob
    keep_float: bool = False
    weight_bits: int | None = None
    act_bits: int | None = None


@dataclass(frozen=True)
class LayerPrecision:
    keep_float: bool
    weight_bits: int | None  # None when float
    act_bits: int | None  # the explicit act bits of an override (None: the stage's defaults place the points)
    source: str  # "default", "first_layer_bits", "last_layer_bits" or the glob that decided it


def exact_glob(name: str) -> str:
    """A ``layers:`` glob matching exactly ``name`` (fnmatch's special characters bracketed)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def overrides_from_config(layers: dict | None) -> tuple[LayerOverride, ...]:
    """The recipe's ``layers:`` mapping (glob -> "float" | LayerBits | dict) as LayerOverrides, in order."""
    out = []
    for glob, v in (layers or {}).items():
        if v == "float":
            out.append(LayerOverride(str(glob), keep_float=True))
            continue
        get = v.get if isinstance(v, dict) else (lambda k, _v=v: getattr(_v, k))
        out.append(LayerOverride(str(glob), weight_bits=get("weight_bits"), act_bits=get("act_bits")))
    return tuple(out)


def conv_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's conv/linear modules (quantized ones included), in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, _LAYERS)]


def check_overrides(overrides, names: list[str], *, where: str = "layers") -> None:
    """InputError naming every glob that matches none of ``names`` (listing a few of them)."""
    bad = [o.match for o in overrides if not any(fnmatch.fnmatchcase(n, o.match) for n in names)]
    if not bad:
        return
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    raise InputError(f"{where}: {', '.join(repr(b) for b in bad)} matches no conv/linear layer of the model "
                     f"(its layers: {shown or 'none'})",
                     hint="use the module names above (globs: '*' also crosses dots, e.g. 'layer3.*')")


def resolve_precision(names: list[str], spec) -> dict[str, LayerPrecision]:
    """Each layer's precision under ``spec`` (a QuantSpec): override, else first/last_layer_bits, else the stage's."""
    overrides = tuple(getattr(spec, "layers", ()) or ())
    check_overrides(overrides, names)
    out = {}
    for i, name in enumerate(names):
        bits, source = spec.weight_bits, "default"
        if i == 0 and spec.first_layer_bits:
            bits, source = spec.first_layer_bits, "first_layer_bits"
        if i == len(names) - 1 and spec.last_layer_bits:
            bits, source = spec.last_layer_bits, "last_layer_bits"
        o = next((o for o in overrides if fnmatch.fnmatchcase(name, o.match)), None)
        if o is None:
            out[name] = LayerPrecision(False, bits, None, source)
        elif o.keep_float:
            out[name] = LayerPrecision(True, None, None, o.match)
        else:
            out[name] = LayerPrecision(False, o.weight_bits or bits, o.act_bits, o.match)
    return out


def layer_precision(model: nn.Module) -> dict[str, dict]:
    """What a (quantization-simulating) model runs each conv/linear layer at: ``{"float": True}`` or
    ``{"weight_bits", "input_bits", "output_bits"}`` (the bits of the quantization points on its input
    and output; None where there is none). Empty for a model without quantized layers."""
    from edgec.quant.modules import QUANT_MODULES

    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    if not any(isinstance(m, QUANT_MODULES) for _, m in mods):
        return {}
    out = {}
    for name, m in mods:
        if not isinstance(m, QUANT_MODULES):
            out[name] = {"float": True}
            continue
        inq = getattr(m, "_input_quant", None)
        out[name] = {"float": False, "weight_bits": getattr(m, "weight_bits", None),
                     "input_bits": getattr(inq, "bits", None), "output_bits": getattr(m, "output_bits", None)}
    return out


def check_recipe_layers(recipe, model: nn.Module) -> None:
    """Every ``layers:`` glob of the recipe's stages matches a conv/linear layer of ``model`` (checked
    before any training; raises InputError naming the stage, the glob and some layer names)."""
    names = conv_linear_names(model)
    for i, st in enumerate(recipe.stages):
        overrides = overrides_from_config(getattr(st, "layers", None))
        if overrides:
            check_overrides(overrides, names, where=f"stages.{i}.layers")

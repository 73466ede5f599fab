"""Turn a float model into a quantization-simulating one (graph mode, torch.fx).

``quantize_model`` traces the model, folds BatchNorm into the preceding conv/linear (what is
trained is then exactly what is exported), swaps Conv1d/Conv2d/Linear for their quantized versions
and places per-tensor activation quantizers where ONNX Runtime expects Q/DQ pairs to fuse integer
kernels:

* after every graph input,
* after every conv/linear (after its BatchNorm when `fold_bn=False`), or after its ReLU when the
  ReLU is its only user,
* after every residual add (or its ReLU) and average pooling,
* after concat, a product of two tensors (squeeze-excite gating), sigmoid / hard-sigmoid /
  hard-swish when all their inputs are quantized already (integer kernels in ORT: QLinearConcat,
  QLinearMul, QLinearSigmoid; hard-swish/hard-sigmoid run in float between Q/DQ but feed them),
* and on every tensor that a quantized layer would otherwise read unquantized (one quantizer per
  source tensor, shared by all its users; shape-only ops such as max-pool, flatten, transpose,
  split and pad pass the grid through).

The graph only *places* quantizers: signedness, range and zero point of each come from the
calibration data (``calibrate`` -> :meth:`ActQuant.set_grid_from_stats`).

Layers with parameters that are neither conv nor Linear are *unsupported*: they are named, and
either left in float or reported as an error (``unsupported: float | error``) -- except BatchNorms
that cannot be folded into a conv (SubSpectralNorm's) when ``norm_bits`` is set: those become a
per-channel affine with an integer scale and shift (:class:`edgec.quant.modules.QChannelAffine`).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from edgec.errors import InputError
from edgec.quant.modules import QUANT_MODULES, ActQuant, QChannelAffine, QConv1d, QConv2d, QLinear
from edgec.quant.points import place_points
from edgec.quant.precision import LayerOverride, layer_precision, resolve_precision
from edgec.quant.graph import _BN, _CONV, _conv_bn, _module, _set_module
from edgec.quant.quantizers import Quantizer, make_quantizer
from edgec.targets import TargetProfile


@dataclass(frozen=True)
class QuantSpec:
    weight_bits: int = 8
    act_bits: int = 8
    weight_quantizer: str = "lsq"  # lsq | minmax | ema | percentile
    act_quantizer: str = "lsq"  # lsq | ema | minmax | percentile
    percentile: float = 99.99
    first_layer_bits: int | None = None  # weight & act bits of the first quantized layer
    last_layer_bits: int | None = None
    unsupported: str = "float"  # float | error
    lsq_init: str = "auto"  # auto | minmax | lsq  (see LSQQuantizer)
    # False: keep BatchNorm after its conv (activation quantizers then sit after the BN, where the
    # folded graph has them) for methods that fold it later themselves (PQK: one BN per path)
    fold_bn: bool = True
    # BatchNorms that cannot be folded into a conv (SubSpectralNorm's): None leaves them float;
    # 2-8 turns each into a QChannelAffine (scale and shift on a symmetric per-tensor grid of that many bits)
    norm_bits: int | None = None
    # per-layer precision by module-name glob, first match wins (edgec.quant.precision)
    layers: tuple[LayerOverride, ...] = ()


@dataclass
class QuantReport:
    quantized: list[str] = field(default_factory=list)
    left_float: list[str] = field(default_factory=list)  # unsupported layers left in float
    act_points: int = 0
    quantized_norms: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)  # conv/linear layers a `layers:` override keeps float
    precision: dict = field(default_factory=dict)  # edgec.quant.precision.layer_precision

    def as_dict(self) -> dict:
        return {"quantized_layers": self.quantized, "float_layers": self.left_float,
                "activation_quant_points": self.act_points, "quantized_norms": self.quantized_norms,
                "kept_float_layers": self.kept_float, "layer_precision": self.precision}
_NO_PARAM_OK = (nn.ReLU, nn.ReLU6, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.SiLU,
                nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.ConstantPad1d, nn.ConstantPad2d, nn.ZeroPad2d,
                nn.ChannelShuffle)


def trace(model: nn.Module, example_inputs=None) -> fx.GraphModule:
    """The model's fx graph (edgec.capture): symbolic when fx takes it, else captured for the shape of
    ``example_inputs`` (a batch shaped like the run's samples)."""
    from edgec.capture import capture

    return capture(model, example_inputs)


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every BatchNorm that directly follows a conv/linear (its only user) into it."""
    gm.eval()
    folded = gm.meta.setdefault("edgec_ref_names", {})
    for node in list(gm.graph.nodes):
        if not _conv_bn(gm, node):
            continue
        bn, prev = _module(gm, node), node.args[0]
        layer = _module(gm, prev)
        fused = fuse_conv_bn_eval(layer, bn) if isinstance(layer, _CONV) else fuse_linear_bn_eval(layer, bn)
        fused.weight = nn.Parameter(fused.weight.detach().clone())
        if fused.bias is not None:
            fused.bias = nn.Parameter(fused.bias.detach().clone())
        _set_module(gm, str(prev.target), fused)
        folded[prev.name] = node.name  # for per-layer fidelity: this conv's output is that BN's
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def decompose_hardswish(gm: fx.GraphModule) -> int:
    """Rewrite hard-swish as ``x * hardsigmoid(x)`` (what ONNX Runtime's optimizer does with the ONNX
    HardSwish op anyway), so the product gets its own quantization points and runs as QLinearMul, as in
    ORT's quantize_static; a HardSwish between Q/DQ ran as float HardSigmoid + float Mul."""
    names = gm.meta.setdefault("edgec_ref_names", {})
    done = 0
    for node in list(gm.graph.nodes):
        is_hs = (isinstance(_module(gm, node), nn.Hardswish)
                 or (node.op == "call_function" and node.target is F.hardswish))
        if not is_hs or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        with gm.graph.inserting_after(node):
            gate = gm.graph.call_function(F.hardsigmoid, (x,))
        with gm.graph.inserting_after(gate):
            prod = gm.graph.call_function(operator.mul, (x, gate))
        node.replace_all_uses_with(prod)
        gm.graph.erase_node(node)
        names[prod.name] = node.name  # per-layer fidelity: this product is the user's hard-swish
        done += 1
    if done:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return done


def unsupported_layers(model: nn.Module) -> list[str]:
    """Leaf modules holding parameters that quantization does not cover."""
    out = []
    for name, mod in model.named_modules():
        if any(True for _ in mod.children()):
            continue
        if isinstance(mod, (*_CONV, nn.Linear, *QUANT_MODULES, ActQuant, QChannelAffine, Quantizer)):
            continue
        if isinstance(mod, _NO_PARAM_OK) or not any(True for _ in mod.parameters(recurse=False)):
            continue
        out.append(f"{name} ({type(mod).__name__})")
    return out


def quantize_model(model: nn.Module, spec: QuantSpec, target: TargetProfile,
                   example_inputs=None) -> tuple[fx.GraphModule, QuantReport]:
    """Return a traced copy of ``model`` with BN folded and quantizers inserted.

    ``example_inputs``: a batch shaped like the run's samples; needed for models whose forward
    branches on shapes (captured for that shape, see edgec.capture)."""
    gm = trace(copy.deepcopy(model), example_inputs)
    if spec.fold_bn:
        gm = fold_batchnorm(gm)
    decompose_hardswish(gm)
    report = QuantReport()
    kept_bn = set() if spec.fold_bn else {str(n.target) for n in gm.graph.nodes if _conv_bn(gm, n)}
    if spec.norm_bits is not None:
        report.quantized_norms = _quantize_norms(gm, spec, kept_bn)
    bad = [b for b in unsupported_layers(gm) if b.split(" ")[0] not in kept_bn]
    if bad and spec.unsupported == "error":
        raise InputError("layers that QAT does not support: " + ", ".join(bad),
                         hint="set `unsupported: float` in the stage to leave them in floating point")
    report.left_float = bad

    layer_nodes = [n for n in gm.graph.nodes if isinstance(_module(gm, n), (*_CONV, nn.Linear))]
    precision = resolve_precision([str(n.target) for n in layer_nodes], spec)
    float_nodes, explicit = set(), {}
    for node in layer_nodes:
        layer, p = _module(gm, node), precision[str(node.target)]
        if p.keep_float:  # a `layers:` override: stays nn.Conv*/nn.Linear, a float Conv/Gemm in ONNX
            float_nodes.add(node)
            report.kept_float.append(str(node.target))
            continue
        qmin, qmax = target.weight_range(p.weight_bits)
        wq = make_quantizer(spec.weight_quantizer, qmin=qmin, qmax=qmax, per_channel=True,
                            channels=layer.weight.shape[0], percentile=spec.percentile,
                            lsq_init=spec.lsq_init)
        cls = QConv2d if isinstance(layer, nn.Conv2d) else QConv1d if isinstance(layer, nn.Conv1d) else QLinear
        q = cls.from_float(layer, wq)
        q.weight_bits = p.weight_bits
        _set_module(gm, str(node.target), q)
        report.quantized.append(str(node.target))
        if p.act_bits is not None:
            explicit[node] = p.act_bits

    place_points(gm, spec, target, report, layer_nodes=layer_nodes, float_nodes=float_nodes, explicit=explicit,
                 kept_bn=kept_bn)
    gm.graph.lint()
    gm.recompile()
    report.precision = layer_precision(gm)
    return gm, report


def _quantize_norms(gm: fx.GraphModule, spec: QuantSpec, kept_bn: set[str]) -> list[str]:
    """Replace every BatchNorm not folded into a conv (and not kept for a later fold) by a QChannelAffine."""
    if not 2 <= spec.norm_bits <= 8:
        raise InputError(f"norm_bits must be between 2 and 8, got {spec.norm_bits}")
    qmax = 2 ** (spec.norm_bits - 1) - 1
    done = []
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        name = str(node.target)
        if not isinstance(mod, _BN) or name in kept_bn or name in done:
            continue

        def quantizer():  # per_channel over one "channel" (a and b are (1, C)): one scale per tensor
            return make_quantizer(spec.weight_quantizer, qmin=-qmax, qmax=qmax, per_channel=True, channels=1,
                                  percentile=spec.percentile, lsq_init=spec.lsq_init)

        _set_module(gm, name, QChannelAffine.from_batchnorm(mod, quantizer(), quantizer()))
        done.append(name)
    gm.recompile()
    return done


def quantizers(model: nn.Module):
    """All quantizer modules of a model (weights and activations)."""
    from edgec.quant.quantizers import Quantizer

    return [m for m in model.modules() if isinstance(m, Quantizer)]


def set_calibrating(model: nn.Module, on: bool) -> None:
    for q in quantizers(model):
        q.calibrating = on


@torch.no_grad()
def calibrate(model: nn.Module, batches, device: torch.device | str = "cpu") -> int:
    """Run calibration batches through the model with all quantizers observing, not quantizing.

    Weight quantizers observe their weights once; activation quantizers observe every batch.
    Unfolded norms (:class:`QChannelAffine`) run in float during the batches while their input
    range per channel is recorded; channels whose input was constant are folded into the shift
    (:meth:`QChannelAffine.fold_constant_channels`) before the grids of ``a`` and ``b`` are set.
    Returns the number of samples seen.
    """
    model.eval()
    affines = [m for m in model.modules() if isinstance(m, QChannelAffine)]
    for mod in model.modules():
        if isinstance(mod, QUANT_MODULES):
            mod.wq.observe(mod.weight if getattr(mod, "weight_mask", None) is None else mod.weight * mod.weight_mask)
    ranges: dict[QChannelAffine, list] = {}

    def track(mod, args):
        x = args[0].detach().transpose(0, 1).reshape(mod.num_features, -1)
        lo, hi = x.amin(1), x.amax(1)
        if mod in ranges:
            lo, hi = torch.minimum(ranges[mod][0], lo), torch.maximum(ranges[mod][1], hi)
        ranges[mod] = [lo, hi]

    hooks = [m.register_forward_pre_hook(track) for m in affines]
    act_points = [m for m in model.modules() if isinstance(m, ActQuant)]
    act = [m.q for m in act_points]
    passing = act + [q for m in affines for q in (m.aq, m.bq)]
    for q in passing:
        q.calibrating = True
    seen = 0
    try:
        for x, _ in batches:
            model(x.to(device))
            seen += len(x)
    finally:
        for q in passing:
            q.calibrating = False
        for h in hooks:
            h.remove()
    for m in affines:
        if m in ranges:
            m.fold_constant_channels(*ranges[m])
        m.observe()
    for m in act_points:  # signedness, range and zero point from what was observed
        m.set_grid_from_stats()
    return seen

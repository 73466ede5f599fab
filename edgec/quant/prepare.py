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
from edgec.quant.modules import (QUANT_MODULES, ActQuant, QChannelAffine, QConv1d, QConv2d, QLinear,
                                 set_input_quantizer)
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


@dataclass
class QuantReport:
    quantized: list[str] = field(default_factory=list)
    left_float: list[str] = field(default_factory=list)
    act_points: int = 0
    quantized_norms: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"quantized_layers": self.quantized, "float_layers": self.left_float,
                "activation_quant_points": self.act_points, "quantized_norms": self.quantized_norms}


_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV = (nn.Conv1d, nn.Conv2d)
_NO_PARAM_OK = (nn.ReLU, nn.ReLU6, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.SiLU,
                nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.ConstantPad1d, nn.ConstantPad2d, nn.ZeroPad2d,
                nn.ChannelShuffle)
# shape-only ops: values stay on their input's grid (the exporter re-quantizes after them, exactly)
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
                 nn.ConstantPad1d, nn.ConstantPad2d, nn.ZeroPad2d, nn.ChannelShuffle)
_PASS_FUNCS = {torch.flatten, F.max_pool1d, F.max_pool2d, F.dropout, F.pad, torch.transpose, torch.reshape,
               torch.permute, torch.chunk, torch.split, torch.squeeze, torch.unsqueeze, operator.getitem,
               F.channel_shuffle, torch.channel_shuffle}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "transpose", "permute", "chunk", "split",
                 "squeeze", "unsqueeze"}


def trace(model: nn.Module, example_inputs=None) -> fx.GraphModule:
    """The model's fx graph (edgec.capture): symbolic when fx takes it, else captured for the shape of
    ``example_inputs`` (a batch shaped like the run's samples)."""
    from edgec.capture import capture

    return capture(model, example_inputs)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def _set_module(gm: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, new)


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


def _conv_bn(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A BatchNorm node that directly follows a conv/linear which it is the only user of."""
    if not isinstance(_module(gm, node), _BN) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    prev = node.args[0]
    return len(prev.users) == 1 and isinstance(_module(gm, prev), (*_CONV, nn.Linear))


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    """ReLU or ReLU6 right after a layer: the quantization point goes after it (its grid then starts at 0,
    and ORT folds the Relu/Clip into the integer kernel: ClipQuantFusion), not between layer and clip."""
    return (isinstance(_module(gm, n), (nn.ReLU, nn.ReLU6))
            or (n.op == "call_function" and n.target in (F.relu, torch.relu, F.relu6))
            or (n.op == "call_method" and n.target == "relu"))


def _is_shape_value(n) -> bool:
    """A traced Python number (from ``x.size()``, ``x.shape``, ``x.dim()`` and arithmetic on them)."""
    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_method" and n.target in ("size", "dim", "numel"):
        return True
    if n.op == "call_function" and n.target is getattr:
        return True
    if n.op == "call_function" and n.target in (operator.getitem, operator.add, operator.sub, operator.mul,
                                                operator.floordiv, operator.truediv):
        return any(_is_shape_value(a) for a in n.args)
    return False


def _two_tensors(n: fx.Node) -> bool:
    ops = n.args[:2]
    return (len(ops) == 2 and all(isinstance(a, fx.Node) for a in ops)
            and not any(_is_shape_value(a) for a in ops))


def _is_add(n: fx.Node) -> bool:
    is_add = ((n.op == "call_function" and n.target in (operator.add, torch.add))
              or (n.op == "call_method" and n.target in ("add", "__add__")))
    return is_add and _two_tensors(n)


def _is_avgpool(gm: fx.GraphModule, n: fx.Node) -> bool:
    return (isinstance(_module(gm, n), (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AvgPool1d))
            or (n.op == "call_function" and n.target in (F.adaptive_avg_pool2d, F.avg_pool2d,
                                                          F.adaptive_avg_pool1d, F.avg_pool1d)))


def _is_mul(n: fx.Node) -> bool:
    is_mul = ((n.op == "call_function" and n.target in (operator.mul, torch.mul))
              or (n.op == "call_method" and n.target in ("mul", "__mul__")))
    return is_mul and _two_tensors(n)


def _is_cat(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (torch.cat, torch.concat)


_GATES = (nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish)
_GATE_FUNCS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.hardswish}


def _is_integer_elementwise(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Ops whose output gets its own quantization point so ORT keeps the tensor in integer:
    Concat (QLinearConcat), a product of two tensors (QLinearMul, squeeze-excite gating), Sigmoid
    (QLinearSigmoid); HardSigmoid/HardSwish run in float between Q/DQ in ORT, but their outputs feed
    integer kernels (QLinearMul, QLinearConv) that need a grid of their own."""
    return (_is_cat(n) or _is_mul(n) or isinstance(_module(gm, n), _GATES)
            or (n.op == "call_function" and n.target in _GATE_FUNCS)
            or (n.op == "call_method" and n.target == "sigmoid"))


def _is_pass(gm: fx.GraphModule, n: fx.Node) -> bool:
    return (isinstance(_module(gm, n), _PASS_MODULES)
            or (n.op == "call_function" and n.target in _PASS_FUNCS)
            or (n.op == "call_method" and n.target in _PASS_METHODS))


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
    for i, node in enumerate(layer_nodes):
        layer = _module(gm, node)
        bits = spec.weight_bits
        if i == 0 and spec.first_layer_bits:
            bits = spec.first_layer_bits
        if i == len(layer_nodes) - 1 and spec.last_layer_bits:
            bits = spec.last_layer_bits
        qmin, qmax = target.weight_range(bits)
        wq = make_quantizer(spec.weight_quantizer, qmin=qmin, qmax=qmax, per_channel=True,
                            channels=layer.weight.shape[0], percentile=spec.percentile,
                            lsq_init=spec.lsq_init)
        cls = QConv2d if isinstance(layer, nn.Conv2d) else QConv1d if isinstance(layer, nn.Conv1d) else QLinear
        _set_module(gm, str(node.target), cls.from_float(layer, wq))
        report.quantized.append(str(node.target))

    last = layer_nodes[-1] if layer_nodes else None
    counter = iter(range(10**6))

    def act_bits_for(src: fx.Node) -> int:
        if src is last and spec.last_layer_bits:
            return spec.last_layer_bits
        return spec.act_bits

    def insert_after(src: fx.Node, bits: int) -> fx.Node:
        """One quantization point on ``src`` (all its users read it). Its grid -- signedness, range,
        zero point -- is decided by calibration data (ActQuant.set_grid_from_stats), not here; until
        then it holds the target's signed grid."""
        qmin, qmax = target.act_range(bits, True)
        aq = ActQuant(make_quantizer(spec.act_quantizer, qmin=qmin, qmax=qmax, per_channel=False,
                                     percentile=spec.percentile, lsq_init=spec.lsq_init),
                      container=target.act_container, zero_point=target.act_zero_point(True),
                      target=target, bits=bits)
        name = f"aq_{next(counter)}"
        gm.add_submodule(name, aq)
        with gm.graph.inserting_after(src):
            new = gm.graph.call_module(name, (src,))
        src.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        report.act_points += 1
        return new

    def quantized_source(n) -> fx.Node | None:
        """The ActQuant ``n`` reads through shape-only ops, if any."""
        while isinstance(n, fx.Node) and not isinstance(_module(gm, n), ActQuant) and _is_pass(gm, n):
            n = n.args[0]
        return n if isinstance(n, fx.Node) and isinstance(_module(gm, n), ActQuant) else None

    # 1. quantization points on the outputs of what runs as an integer kernel in ORT
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            insert_after(node, spec.first_layer_bits or spec.act_bits)
        elif isinstance(_module(gm, node), QUANT_MODULES) or _is_add(node):
            end = node
            users = list(end.users)
            if len(users) == 1 and str(users[0].target) in kept_bn:
                end = users[0]
                users = list(end.users)
            if len(users) == 1 and _is_relu(gm, users[0]):
                end = users[0]
            insert_after(end, act_bits_for(node))
        elif _is_avgpool(gm, node):
            insert_after(node, spec.act_bits)
        elif _is_integer_elementwise(gm, node):
            # only between integer tensors: concat / SE gating / gates whose every input is already on a
            # grid, so integer kernels are not separated by float islands. Elementwise math inside a
            # float region (a normalization's d*d, d*rsqrt(var)) stays float: quantizing it only adds
            # Q/DQ work and error (BC-ResNet's instance norm: 80.6% -> 63.9%, 3x slower)
            ins = _tensor_inputs(gm, node)
            if ins and all(quantized_source(a) is not None for a in ins):
                insert_after(node, spec.act_bits)

    # 2. every quantized layer reads a quantized tensor (through shape-only ops at most); a source
    #    without a quantization point gets one, shared by all its users
    for node in list(gm.graph.nodes):
        if not isinstance(_module(gm, node), QUANT_MODULES):
            continue
        if quantized_source(node.args[0]) is None:
            insert_after(node.args[0], spec.act_bits)
        set_input_quantizer(_module(gm, node), _module(gm, quantized_source(node.args[0])))

    gm.graph.lint()
    gm.recompile()
    return gm, report


def _tensor_inputs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The tensor operands of an op to quantize (each element of a torch.cat list)."""
    if isinstance(_module(gm, node), QUANT_MODULES):
        return [node.args[0]]
    if _is_cat(node):
        seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return [a for a in seq if isinstance(a, fx.Node)]
    if _is_add(node) or _is_mul(node):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []


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

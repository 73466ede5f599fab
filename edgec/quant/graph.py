"""fx-graph vocabulary of quantization: which node is a conv + BatchNorm, a ReLU, a residual add,
an average pool, an integer-capable elementwise op, a shape-only op (edgec.quant.prepare places
quantization points with these; edgec.quant.points walks the graph with them)."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgec.quant.modules import QUANT_MODULES

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV = (nn.Conv1d, nn.Conv2d)
# shape-only ops: values stay on their input's grid (the exporter re-quantizes after them, exactly)
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
                 nn.ConstantPad1d, nn.ConstantPad2d, nn.ZeroPad2d, nn.ChannelShuffle)
_PASS_FUNCS = {torch.flatten, F.max_pool1d, F.max_pool2d, F.dropout, F.pad, torch.transpose, torch.reshape,
               torch.permute, torch.chunk, torch.split, torch.squeeze, torch.unsqueeze, operator.getitem,
               F.channel_shuffle, torch.channel_shuffle}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "transpose", "permute", "chunk", "split",
                 "squeeze", "unsqueeze"}


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def _set_module(gm: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, new)


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

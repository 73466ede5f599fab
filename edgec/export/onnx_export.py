"""PyTorch -> ONNX with integer weights and Q/DQ activations.

The quantized model is exported through the legacy TorchScript exporter (it handles fake-quant
with a dynamic batch; see PLATFORM-NOTES.md): activation quantizers become
QuantizeLinear/DequantizeLinear pairs, and every quantized weight, which the simulation already
holds exactly on its integer grid, is rewritten afterwards as an int8 initializer with a
per-output-channel DequantizeLinear, so the file stores integers and ONNX Runtime can fuse
QLinearConv/QGemm. Conv/Gemm biases become int32 with scale = input scale x weight scale, as ORT's
integer kernels require.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgec.errors import ExportError
from edgec.quant.modules import QUANT_MODULES, ActQuant, QChannelAffine, QConv1d, QConv2d


@dataclass
class _WeightQ:
    scale: np.ndarray  # per output channel
    qmin: int
    qmax: int


class _AffineExport(nn.Module):
    """``x * a + b`` with ``a``/``b`` already on their grids, shaped (1, C, 1, ...) for the input rank so
    the exporter keeps them as named initializers (then rewritten as int8 + DequantizeLinear)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, rank: int):
        super().__init__()
        shape = (1, a.numel()) + (1,) * (rank - 2)
        self.a = nn.Parameter(a.detach().clone().reshape(shape))
        self.b = nn.Parameter(b.detach().clone().reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.a.dim():
            raise ExportError(f"a quantized norm was exported for rank-{self.a.dim()} inputs but got rank {x.dim()}")
        return x * self.a + self.b


@dataclass
class ExportResult:
    path: Path
    quantized: bool
    opset: int
    weight_tensors: dict[str, dict] = field(default_factory=dict)  # name -> {"bits", "qmin", "qmax"}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (*QUANT_MODULES, ActQuant)) for m in model.modules())


@torch.no_grad()
def _norm_ranks(model: nn.Module, input_shape: tuple[int, ...] | None) -> dict[str, int]:
    """The rank of the tensor each quantized norm sees, from one forward of a zero input (a model may
    reshape its input: a 1-D frame model that runs Conv2d on (N, 1, T, 1) has norms on rank 4)."""
    names = [n for n, mod in model.named_modules() if isinstance(mod, QChannelAffine)]
    if not names or input_shape is None:
        return {}
    probe = copy.deepcopy(model).eval().cpu()
    ranks: dict[str, int] = {}

    def hook(name):
        def record(mod, args):  # returns None: a pre-hook's return value would replace the inputs
            ranks.setdefault(name, args[0].dim())
        return record

    hooks = [probe.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        probe(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return ranks


def _export_copy(model: nn.Module, rank: int = 4,
                 input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, dict[str, _WeightQ]]:
    """Plain float modules holding the already-quantized weights; ActQuants switched to Q/DQ.

    Quantized norms get their scale and shift shaped (1, C, 1, ...) for the rank of the tensor they
    see, so they broadcast without a Reshape: measured with one forward when ``input_shape`` is given,
    else ``rank``.
    """
    ranks = _norm_ranks(model, input_shape)
    m = copy.deepcopy(model).eval().cpu()
    wq: dict[str, _WeightQ] = {}
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QChannelAffine):
            with torch.no_grad():
                plain = _AffineExport(mod.quantized_scale(), mod.quantized_shift(), ranks.get(name, rank))
            parent_name, _, attr = name.rpartition(".")
            setattr(m.get_submodule(parent_name) if parent_name else m, attr, plain)
            for tensor, q in (("a", mod.aq), ("b", mod.bq)):
                wq[f"{name}.{tensor}"] = _WeightQ(q.scale().detach().cpu().numpy().astype(np.float32).reshape(-1),
                                                   q.qmin, q.qmax)
        elif isinstance(mod, QUANT_MODULES):
            with torch.no_grad():
                w = mod.quantized_weight().detach().clone()
                b = mod.quantized_bias()
                scale = mod.wq.scale().detach().cpu().numpy().astype(np.float32).reshape(-1)
            if isinstance(mod, (QConv2d, QConv1d)):
                conv = nn.Conv2d if isinstance(mod, QConv2d) else nn.Conv1d
                plain = conv(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride,
                             padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                             bias=mod.bias is not None, padding_mode=mod.padding_mode)
            else:
                plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            plain.weight = nn.Parameter(w)
            if b is not None:
                plain.bias = nn.Parameter(b.detach().clone())
            parent_name, _, attr = name.rpartition(".")
            setattr(m.get_submodule(parent_name) if parent_name else m, attr, plain)
            wq[f"{name}.weight"] = _WeightQ(scale, mod.wq.qmin, mod.wq.qmax)
        elif isinstance(mod, ActQuant):
            mod.export_mode = True
    return m, wq


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    vals = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    vals[node.output[0]] = numpy_helper.to_array(a.t)
    return vals


def _unshare_initializers(g, wq: dict[str, _WeightQ]) -> None:
    """Give every Conv/Gemm its own weight and bias initializers.

    The exporter de-duplicates equal initializers (e.g. two all-zero folded biases), but each
    layer's integer bias has its own scale (input scale x weight scale), so they must not be shared.
    """
    import copy as _copy

    inits = {i.name: i for i in g.initializer}
    for node in list(g.node):  # the exporter writes a shared initializer as Identity(original)
        if node.op_type == "Identity" and node.input[0] in inits:
            clone = _copy.deepcopy(inits[node.input[0]])
            clone.name = node.output[0]
            g.initializer.append(clone)
            inits[clone.name] = clone
            g.node.remove(node)
    seen: set[str] = set()
    for k, node in enumerate(g.node):
        if node.op_type not in ("Conv", "Gemm"):
            continue
        for pos in (1, 2):
            if pos >= len(node.input) or node.input[pos] not in inits:
                continue
            name = node.input[pos]
            if name in seen:
                clone = _copy.deepcopy(inits[name])
                clone.name = f"{name}__{k}"
                g.initializer.append(clone)
                inits[clone.name] = clone
                if name in wq:
                    wq[clone.name] = wq[name]
                node.input[pos] = clone.name
            seen.add(node.input[pos])


def _integerize(model_proto, wq: dict[str, _WeightQ]) -> dict[str, dict]:
    """Replace float weight initializers by int8 + DequantizeLinear (and biases by int32 + DQ)."""
    from onnx import helper, numpy_helper

    g = model_proto.graph
    _unshare_initializers(g, wq)
    inits = {i.name: i for i in g.initializer}
    consts = _constants(g)
    producer = {o: n for n in g.node for o in n.output}
    new_nodes, info = [], {}
    missing = [n for n in wq if n not in inits]
    if missing:
        raise ExportError(f"exported graph lost the names of quantized weights: {missing[:5]}",
                          hint="report this model; export with a different --opset may help")
    done_affine: set[str] = set()
    for node in g.node:
        if node.op_type in ("Mul", "Add"):  # quantized norms: per-tensor int8 scale/shift
            for name in node.input:
                if name in wq and name in inits and name not in done_affine:
                    info[name] = _integerize_tensor(g, inits[name], wq[name], new_nodes)
                    done_affine.add(name)
            continue
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in wq:
            continue
        wname = node.input[1]
        q = wq[wname]
        w = numpy_helper.to_array(inits[wname]).astype(np.float32)
        axis = 0
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            axis = 1
        shape = [1] * w.ndim
        shape[axis] = -1
        wint = np.clip(np.round(w / q.scale.reshape(shape)), q.qmin, q.qmax)
        if np.abs(wint * q.scale.reshape(shape) - w).max() > 1e-4 * max(1.0, float(np.abs(w).max())):
            raise ExportError(f"weight {wname} is not on its quantization grid")
        g.initializer.remove(inits[wname])
        g.initializer.extend([
            numpy_helper.from_array(wint.astype(np.int8), wname + "_quantized"),
            numpy_helper.from_array(q.scale.astype(np.float32), wname + "_scale"),
            numpy_helper.from_array(np.zeros_like(q.scale, dtype=np.int8), wname + "_zero_point"),
        ])
        new_nodes.append(helper.make_node("DequantizeLinear", [wname + "_quantized", wname + "_scale",
                                                               wname + "_zero_point"], [wname],
                                          name=wname + "_DequantizeLinear", axis=axis))
        info[wname] = {"bits": int(np.ceil(np.log2(q.qmax - q.qmin + 1))), "qmin": q.qmin, "qmax": q.qmax,
                       "nonzero": int(np.count_nonzero(wint)), "numel": int(wint.size)}
        # bias -> int32 with scale x_scale * w_scale (what ORT's integer kernels consume)
        if len(node.input) >= 3 and node.input[2] in inits:
            dq_in = producer.get(node.input[0])
            if dq_in is None or dq_in.op_type != "DequantizeLinear" or dq_in.input[1] not in consts:
                continue
            x_scale = np.float32(np.asarray(consts[dq_in.input[1]]).reshape(()))
            bname = node.input[2]
            b = numpy_helper.to_array(inits[bname]).astype(np.float32)
            bscale = (x_scale * q.scale.astype(np.float32)).astype(np.float32)  # float32, as simulated
            # in float64: the int32 bounds are not float32 numbers (2**31 - 1 rounds up to 2**31 and wraps)
            bint = np.clip(np.round(b.astype(np.float64) / bscale.astype(np.float64)), -(2**31), 2**31 - 1
                           ).astype(np.int32)
            g.initializer.remove(inits[bname])
            g.initializer.extend([
                numpy_helper.from_array(bint, bname + "_quantized"),
                numpy_helper.from_array(bscale, bname + "_scale"),
                numpy_helper.from_array(np.zeros_like(bint), bname + "_zero_point"),
            ])
            new_nodes.append(helper.make_node("DequantizeLinear", [bname + "_quantized", bname + "_scale",
                                                                   bname + "_zero_point"], [bname],
                                              name=bname + "_DequantizeLinear", axis=0))
    # DQ nodes first keeps the graph topologically sorted (their inputs are initializers)
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return info


def _integerize_tensor(g, init, q: _WeightQ, new_nodes: list) -> dict:
    """One float initializer on a per-tensor grid -> int8 initializer + scalar DequantizeLinear."""
    from onnx import helper, numpy_helper

    name = init.name
    v = numpy_helper.to_array(init).astype(np.float32)
    scale = np.float32(q.scale.reshape(-1)[0])
    vint = np.clip(np.round(v / scale), q.qmin, q.qmax)
    if np.abs(vint * scale - v).max() > 1e-4 * max(1.0, float(np.abs(v).max())):
        raise ExportError(f"tensor {name} is not on its quantization grid")
    g.initializer.remove(init)
    g.initializer.extend([
        numpy_helper.from_array(vint.astype(np.int8), name + "_quantized"),
        numpy_helper.from_array(np.asarray(scale, dtype=np.float32), name + "_scale"),
        numpy_helper.from_array(np.asarray(0, dtype=np.int8), name + "_zero_point"),
    ])
    new_nodes.append(helper.make_node("DequantizeLinear", [name + "_quantized", name + "_scale", name + "_zero_point"],
                                      [name], name=name + "_DequantizeLinear"))
    return {"bits": int(np.ceil(np.log2(q.qmax - q.qmin + 1))), "qmin": q.qmin, "qmax": q.qmax,
            "nonzero": int(np.count_nonzero(vint)), "numel": int(vint.size)}


_SHAPE_OPS = ("Flatten", "Reshape", "MaxPool", "Squeeze", "Unsqueeze", "Transpose", "Split", "Pad")
# ops ORT runs as integer kernels when every input comes from a DequantizeLinear: which inputs
_INTEGER_INPUTS = {"Conv": (0,), "Gemm": (0,), "MatMul": (0,), "Add": (0, 1), "Mul": (0, 1),
                   "Concat": None, "Sigmoid": (0,), "AveragePool": (0,), "GlobalAveragePool": (0,)}


def _requantize_shape_ops(model_proto, quantized_weights=None) -> int:
    """Give an integer-capable op fed by DQ -> (Flatten|Reshape|MaxPool|Transpose|Split|Pad...) its
    own Q/DQ pair: one pair per source tensor, shared by all its consumers (SSA).

    Shape-only ops keep values on the same grid, so re-quantizing with the same scale and zero
    point is exact; it lets ONNX Runtime see DQ -> Gemm (QLinearConcat, ...) and fuse the integer
    kernel, and DQ -> MaxPool -> Q runs MaxPool on uint8.
    """
    from onnx import helper

    g = model_proto.graph
    producer = {o: n for n in g.node for o in n.output}
    done: dict[str, str] = {}  # source tensor -> its re-quantized name
    pairs: list[tuple[object, list]] = []  # (producer node, [Q, DQ]) to insert after it
    for node in list(g.node):
        if (quantized_weights is not None and node.op_type in ("Conv", "Gemm") and len(node.input) > 1
                and node.input[1] not in quantized_weights):
            continue  # a layer kept float (`layers:` override): its input is not re-quantized for it
        positions = _INTEGER_INPUTS.get(node.op_type, ())
        if positions is None:
            positions = range(len(node.input))
        for pos in positions:
            if pos >= len(node.input) or not node.input[pos]:
                continue
            name = node.input[pos]
            if name in done:
                node.input[pos] = done[name]
                continue
            src = producer.get(name)
            walk = src
            while walk is not None and walk.op_type in _SHAPE_OPS:
                walk = producer.get(walk.input[0])
            if src is None or src.op_type == "DequantizeLinear" or walk is None or walk.op_type != "DequantizeLinear":
                continue
            q_out, dq_out = name + "_requant_q", name + "_requant"
            qnode = helper.make_node("QuantizeLinear", [name, *walk.input[1:]], [q_out], name=q_out)
            dqnode = helper.make_node("DequantizeLinear", [q_out, *walk.input[1:]], [dq_out], name=dq_out)
            pairs.append((src, [qnode, dqnode]))
            done[name] = dq_out
            node.input[pos] = dq_out
    for src, new in pairs:
        idx = list(g.node).index(src) + 1
        for k, n in enumerate(new):
            g.node.insert(idx + k, n)
    return len(pairs)


def _keep_float_compute(proto) -> int:
    """A Conv/Gemm kept float (a `layers:` override; float weight initializer) that reads a DequantizeLinear
    gets a bound-less ``Clip`` (the identity) in front of it. Otherwise ONNX Runtime's WeightBiasQuantization
    (DQ -> Conv(float W) -> [Relu] -> Q) quantizes its weight itself, per tensor to the full int8 range, and
    runs it as QLinearConv: neither float nor the simulated model (and saturating on x86 without VNNI).
    Returns the number of layers so guarded."""
    from onnx import helper

    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    guards = []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        walk = producer.get(node.input[0])
        while walk is not None and walk.op_type in _SHAPE_OPS:  # ORT moves DQ forward through these
            walk = producer.get(walk.input[0])
        if walk is None or walk.op_type != "DequantizeLinear":
            continue
        out = node.input[0] + "_float"
        guards.append((node, helper.make_node("Clip", [node.input[0]], [out], name=f"{node.name}_keep_float")))
        node.input[0] = out
    for node, clip in guards:
        g.node.insert(list(g.node).index(node), clip)
    return len(guards)


def _shapes_from_quantized(proto) -> int:
    """A ``Shape`` that reads a DequantizeLinear output reads the quantized tensor instead (same shape),
    and a DequantizeLinear left without consumers is dropped: otherwise ORT dequantizes a whole tensor
    only to take its shape (channel shuffle's ``x.view(n, g, c // g, h, w)`` did this for every unit).
    Returns the number of DequantizeLinear nodes removed."""
    g = proto.graph
    dq_of = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    for n in g.node:
        if n.op_type == "Shape" and n.input[0] in dq_of:
            n.input[0] = dq_of[n.input[0]].input[0]
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    dead = [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]
    for n in dead:
        g.node.remove(n)
    return len(dead)


def _extra_forward_params(model: nn.Module) -> bool:
    """forward takes more than the input tensor (defaulted flags, scales, sizes)."""
    import inspect

    try:
        return len(inspect.signature(model.forward).parameters) > 1
    except (TypeError, ValueError):
        return False


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], out: Path, *, opset: int = 17) -> ExportResult:
    """Export ``model`` (float or quantization-simulating) to ``out``; written atomically."""
    import onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantized = is_quantized(model)
    if quantized and opset < 13:
        raise ExportError(f"per-channel Q/DQ needs opset >= 13, got {opset}", hint="use --opset 13 or newer")
    m, wq = (_export_copy(model, rank=1 + len(input_shape), input_shape=tuple(input_shape)) if quantized
             else (copy.deepcopy(model).eval().cpu(), {}))
    x = torch.zeros(1, *input_shape)
    if not quantized and _extra_forward_params(m):
        # forward(x, scale=1.0, ...): the TorchScript exporter turns a defaulted float/int argument into a
        # second graph input; export the captured graph instead (defaults concrete, the same module names)
        from edgec.capture import capture, example_from_shape

        from edgec.quant.prepare import fold_batchnorm

        # BatchNorms folded here, not by the exporter: the exporter's fold renames the weights (onnx::Conv_N)
        # and the captured graph's scopes lose the module path, so only the weight names ("blocks.0.conv.weight")
        # still tie the graph's convs to the user's layers (edgec profile, mixed precision)
        m = fold_batchnorm(capture(m, example_from_shape(tuple(input_shape))))
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (x,), tmp, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=True)
        proto = onnx.load(tmp)
        if quantized:
            _requantize_shape_ops(proto, quantized_weights=set(wq))
            info = _integerize(proto, wq)
            _keep_float_compute(proto)
            _shapes_from_quantized(proto)
        else:
            info = {}
        proto.producer_name = "edgec"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        os.replace(tmp, out)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportResult(out, quantized, opset, info)

"""Honest size of an exported ONNX model (docs/design.md, "size is counted honestly"): non-zero
parameters at their deployed bit width, the sparse-storage index overhead stated separately, read
from the file itself (the exporter's self-check and ``edgec bench`` both report it).

onnx is imported inside the function (lean ``edgec --help``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import InputError

__all__ = ["WeightResolver", "onnx_weight_stats"]

# ops whose weight inputs are counted: op -> (weight input indices, bias input index or None)
_WEIGHT_OPS: dict[str, tuple[tuple[int, ...], int | None]] = {
    "Conv": ((1,), 2),
    "ConvTranspose": ((1,), 2),
    "Gemm": ((0, 1), 2),
    "MatMul": ((0, 1), None),
}
# normalisations left in the graph (not folded into a conv, e.g. SubSpectralNorm's BatchNorm in a float
# export or a QAT run without norm_bits): their parameter inputs are counted as stored
_NORM_OPS: dict[str, tuple[int, ...]] = {
    "BatchNormalization": (1, 2, 3, 4),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
}
# elementwise ops whose inputs count when they are stored integer tensors (DequantizeLinear of an
# initializer): quantized norms (edgec.quant.modules.QChannelAffine -> DQ(int8) -> Mul / Add)
_QUANTIZED_ELEMENTWISE = ("Mul", "Add")
# single-input ops a weight may pass through on its way to the consumer (input 0 is the data)
_PASS_THROUGH = {"Identity", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Clip", "Flatten"}


# ------------------------------------------------------------------------------------ size counting
def _bits_of(data_type: int) -> int:
    from onnx import TensorProto as T

    bits = {
        T.INT8: 8, T.UINT8: 8, T.FLOAT: 32, T.FLOAT16: 16, T.BFLOAT16: 16, T.DOUBLE: 64,
        T.INT16: 16, T.UINT16: 16, T.INT32: 32, T.UINT32: 32, T.INT64: 64, T.UINT64: 64,
    }
    for name, b in (("INT4", 4), ("UINT4", 4), ("INT2", 2), ("UINT2", 2),
                    ("FLOAT8E4M3FN", 8), ("FLOAT8E5M2", 8), ("FLOAT4E2M1", 4)):
        if hasattr(T, name):
            bits[getattr(T, name)] = b
    return bits.get(data_type, 32)


def _axis(node) -> int:
    for attr in node.attribute:
        if attr.name == "axis":
            return attr.i
    return 1


def _broadcastable(q: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray | None:
    """A per-tensor or per-axis quantization parameter shaped to broadcast against ``like``."""
    q = np.asarray(q)
    if q.size == 1:
        return q.reshape(())
    if q.ndim == 1 and like.ndim >= 1 and q.shape[0] == like.shape[axis % like.ndim]:
        shape = [1] * like.ndim
        shape[axis % like.ndim] = q.shape[0]
        return q.reshape(shape)
    return None  # blocked quantization: not modelled


def _quantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear of a float tensor, minus the zero point (0 = a zero weight)."""
    s = _broadcastable(scale, w, axis)
    z = None if zp is None else _broadcastable(zp, w, axis)
    if s is None or (zp is not None and z is None):
        return w  # unmodelled layout: count the float zeros
    info = np.iinfo(zp.dtype) if zp is not None and np.issubdtype(zp.dtype, np.integer) \
        else np.iinfo(np.uint8)
    zf = 0.0 if z is None else z.astype(np.float64)
    q = np.clip(np.rint(w.astype(np.float64) / s.astype(np.float64)) + zf, info.min, info.max)
    return q - zf



class WeightResolver:
    """The stored tensor behind a weight input of one graph: an initializer (or Constant) feeding the
    input directly, through DequantizeLinear, QuantizeLinear->DequantizeLinear or layout ops
    (:data:`_PASS_THROUGH`). Shared by :func:`onnx_weight_stats` and :mod:`edgec.export.graph_stats`."""

    def __init__(self, graph):
        self.consts: dict[str, Any] = {t.name: t for t in graph.initializer}
        self.producer: dict[str, Any] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.consts[node.output[0]] = attr.t
        self._cache: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        if name not in self._cache:
            self._cache[name] = numpy_helper.to_array(self.consts[name])
        return self._cache[name]

    def resolve(self, name: str):
        """-> (tensor name, values, zero point or None, bits, qparam names) or None (not a stored weight)."""
        consts, producer = self.consts, self.producer
        seen = 0
        while name not in consts:
            node = producer.get(name)
            seen += 1
            if node is None or seen > 32:
                return None
            if node.op_type == "DequantizeLinear":
                return self._resolve_dq(node)
            if node.op_type in _PASS_THROUGH and node.input:
                name = node.input[0]
                continue
            return None
        return name, self.array(name), None, _bits_of(consts[name].data_type), []

    def _resolve_dq(self, node):
        consts, producer, array = self.consts, self.producer, self.array
        inputs = list(node.input) + ["", ""]
        x_name, s_name, zp_name = inputs[0], inputs[1], inputs[2]
        qparams = [n for n in (s_name, zp_name) if n and n in consts]
        src = x_name
        # walk back to the stored tensor: int8 initializer, or Q(float initializer) with a Clip
        for _ in range(32):
            if src in consts:
                break
            p = producer.get(src)
            if p is None:
                return None
            if p.op_type == "QuantizeLinear":
                # float weight quantized in the graph (not constant-folded): count the values
                # it quantizes to, zero where equal to the zero point
                q_in = list(p.input) + ["", ""]
                inner = self.resolve(q_in[0])
                if inner is None:
                    return None
                name_, vals, _, _, _ = inner
                q_zp = q_in[2]
                bits = _bits_of(consts[q_zp].data_type) if q_zp in consts else 8
                if q_in[1] in consts:
                    vals = _quantize(vals, array(q_in[1]),
                                     array(q_zp) if q_zp in consts else None, _axis(p))
                return name_, vals, None, bits, qparams
            if p.op_type in _PASS_THROUGH and p.input:
                src = p.input[0]
                continue
            return None
        if src not in consts:
            return None
        vals = array(src)
        zp = array(zp_name) if zp_name and zp_name in consts else None
        zp = _broadcastable(zp, vals, _axis(node)) if zp is not None and np.any(zp != 0) else None
        return src, vals, zp, _bits_of(consts[src].data_type), qparams


def onnx_weight_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Count the weights of Conv/ConvTranspose/Gemm/MatMul in an ONNX file at deployed bit width.

    A weight is an initializer (or Constant) feeding the op directly, through a DequantizeLinear
    (its stored int8/uint8/int4 tensor counts, with the zero point as "zero"), through
    QuantizeLinear->DequantizeLinear (counted at the quantized type's width), or through
    layout ops (Transpose/Reshape/Cast/Clip/...). Bias inputs (third input of Conv/ConvTranspose/
    Gemm) are counted at 32 bits. Parameters of normalisations left in the graph (BatchNormalization
    scale/bias/mean/variance, Instance-/LayerNormalization scale/bias) count as stored (float32), and
    so do the int8 scale/shift of quantized norms (DequantizeLinear of an initializer feeding Mul/Add).
    Each tensor is counted once even if shared.

    Returns ``params_nonzero``, ``params_total``, ``sparsity`` (1 - nonzero/total),
    ``weight_bytes_deployed`` (sum over tensors of ceil(nonzero * bits / 8); index overhead
    not included), ``sparse_index_bytes`` (a 1-bit-per-position bitmask, ceil(size/8), for each
    counted tensor that has any zero), ``qparam_bytes`` (scales/zero points of the counted
    DequantizeLinear nodes, stated separately) and ``bits`` ({tensor name: bits}).
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"model file {str(path)!r} does not exist",
            hint="pass the path of an exported .onnx file (edgec export RUN_DIR writes one)",
        )
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise InputError(f"could not read {str(path)!r} as an ONNX model: {e}") from e
    graph = model.graph

    weights = WeightResolver(graph)
    consts, producer, array, resolve = weights.consts, weights.producer, weights.array, weights.resolve

    counted: dict[str, dict[str, Any]] = {}
    qparam_names: set[str] = set()
    for node in graph.node:
        spec = _WEIGHT_OPS.get(node.op_type)
        if spec is not None:
            weight_idx, bias_idx = spec
            picks = [(i, None) for i in weight_idx if i < len(node.input) and node.input[i]]
            if bias_idx is not None and bias_idx < len(node.input) and node.input[bias_idx]:
                picks.append((bias_idx, 32))
        elif node.op_type in _NORM_OPS:
            picks = [(i, None) for i in _NORM_OPS[node.op_type] if i < len(node.input) and node.input[i]]
        elif node.op_type in _QUANTIZED_ELEMENTWISE:
            picks = [(i, None) for i, name in enumerate(node.input)
                     if (p := producer.get(name)) is not None and p.op_type == "DequantizeLinear"
                     and p.input and p.input[0] in consts]
        else:
            continue
        for idx, forced in picks:
            got = resolve(node.input[idx])
            if got is None:
                continue
            name, vals, zp, bits, qparams = got
            if forced is not None:
                bits = forced
            if name in counted:
                continue
            zero = zp if zp is not None else 0
            nonzero = int(np.count_nonzero(np.asarray(vals) != zero))
            counted[name] = {"size": int(np.asarray(vals).size), "nonzero": nonzero, "bits": bits}
            qparam_names.update(qparams)

    total = sum(t["size"] for t in counted.values())
    nonzero = sum(t["nonzero"] for t in counted.values())
    return {
        "params_nonzero": nonzero,
        "params_total": total,
        "sparsity": (1.0 - nonzero / total) if total else 0.0,
        "weight_bytes_deployed": sum(math.ceil(t["nonzero"] * t["bits"] / 8) for t in counted.values()),
        "sparse_index_bytes": sum(
            math.ceil(t["size"] / 8) for t in counted.values() if t["nonzero"] < t["size"]
        ),
        "qparam_bytes": sum(
            math.ceil(array(n).size * _bits_of(consts[n].data_type) / 8) for n in sorted(qparam_names)
        ),
        "bits": {name: t["bits"] for name, t in counted.items()},
    }

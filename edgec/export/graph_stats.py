"""Static analysis of an exported ONNX graph: MACs, parameters and peak activation memory.

Everything is read from the ONNX file (not from the PyTorch model), so the numbers describe the artifact
that is deployed: a folded BatchNorm, a pruned channel or a fused kernel shows up as the runtime sees it.
Output sizes come from ``onnx.shape_inference`` with the batch dimension set to ``batch``; weights are
found with the same walker as the size count (:class:`edgec.export.size.WeightResolver`: an initializer
feeding the op directly, through DequantizeLinear, Q->DQ or layout ops), so an int8 QDQ export and its
FP32 twin give the same MACs and parameters.

onnx / onnxruntime are imported inside the functions (lean ``edgec --help``).
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from edgec.errors import InputError
from edgec.export.size import WeightResolver, _bits_of

__all__ = ["SUMMARY_KEYS", "count_macs_params", "graph_summary", "peak_activation_memory"]

# the fields graph_summary adds to bench results and report rows
SUMMARY_KEYS = ("macs", "params", "peak_activation_bytes", "peak_activation_node", "peak_activation_graph",
                "peak_activation_bytes_onnx_graph")

# compute op -> (inputs that may be stored weights, bias input or None)
_COMPUTE: dict[str, tuple[tuple[int, ...], int | None]] = {
    "Conv": ((1,), 2), "ConvInteger": ((1,), None), "QLinearConv": ((3,), 8), "ConvTranspose": ((1,), 2),
    "Gemm": ((0, 1), 2), "QGemm": ((0, 3), 6),
    "MatMul": ((0, 1), None), "MatMulInteger": ((0, 1), None), "QLinearMatMul": ((0, 3), None),
}
_CONV_W = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}  # weight input (N, C/groups, k...)
_MATMUL_B = {"MatMul": 1, "MatMulInteger": 1, "QLinearMatMul": 3}
_GEMM_B = {"Gemm": 1, "QGemm": 3}


# --------------------------------------------------------------------------------- loading, shapes
def _load(model) -> Any:
    """A private copy of the ModelProto at ``model`` (a path or a ModelProto)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return copy.deepcopy(model)
    path = Path(model)
    if not path.is_file():
        raise InputError(f"model file {str(path)!r} does not exist",
                         hint="pass the path of an exported .onnx file (edgec export RUN_DIR writes one)")
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"could not read {str(path)!r} as an ONNX model: {e}") from e


def _with_batch(proto, batch: int):
    """Set a symbolic (or zero) leading dimension of every graph input and output to ``batch``; a fixed
    batch in the file is left as it is. Stale intermediate shapes are dropped for re-inference."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch must be an integer >= 1, got {batch!r}")
    inits = {i.name for i in proto.graph.initializer}
    for vi in [*proto.graph.input, *proto.graph.output]:
        if vi.name in inits or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and (dims[0].dim_param or dims[0].dim_value <= 0):
            dims[0].Clear()
            dims[0].dim_value = batch
    del proto.graph.value_info[:]
    return proto


def _dims(type_proto) -> tuple[int, ...] | None:
    """The declared/inferred shape, -1 for a dimension that is not a number; None without a shape."""
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)


def _known(shape):
    return None if shape is None or any(d < 0 for d in shape) else shape


def _shapes(proto) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """name -> (onnx elem type, shape or None) for every tensor shape inference could size."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 -- an op onnx cannot infer: keep what the file declares
        inferred = proto
    g = inferred.graph
    out = {t.name: (t.data_type, tuple(int(d) for d in t.dims)) for t in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type") and vi.name not in out:
            out[vi.name] = (vi.type.tensor_type.elem_type, _dims(vi.type))
    return out


def _tensor_bytes(elem_type: int, shape: tuple[int, ...] | None) -> int | None:
    from onnx import TensorProto

    if shape is None or any(d < 0 for d in shape) or elem_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    bits = 8 if elem_type == TensorProto.BOOL else _bits_of(elem_type)
    return math.ceil(math.prod(shape) * bits / 8)


# ------------------------------------------------------------------------------------ MACs, params
def _attr(node, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _node_macs(node, shapes) -> int | None:
    """Multiply-accumulates of one compute node (bias additions not counted), None if a shape is unknown."""
    def shape(i: int):
        return _known(shapes.get(node.input[i], (0, None))[1]) if i < len(node.input) and node.input[i] else None

    y = _known(shapes.get(node.output[0], (0, None))[1]) if node.output else None
    op = node.op_type
    if op in _CONV_W:  # every output element: C_in/groups x prod(kernel) MACs
        w = shape(_CONV_W[op])
        return None if w is None or y is None else math.prod(y) * math.prod(w[1:])
    if op == "ConvTranspose":  # every input element scatters into C_out/groups x prod(kernel) outputs
        x, w = shape(0), shape(1)
        return None if x is None or w is None else math.prod(x) * math.prod(w[1:])
    if op in _GEMM_B:
        a, b = shape(0), shape(_GEMM_B[op])
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if _attr(node, "transA") else a
        n = b[0] if _attr(node, "transB") else b[1]
        return m * k * n
    if op in _MATMUL_B:
        a, b = shape(0), shape(_MATMUL_B[op])
        if a is None or b is None:
            return None
        if y is None:  # numpy matmul broadcasting
            import numpy as np

            y = np.matmul(np.empty(a, dtype=np.int8), np.empty(b, dtype=np.int8)).shape
        return math.prod(y) * a[-1]
    return None


def _macs_params(proto, shapes=None) -> dict[str, Any]:
    shapes = _shapes(proto) if shapes is None else shapes
    weights = WeightResolver(proto.graph)
    rows, seen, unknown = [], {}, []
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in proto.graph.node:
        spec = _COMPUTE.get(node.op_type)
        if spec is None:
            continue
        picks, bias = spec
        picks = [*picks, *([bias] if bias is not None else [])]
        tensors = {}
        for i in picks:
            if i < len(node.input) and node.input[i] and (got := weights.resolve(node.input[i])) is not None:
                tensors[got[0]] = int(got[1].size)
        users = consumers.get(node.output[0], []) if node.op_type in _MATMUL_B else []
        if len(users) == 1 and users[0].op_type == "Add":  # a Linear on N-D input: MatMul + Add(bias)
            for b in users[0].input:
                if b != node.output[0] and (got := weights.resolve(b)) is not None:
                    tensors[got[0]] = int(got[1].size)
        macs = _node_macs(node, shapes)
        name = node.name or node.output[0]
        if macs is None:
            unknown.append(name)
        rows.append({"name": name, "op": node.op_type, "macs": macs, "params": sum(tensors.values()),
                     "weights": sorted(tensors)})
        seen.update(tensors)
    return {"macs": sum(r["macs"] or 0 for r in rows), "params": sum(seen.values()), "nodes": rows,
            "unknown_macs": unknown}


def count_macs_params(onnx_path_or_proto, batch: int = 1) -> dict[str, Any]:
    """MACs and parameters of an ONNX graph, counted on the graph itself.

    MACs (multiply-accumulates, at ``batch``) of Conv (any groups: depthwise, grouped; 1-D, 2-D, 3-D),
    ConvInteger, QLinearConv, ConvTranspose, Gemm, QGemm, MatMul, MatMulInteger and QLinearMatMul:
    output elements x (C_in / groups x kernel elements) for a conv, M x K x N for a product. Bias
    additions, activations, normalisations left in the graph, pooling, elementwise ops and the
    Q/DQ arithmetic are not counted (the convention of Torch-Pruning's and most papers' MAC counts).

    Parameters: elements of the stored weight and bias tensors of those compute nodes (a MatMul's bias
    is the stored input of the Add that is its only consumer, as a Linear on N-D input exports; an
    initializer or Constant reached directly, through DequantizeLinear, QuantizeLinear->DequantizeLinear
    or layout ops), each tensor once even if shared, zeros included (``onnx_weight_stats`` gives the
    non-zero count). Not counted: a BatchNorm/LayerNorm left in the graph, quantization scales and
    zero points, shape constants. A BatchNorm folded into its conv by the exporter is therefore only
    the conv's bias here, while a PyTorch count adds the BatchNorm's 2 x C (or 4 x C) parameters.

    Returns ``{"macs", "params", "batch", "nodes": [{"name", "op", "macs", "params", "weights"}],
    "unknown_macs": [node names whose shapes inference could not size (their MACs are left out)]}``.
    """
    proto = _with_batch(_load(onnx_path_or_proto), batch)
    return {**_macs_params(proto), "batch": batch}


# ------------------------------------------------------------------------------ activation memory
def _constant_tensors(graph) -> set[str]:
    """Initializers, Constant outputs and everything computed from them alone (e.g. DequantizeLinear
    of an int8 weight): weights, not activations."""
    const = {i.name for i in graph.initializer}
    for node in graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (ins and all(i in const for i in ins)):
            const.update(o for o in node.output if o)
    return const


def _walk(graph, shapes, include_inputs: bool = True) -> dict[str, Any]:
    """Tensor lifetimes over the node order: a tensor lives from its producer (graph inputs: from the
    start) to its last consumer (graph outputs: to the end); peak = max over nodes of the live bytes
    while the node runs (its inputs and outputs both held)."""
    const = _constant_tensors(graph)
    nodes = list(graph.node)
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name and name not in const:
                last[name] = i
    for o in graph.output:
        last[o.name] = len(nodes)
    sizes: dict[str, int] = {}
    unsized: list[str] = []

    def size(name: str) -> int:
        if name not in sizes:
            et, shape = shapes.get(name, (0, None))
            b = _tensor_bytes(et, shape)
            if b is None:
                unsized.append(name)
            sizes[name] = b or 0
        return sizes[name]

    inputs = {vi.name: size(vi.name) for vi in graph.input if vi.name not in const}
    input_bytes = sum(inputs.values())
    live = dict(inputs) if include_inputs else {}
    peak, peak_at, peak_live = sum(live.values()), None, dict(live)
    for i, node in enumerate(nodes):
        for name in node.output:
            if name and name not in const:
                live[name] = size(name)
        now = sum(live.values())
        if now > peak or peak_at is None:
            peak, peak_at, peak_live = now, node, dict(live)
        for name in [n for n in live if last.get(n, i) <= i]:
            del live[name]

    def describe(name: str) -> dict:
        et, shape = shapes.get(name, (0, None))
        from onnx import helper

        return {"name": name, "bytes": sizes.get(name, 0), "shape": list(shape) if shape else None,
                "dtype": helper.tensor_dtype_to_string(et).replace("TensorProto.", "").lower() if et else None}

    return {"peak_bytes": peak,
            "peak_node": None if peak_at is None else (peak_at.name or peak_at.output[0]),
            "peak_op": None if peak_at is None else peak_at.op_type,
            "live_at_peak": sorted((describe(n) for n in peak_live), key=lambda d: -d["bytes"]),
            "input_bytes": input_bytes, "unsized": sorted(set(unsized)),
            "constant_derived_bytes": sum(_tensor_bytes(*shapes[n]) or 0 for n in const
                                          if n in shapes and n not in {t.name for t in graph.initializer}),
            "weight_bytes": sum(_tensor_bytes(t.data_type, tuple(t.dims)) or 0 for t in graph.initializer),
            "subgraphs_not_modelled": sum(1 for n in nodes for a in n.attribute if a.g.node or a.graphs)}


def _ort_optimized(proto):
    """The graph ONNX Runtime runs on CPU after its hardware-independent optimizations (level EXTENDED:
    constant folding, Conv+activation fusion, QDQ -> QLinearConv/QGemm/... integer kernels), in ORT's
    node order."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgec-graph-") as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "opt.onnx")
        onnx.save(proto, src)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = dst
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        return onnx.load(dst)


def peak_activation_memory(onnx_path_or_proto, batch: int = 1, *, ort_optimized: bool = False,
                           include_inputs: bool = True) -> dict[str, Any]:
    """Static estimate of the peak working (activation) memory of one inference at ``batch``.

    The nodes are walked in the graph's order (a topological order; ONNX Runtime's default sequential
    executor runs the nodes in a topological order too). Each tensor is alive from the node that
    produces it (graph inputs: from the start) to its last consumer (graph outputs: to the end) and
    takes ``elements x dtype size`` bytes at its inferred shape (float32 = 4, int8/uint8/bool = 1).
    While a node runs its inputs and outputs are all held; the peak is the largest live sum.
    ``include_inputs=False`` leaves the graph inputs out (a buffer the caller owns).
    Initializers and tensors computed from them alone (Constant, DequantizeLinear of a stored weight)
    are weights, not activations: ``weight_bytes`` (initializers as stored) and
    ``constant_derived_bytes`` are reported separately.

    ``ort_optimized=True`` walks the graph ONNX Runtime actually runs on CPU (its EXTENDED-level
    optimizations: Conv+Relu fusion, and for a QDQ int8 export the QLinearConv/QGemm kernels on uint8
    tensors), with shapes from the unoptimized graph's inference where names are kept. The graph as
    written holds a float copy of every Q/DQ'd tensor, so it overstates an int8 model; the optimized
    graph is what the deployed model needs in ORT. The ALL-level NCHWc layout transforms are not modelled.

    Not modelled (so the estimate is not what a process measures): ORT's in-place reuse of a dead input
    buffer (lower), kernel scratch such as im2col buffers, the arena's rounding and fragmentation, and
    the session's own allocations (higher); If/Loop subgraphs (counted in ``subgraphs_not_modelled``).
    Checked against ORT where its memory can be read: with the CPU arena and memory pattern off and
    optimizations off, the peak RSS of a fresh process's first run (VmHWM reset before it) exceeds the
    estimate without inputs by 0.1-0.4 MiB on 16 and 24 MiB graphs (tests/test_graph_stats.py). With
    ORT's defaults (arena on) there is no trustworthy reading: RSS follows the arena's chunk growth
    (33.6 MiB for the 24 MiB graph), onnxruntime 1.31's Python API exposes no arena statistics, and
    its profiler reports per-node output sizes, not a peak.

    Returns ``peak_bytes``, ``peak_node``/``peak_op`` (the first node where the peak is reached),
    ``live_at_peak`` ([{name, bytes, shape, dtype}], largest first), ``input_bytes``, ``weight_bytes``,
    ``constant_derived_bytes``, ``unsized`` (tensors inference could not size, counted as 0),
    ``graph`` ("onnx" or "ort-extended"), ``batch``.
    """
    proto = _with_batch(_load(onnx_path_or_proto), batch)
    return _peak(proto, _shapes(proto), batch, ort_optimized, include_inputs)


def _peak(proto, shapes, batch: int, ort_optimized: bool, include_inputs: bool = True) -> dict[str, Any]:
    graph_kind = "onnx"
    if ort_optimized:
        opt = _ort_optimized(proto)
        shapes = {**_shapes(opt), **shapes}
        proto, graph_kind = opt, "ort-extended"
    return {**_walk(proto.graph, shapes, include_inputs), "graph": graph_kind, "batch": batch}


def graph_summary(onnx_path, batch: int = 1) -> dict[str, Any]:
    """The bench/report fields: ``macs``, ``params`` (count_macs_params), ``peak_activation_bytes`` (on
    the graph ORT runs, :func:`peak_activation_memory` with ``ort_optimized=True``),
    ``peak_activation_bytes_onnx_graph`` (on the graph as written) and ``peak_activation_node``."""
    proto = _with_batch(_load(onnx_path), batch)
    shapes = _shapes(proto)
    counts = _macs_params(proto, shapes)
    written = _peak(proto, shapes, batch, False)
    try:
        run = _peak(proto, shapes, batch, True)
    except Exception:  # noqa: BLE001 -- ORT cannot load it here: the graph as written is all we have
        run = written
    return {"macs": counts["macs"], "params": counts["params"], "peak_activation_bytes": run["peak_bytes"],
            "peak_activation_node": run["peak_node"], "peak_activation_graph": run["graph"],
            "peak_activation_bytes_onnx_graph": written["peak_bytes"]}

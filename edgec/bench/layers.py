"""Which source-model layer each node of an exported ONNX graph, and each kernel ORT profiled, belongs to.

The rule (``edgec profile``; the same LAYER key for the FP32 and the quantized export of one model):

1. **Layer nodes** are the ops with weights (Conv, ConvTranspose, Gemm, MatMul, the normalisations,
   RNNs). Their key is the module path: from the weight's tensor name when it has one
   (``layer1.0.conv1.weight`` -> ``layer1.0.conv1``; edgec's Q/DQ export keeps the parameter names,
   also where the quantized graph's node names are flattened to ``/conv1_1/Conv``), else from the node
   name's scopes, which the TorchScript exporter writes as unqualified module names
   (``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``), else the node name.
2. **Epilogue ops** (elementwise activations, Add/Mul/Sub/Div: the work ORT fuses into a Conv or
   QLinearConv, e.g. a residual Add + Relu) go to the nearest layer upstream: among the producers of
   their inputs the one latest in the graph, followed upstream through non-layer nodes.
3. **Left-over Q/DQ** nodes (not fused by ORT): a QuantizeLinear is charged to the nearest layer
   downstream (its integer consumer needs it), a DequantizeLinear to the nearest layer upstream (its
   integer producer needs it). At the graph's boundary they get rows of their own:
   ``(input)/QuantizeLinear`` (no layer upstream) and ``(output)/DequantizeLinear`` (no layer
   downstream). Weight-side nodes (all inputs constant, e.g. a weight DequantizeLinear ORT did not
   fold) go to the layer that consumes them.
4. **Other ops** (pooling, Flatten/Reshape/Transpose, Concat, Softmax, ...) get a row of their own,
   ``<upstream layer>/<op>`` (``layer1.1.conv2/GlobalAveragePool``; ``(input)/<op>`` before the first
   layer): the same key in both exports, whatever the quantized graph's node names are.

A profiled kernel is found in the source graph by its name (ORT's ``_token_<n>`` and ``_nchwc`` suffixes
removed) as a node name, else as a tensor name (ORT names some fused nodes after their output, e.g.
Conv+Relu as ``/relu1/Relu_output_0_nchwc``: its producer). When that node's op is not the kernel's
(``QLinearConv`` -> Conv, ``QGemm`` -> Gemm, ``NhwcMaxPool`` -> MaxPool, ...), the nearest node
upstream with that op is taken (the Conv of ``/relu1/Relu``). Kernels ORT inserted itself (layout
Transposes, NCHWc ``ReorderInput``/``ReorderOutput``) match nothing: rows ``(ort)/<op>``.
"""
from __future__ import annotations

import re
from collections import deque

__all__ = ["LayerGraph", "canonical_op", "scope_path"]

LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
             "LayerNormalization", "GroupNormalization", "LSTM", "GRU", "RNN"}
EPILOGUE_OPS = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu", "Gelu",
                "PRelu", "Softplus", "Mish", "Add", "Sub", "Mul", "Div", "Sum"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_KERNELS = {"ConvInteger": "Conv", "QGemm": "Gemm", "MatMulInteger": "MatMul", "MatMulIntegerToFloat": "MatMul",
            "DynamicQuantizeMatMul": "MatMul", "QAttention": "Attention"}
_PARAM = re.compile(r"^(.+?)\.(weight|bias|running_mean|running_var)(_quantized|_scale|_zero_point)?$")
_ORT_SUFFIX = re.compile(r"(_token_\d+|_nchwc)$")


def canonical_op(kernel: str) -> str:
    """The ONNX op a kernel ORT ran stands for: QLinearConv -> Conv, NhwcMaxPool -> MaxPool, FusedGemm -> Gemm."""
    if kernel in _KERNELS:
        return _KERNELS[kernel]
    for prefix in ("QLinear", "Nhwc", "Nchwc", "Fused"):
        if kernel.startswith(prefix) and len(kernel) > len(prefix):
            return kernel[len(prefix):]
    return kernel


def scope_path(node_name: str) -> str | None:
    """``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``: the TorchScript exporter's scopes are
    unqualified module names that keep numeric atoms with their parent (``layer1.0``)."""
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.split("/")[1:-1] if p]
    q: list[str] = []
    for part in parts:
        atoms = part.split(".")
        last = max((i for i, a in enumerate(q) if not a.isnumeric()), default=len(q))
        tail = q[last:]
        if tail and atoms[:len(tail)] == tail and len(atoms) > len(tail):
            q += atoms[len(tail):]
        else:
            q += atoms
    return ".".join(q) or None


class LayerGraph:
    """The source graph of one exported ONNX model and its nodes' LAYER keys (the module docstring's rule)."""

    def __init__(self, model):
        g = model.graph
        self.nodes = list(g.node)
        self.by_name = {n.name: i for i, n in enumerate(self.nodes) if n.name}
        self.producer = {t: i for i, n in enumerate(self.nodes) for t in n.output if t}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for t in n.input:
                self.consumers.setdefault(t, []).append(i)
        self.outputs = {o.name for o in g.output}
        self.static = {t.name for t in g.initializer}
        self.static_nodes: set[int] = set()
        for i, n in enumerate(self.nodes):  # constant-foldable: all inputs constant (weight Q/DQ, Constant)
            if all(t == "" or t in self.static for t in n.input):
                self.static_nodes.add(i)
                self.static.update(t for t in n.output if t)
        self._up: list[int | None] = []
        for i in range(len(self.nodes)):  # graph order is topological: producers come first
            self._up.append(self._upstream(i))
        self.keys = [self._key(i) for i in range(len(self.nodes))]

    # ----------------------------------------------------------------------------- structure
    def is_layer(self, i: int) -> bool:
        return self.nodes[i].op_type in LAYER_OPS and i not in self.static_nodes

    def _upstream(self, i: int) -> int | None:
        """The nearest layer node upstream of node ``i`` (latest in graph order); ``_up`` filled for < i."""
        best = None
        for t in self.nodes[i].input:
            j = self.producer.get(t)
            if j is None or t in self.static:
                continue
            cand = j if self.is_layer(j) else self._up[j]
            if cand is not None and (best is None or cand > best):
                best = cand
        return best

    def downstream(self, i: int) -> int | None:
        """The nearest layer node downstream of node ``i`` (earliest in graph order), None if none."""
        seen, todo, found = {i}, deque([i]), []
        while todo:
            for t in self.nodes[todo.popleft()].output:
                for j in self.consumers.get(t, ()):
                    if j in seen:
                        continue
                    seen.add(j)
                    (found if self.is_layer(j) else todo).append(j)
        return min(found) if found else None

    def layer_name(self, i: int) -> str:
        """Module path of layer node ``i``: its weight's name, else its scopes, else the node name."""
        n = self.nodes[i]
        for t in n.input[1:]:
            for name in (t, *(self.nodes[self.producer[t]].input[:1] if t in self.producer else ())):
                m = _PARAM.match(name)
                if m and name in self.static:
                    return m.group(1)
        return scope_path(n.name) or n.name or f"{n.op_type}_{i}"

    def _key(self, i: int) -> tuple[str, str]:
        """(LAYER key, kind) of node ``i``; kind: layer | op | boundary."""
        n, up = self.nodes[i], self._up[i]
        if self.is_layer(i):
            return self.layer_name(i), "layer"
        if i in self.static_nodes:
            down = self.downstream(i)
            return (self.layer_name(down), "layer") if down is not None else (f"(const)/{n.op_type}", "op")
        if n.op_type in QDQ_OPS:
            down = self.downstream(i)
            if up is None:
                return f"(input)/{n.op_type}", "boundary"
            if down is None:
                return f"(output)/{n.op_type}", "boundary"
            return self.layer_name(down if n.op_type == "QuantizeLinear" else up), "layer"
        if up is None:
            return f"(input)/{n.op_type}", "op"
        if n.op_type in EPILOGUE_OPS:
            return self.layer_name(up), "layer"
        return f"{self.layer_name(up)}/{n.op_type}", "op"

    # ------------------------------------------------------------------------------ kernels
    def find(self, kernel_name: str, kernel_op: str) -> int | None:
        """The source node a profiled kernel stands for (module docstring), None for ORT's own nodes."""
        name, anchor = kernel_name, None
        while anchor is None:
            if name in self.by_name:
                anchor = self.by_name[name]
            elif name in self.producer:
                anchor = self.producer[name]
            else:
                stripped = _ORT_SUFFIX.sub("", name)
                if stripped == name:
                    return None
                name = stripped
        want = canonical_op(kernel_op)
        if self.nodes[anchor].op_type == want:
            return anchor
        seen, todo = {anchor}, deque([(anchor, 0)])
        while todo:  # nearest upstream node with the kernel's op (ORT named the fused node after its output)
            j, depth = todo.popleft()
            if self.nodes[j].op_type == want:
                return j
            for t in self.nodes[j].input:
                k = self.producer.get(t)
                if k is not None and k not in seen and t not in self.static and depth < 8:
                    seen.add(k)
                    todo.append((k, depth + 1))
        return anchor

    def kernel_key(self, kernel_name: str, kernel_op: str) -> tuple[str, str]:
        """(LAYER key, kind) of a profiled kernel; ``(ort)/<op>``, kind ``runtime``, for ORT's own nodes."""
        i = self.find(kernel_name, kernel_op)
        return (f"(ort)/{kernel_op}", "runtime") if i is None else self.keys[i]

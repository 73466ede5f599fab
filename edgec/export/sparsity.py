"""N:M semi-structured sparsity verified on an exported ONNX file (the weights the runtime gets).

The convention is edgec.masks' (NVIDIA's): "N:M" = at most N non-zeros in every group of M
consecutive weights along the input channels; a Conv weight [O, I/g, *k] is read as [O, *k, I/g],
a Gemm/MatMul weight as [out, in]. Weights are found as edgec.export.size finds them: an
initializer, a DequantizeLinear of a stored int8 tensor (zero = its zero point), or either behind
layout ops (Identity/Cast/Reshape/...).

Which layers must follow the pattern comes from the recipe and the model (:func:`expected_layers`:
the eligible layers of each ``prune`` stage with a ``pattern``, by weight shape, since the exporter
renames folded weights); the ONNX nodes are matched to them by shape. :func:`sparse_weights_wanted`
is TensorRT's decision: set ``BuilderFlag.SPARSE_WEIGHTS`` when some weight is 2:4 sparse.

onnx is imported inside the functions (lean ``edgec --help``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgec.errors import ExportError

__all__ = ["NMExpectation", "expected_layers", "onnx_layer_weights", "nm_violations", "verify_nm",
           "check_nm", "sparse_weights_wanted", "summary"]

_PASS = {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


@dataclass
class NMExpectation:
    """What the recipe asked: pattern N:M on ``shapes`` (one entry per layer, [O, I, *k])."""

    n: int
    m: int
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # the modules, for the messages

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"


def expected_layers(recipe, model) -> NMExpectation | None:
    """The layers the recipe's patterned ``prune`` stage(s) pruned, read from ``model`` (None: no pattern)."""
    from edgec import masks as P

    exp = None
    for st in getattr(recipe, "stages", ()):
        if st.method != "prune" or getattr(st, "pattern", None) is None:
            continue
        n, m = P.parse_pattern(st.pattern)
        if exp is not None and (n, m) != (exp.n, exp.m):
            raise ExportError(f"recipe asks for two patterns ({exp.pattern} and {st.pattern})",
                              hint="use one N:M pattern per recipe")
        exp = exp or NMExpectation(n, m)
        for name, mod in P.prunable_layers(model, include_first_last=st.prune_first_last):
            if P.nm_eligible(mod, m) and name not in exp.names:
                exp.names.append(name)
                exp.shapes.append(tuple(mod.weight.shape))
    return exp


def _attr(node, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def onnx_layer_weights(path) -> list[dict]:
    """Per Conv/Gemm/MatMul with a constant weight: node name, weight name and its values as
    [out, in, *k] (stored integers minus the zero point when behind a DequantizeLinear)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    consts = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def value(name: str, depth: int = 0):
        if name in consts:
            return name, numpy_helper.to_array(consts[name]).astype(np.float64)
        node = producer.get(name)
        if node is None or depth > 16:
            return None
        if node.op_type == "Constant":
            t = next(a.t for a in node.attribute if a.name == "value")
            return name, numpy_helper.to_array(t).astype(np.float64)
        if node.op_type == "DequantizeLinear":
            got = value(node.input[0], depth + 1)
            if got is None:
                return None
            zp = value(node.input[2], depth + 1) if len(node.input) > 2 and node.input[2] else None
            vals = got[1]
            if zp is not None and np.any(zp[1] != 0):
                z = zp[1].reshape(-1)
                shape = [1] * vals.ndim
                shape[_attr(node, "axis", 1) % vals.ndim] = -1
                vals = vals - (z.reshape(shape) if z.size > 1 else z[0])
            return got[0], vals
        if node.op_type in _PASS and node.input:
            return value(node.input[0], depth + 1)
        return None

    layers = []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        got = value(node.input[1])
        if got is None or got[1].ndim < 2:
            continue
        w = got[1]
        if node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attr(node, "transB", 0)):
            w = w.T  # [in, out] -> [out, in]
        layers.append({"node": node.name or node.output[0], "weight": node.input[1], "stored": got[0],
                       "op": node.op_type, "values": w})
    return layers


def nm_violations(w: np.ndarray, n: int, m: int) -> int | None:
    """Groups of M (along axis 1, the input channels) with more than N non-zeros; None: axis 1 is not
    a multiple of M (the pattern is not defined for the layer)."""
    if w.ndim < 2 or w.shape[1] % m:
        return None
    groups = np.moveaxis(w, 1, -1).reshape(-1, m)
    return int(((groups != 0).sum(axis=1) > n).sum())


def verify_nm(path, exp: NMExpectation) -> dict:
    """Per ONNX layer whether ``exp``'s pattern holds; ``ok`` when every expected layer is matched by a
    conforming ONNX layer of its shape. ``failing`` lists the non-conforming layers of the shapes that
    fall short."""
    rows = []
    for layer in onnx_layer_weights(path):
        w = layer["values"]
        bad = nm_violations(w, exp.n, exp.m)
        rows.append({"node": layer["node"], "weight": layer["weight"], "shape": list(w.shape),
                     "groups": None if bad is None else int(w.size // exp.m), "violations": bad,
                     "holds": None if bad is None else bad == 0})  # None: pattern undefined (I % M != 0)
    want = Counter(exp.shapes)
    holding = Counter(tuple(r["shape"]) for r in rows if r["holds"])
    short = {s: k - holding[s] for s, k in want.items() if holding[s] < k}
    failing = [r for r in rows if tuple(r["shape"]) in short and r["holds"] is False]
    verified = sum(min(k, holding[s]) for s, k in want.items())
    return {"pattern": exp.pattern, "expected_layers": len(exp.shapes), "verified_layers": verified,
            "ok": not short, "failing": [f"{r['node']} ({r['weight']}, {r['violations']} of {r['groups']} groups "
                                         f"over {exp.n} non-zeros)" for r in failing],
            "layers": rows}


def check_nm(report: dict, path) -> None:
    """Raise ExportError (exit 4) when ``report`` (from :func:`verify_nm`) is not ok."""
    if report["ok"]:
        return
    missing = report["expected_layers"] - report["verified_layers"]
    raise ExportError(
        f"{Path(path).name}: {missing} of {report['expected_layers']} layer(s) pruned to {report['pattern']} do not "
        f"follow the pattern in the exported weights: {'; '.join(report['failing']) or 'no layer of their shape'}",
        hint="the weights changed after pruning (a stage without masks, or an edited file): re-run compress, "
             "and keep the prune stage's masks through the later stages")


def sparse_weights_wanted(path) -> bool:
    """TensorRT's BuilderFlag.SPARSE_WEIGHTS decision: some Conv/Gemm weight of the file is 2:4 sparse
    (at most 2 non-zeros in every 4 input channels), the pattern sparse tensor cores run. An all-zero
    weight does not count."""
    for layer in onnx_layer_weights(path):
        w = layer["values"]
        if np.any(w != 0) and nm_violations(w, 2, 4) == 0:
            return True
    return False


def summary(report: dict) -> dict:
    """The short form carried into the run report."""
    return {k: report[k] for k in ("pattern", "expected_layers", "verified_layers", "ok")}

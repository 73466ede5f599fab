"""Benchmark an exported ONNX model: latency, peak memory, accuracy and honest size.

Latency and peak memory are measured in a fresh ``python -m edgec.runtime --bench`` subprocess
(isolated memory, and proof that the device-side runner works without torch); accuracy is computed
in-process with :func:`edgec.runtime.predict` on the exported artifact. Size is counted from the ONNX
file itself (:func:`onnx_weight_stats`): non-zero parameters at their deployed bit width.

onnx / onnxruntime / rich are imported inside the functions (lean ``edgec --help``).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import BudgetExceeded, InputError

__all__ = ["bench", "onnx_weight_stats", "print_bench_table"]

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
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


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
    from onnx import numpy_helper

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

    consts: dict[str, Any] = {t.name: t for t in graph.initializer}
    producer: dict[str, Any] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t

    cache: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = numpy_helper.to_array(consts[name])
        return cache[name]

    def resolve(name: str):
        """-> (tensor name, values, zero point or None, bits, qparam names) or None."""
        seen = 0
        while name not in consts:
            node = producer.get(name)
            seen += 1
            if node is None or seen > 32:
                return None
            if node.op_type == "DequantizeLinear":
                return resolve_dq(node)
            if node.op_type in _PASS_THROUGH and node.input:
                name = node.input[0]
                continue
            return None
        return name, array(name), None, _bits_of(consts[name].data_type), []

    def resolve_dq(node):
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
                inner = resolve(q_in[0])
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


# ------------------------------------------------------------------------------------------ bench
def _check_providers(providers: list[str] | None) -> list[str]:
    import onnxruntime as ort

    providers = list(providers) if providers else ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        gpu = any(p in _GPU_PROVIDERS for p in missing)
        raise InputError(
            f"execution provider(s) {', '.join(missing)} not available in onnxruntime "
            f"{ort.__version__}; available here: {', '.join(available)}",
            hint=(
                "install onnxruntime-gpu on a CUDA host for CUDA/TensorRT, or bench on CPU"
                if gpu else f"use one of: {', '.join(available)}"
            ),
        )
    return providers


def _run_runner(model: Path, *, threads: int, batch: int, warmup: int, runs: int,
                providers: list[str]) -> dict:
    """Run ``python -m edgec.runtime --bench`` in a fresh process and read its JSON."""
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="edgec-bench-") as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [
            sys.executable, "-m", "edgec.runtime", str(model), "--bench",
            "--batch", str(batch), "--warmup", str(warmup), "--runs", str(runs),
            "--threads", str(threads), "--providers", ",".join(providers),
            "--json-out", str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise InputError(
                f"the runtime benchmark of {str(model)!r} failed (exit {proc.returncode}):\n{tail}",
                hint="run the same command by hand to see the full output: " + " ".join(cmd[1:]),
            )
        return json.loads(out.read_text())


def _accuracy(model: Path, eval_x, eval_y, *, threads: int, providers: list[str]) -> tuple[float, int, np.ndarray]:
    from edgec import runtime

    x = np.asarray(eval_x)
    y = np.asarray(eval_y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InputError(
            f"eval_y must be a 1-D array of integer class labels, got shape {y.shape} dtype {y.dtype}"
        )
    if x.shape[0] != y.shape[0]:
        raise InputError(
            f"eval_x has {x.shape[0]} samples but eval_y has {y.shape[0]} labels; pass matching arrays"
        )
    if y.shape[0] == 0:
        raise InputError("eval data is empty; pass at least one sample or no eval data")
    try:
        session = runtime.load_session(model, threads=threads, providers=providers)
        logits = runtime.predict(session, x)
    except (runtime.RunnerError, FileNotFoundError) as e:
        raise InputError(str(e)) from e
    pred = logits.reshape(logits.shape[0], -1).argmax(axis=1)
    return float(np.mean(pred == y)), int(y.shape[0]), pred


def bench(
    model_path: str | os.PathLike,
    *,
    eval_x: np.ndarray | None = None,
    eval_y: np.ndarray | None = None,
    threads: int = 1,
    batch: int = 1,
    warmup: int = 10,
    runs: int = 100,
    providers: list[str] | None = None,
    budget_ms: float | None = None,
    eval_groups: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Latency (isolated subprocess), accuracy (in-process, when eval data given) and size.

    ``eval_groups`` (per-sample arrays aligned with ``eval_y``, e.g. ``{"device": ...}``) adds
    ``accuracy_by_group`` (:func:`edgec.groups.group_accuracy`).

    Raises :class:`BudgetExceeded` (with the full results on ``err.results``) when
    ``budget_ms`` is given and the p50 latency is above it.
    """
    import onnxruntime as ort

    model = Path(model_path)
    if not model.is_file():
        raise InputError(
            f"model file {str(model)!r} "
            + ("is a directory" if model.is_dir() else "does not exist"),
            hint="pass the path of an exported .onnx file (edgec export RUN_DIR writes one)",
        )
    if (eval_x is None) != (eval_y is None):
        raise InputError("pass both eval_x and eval_y (inputs and labels), or neither")
    for name, value, low in (("threads", threads, 0), ("batch", batch, 1),
                             ("warmup", warmup, 0), ("runs", runs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if budget_ms is not None and not budget_ms > 0:
        raise InputError(f"budget_ms must be > 0, got {budget_ms!r}")
    providers = _check_providers(providers)

    stats = onnx_weight_stats(model)
    lat = _run_runner(model, threads=threads, batch=batch, warmup=warmup, runs=runs,
                      providers=providers)
    accuracy, samples, by_group = None, 0, None
    if eval_x is not None:
        accuracy, samples, pred = _accuracy(model, eval_x, eval_y, threads=threads, providers=providers)
        if eval_groups:
            from edgec.groups import group_accuracy

            by_group = group_accuracy(pred, eval_y, eval_groups)

    results: dict[str, Any] = {
        "model": str(model),
        "runtime": "onnxruntime " + ort.__version__,
        "provider": lat.get("provider", providers[0]),
        "threads": threads,
        "batch": batch,
        "warmup": warmup,
        "runs": runs,
        "latency_ms": {k: lat[k] for k in ("p50", "p90", "p99", "mean", "min")},
        "throughput_per_s": lat["throughput_per_s"],
        "peak_rss_mb": lat.get("peak_rss_mb"),
        "accuracy": accuracy,
        "samples": samples,
        "accuracy_by_group": by_group,
        "file_bytes": model.stat().st_size,
        "weight_bytes_deployed": stats["weight_bytes_deployed"],
        "sparse_index_bytes": stats["sparse_index_bytes"],
        "params_nonzero": stats["params_nonzero"],
        "params_total": stats["params_total"],
        "sparsity": stats["sparsity"],
        "bits": stats["bits"],
        "budget_ms": budget_ms,
    }
    p50 = results["latency_ms"]["p50"]
    if budget_ms is not None and p50 > budget_ms:
        err = BudgetExceeded(
            f"p50 latency {p50:.4g} ms exceeds the budget of {budget_ms:g} ms "
            f"({model.name}, batch {batch}, {threads} thread(s), {results['provider']})",
            hint="compress further (fewer bits, more sparsity), use more threads, or raise --budget-ms",
        )
        err.results = results
        raise err
    return results


# ------------------------------------------------------------------------------------------ table
def print_bench_table(results: list[dict], console) -> None:
    """Print bench results (dicts from :func:`bench`) as one compact rich table."""
    from rich.table import Table

    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    first = results[0] if results else {}
    table = Table(title=f"edgec bench ({first.get('runtime', 'onnxruntime')}, "
                        f"{str(first.get('provider', '?')).replace('ExecutionProvider', '')}, "
                        f"{first.get('threads', '?')} thread(s), batch {first.get('batch', '?')})")
    table.add_column("model", overflow="fold", min_width=12)
    for col in ("p50 ms", "p99 ms", "items/s", "RSS MB", "acc %", "file KB", "wt KB"):
        table.add_column(col, justify="right")
    for r in results:
        lat = r.get("latency_ms") or {}
        acc = r.get("accuracy")
        wb, fb = r.get("weight_bytes_deployed"), r.get("file_bytes")
        table.add_row(
            Path(str(r.get("model", "?"))).name,
            num(lat.get("p50"), ".3f"), num(lat.get("p99"), ".3f"),
            num(r.get("throughput_per_s"), ",.0f"), num(r.get("peak_rss_mb"), ".0f"),
            "—" if acc is None else f"{100 * acc:.2f}",
            num(None if fb is None else fb / 1024, ".1f"), num(None if wb is None else wb / 1024, ".1f"),
        )
    console.print(table)

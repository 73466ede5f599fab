"""Benchmark one exported ONNX model: latency, peak memory, accuracy and honest size.

Latency and peak memory are measured in a fresh ``python -m edgec.runtime --bench`` subprocess
(isolated memory, and proof that the device-side runner works without torch); accuracy is computed
in-process with :func:`edgec.runtime.predict` on the exported artifact. Size is counted from the ONNX
file itself (:func:`edgec.export.size.onnx_weight_stats`). Comparing two artifacts' speed is
:mod:`edgec.bench.compare` (interleaved rounds), not two calls of :func:`bench`.

onnxruntime / rich are imported inside the functions (lean ``edgec --help``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgec.export.graph_stats import graph_summary
from edgec.export.size import onnx_weight_stats
from edgec.errors import BudgetExceeded, InputError

__all__ = ["bench", "print_bench_table"]

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


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
    pkg_root = str(Path(__file__).resolve().parents[2])  # the folder holding edgec/
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
            raise InputError(
                f"the runtime benchmark of {str(model)!r} failed (exit {proc.returncode}): "
                f"{_runner_reason(proc.stderr or proc.stdout)}",
                hint="run the same command by hand (add --verbose for the traceback): " + " ".join(cmd[1:]),
            )
        return json.loads(out.read_text())


def _runner_reason(output: str) -> str:
    """The runner's own one-line ``error:`` message (never the child's traceback), shortened."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln[len("error:"):].strip() for ln in lines if ln.startswith("error:")]
    why = errors[-1] if errors else (lines[-1] if lines else "no output")
    return why if len(why) <= 500 else why[:497] + "..."


def _check_eval(eval_x, eval_y) -> tuple[np.ndarray, np.ndarray]:
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
    return x, y


def _accuracy(model: Path, eval_x, eval_y, *, threads: int, providers: list[str]) -> tuple[float, int, np.ndarray]:
    from edgec import runtime

    x, y = _check_eval(eval_x, eval_y)
    try:
        session = runtime.load_session(model, threads=threads, providers=providers)
        logits = runtime.predict(session, x)
    except (runtime.RunnerError, FileNotFoundError) as e:
        raise InputError(str(e)) from e
    pred = logits.reshape(logits.shape[0], -1).argmax(axis=1)
    return float(np.mean(pred == y)), int(y.shape[0]), pred


def local_device() -> dict:
    """The facts of this machine, in the shape a remote bench reports its device's."""
    from edgec.runtime.device import device_facts

    return {"name": "local", "url": None, "remote": False, "emulated": False, **device_facts()}


def target_label(device: dict) -> str:
    """``name (machine[, emulated])``: the label every number measured on ``device`` carries."""
    return f"{device['name']} ({device.get('machine', '?')}{', emulated' if device.get('emulated') else ''})"


def check_budget(results: dict, p50, budget_ms: float | None, what: str, hint: str) -> None:
    """Raise BudgetExceeded (with ``results`` on it) when ``p50`` is above ``budget_ms``."""
    if budget_ms is None or p50 is None or p50 <= budget_ms:
        return
    emu = " (emulated: not a device speed)" if results.get("emulated") else ""
    err = BudgetExceeded(f"{what} p50 latency {p50:.4g} ms exceeds the budget of {budget_ms:g} ms "
                         f"on {results.get('target', 'local')}{emu}", hint=hint)
    err.results = results
    raise err


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
    latency: bool = True,
    remote: Any = None,
    devices_file: str | os.PathLike | None = None,
    accept_new_host_key: bool = False,
) -> dict[str, Any]:
    """Latency (isolated subprocess), accuracy (in-process, when eval data given) and size.

    ``latency=False`` skips the timing (a caller that compares artifacts times them together with
    :func:`edgec.bench.compare.compare_latency` and fills ``latency_ms`` itself).

    ``eval_groups`` (per-sample arrays aligned with ``eval_y``, e.g. ``{"device": ...}``) adds
    ``accuracy_by_group`` (:func:`edgec.groups.group_accuracy`).

    ``remote`` (a device name from ``devices_file`` / ``$EDGEC_DEVICES``, ``ssh://user@host[:port]``
    or a :class:`edgec.devices.Device`) makes the same measurement on that device over SSH
    (:mod:`edgec.bench.remote`): latency, peak memory and accuracy from the device's own Python and
    onnxruntime. ``device`` / ``target`` / ``emulated`` in the results say where it was measured.

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
    stats = onnx_weight_stats(model)
    accuracy, samples, by_group, pred = None, 0, None, None
    if remote is not None:
        from edgec.bench.remote import measure_on_device

        if eval_x is not None:
            eval_x, eval_y = _check_eval(eval_x, eval_y)
        lat, device = measure_on_device(model, remote, inputs=eval_x, labels=eval_y, threads=threads, batch=batch,
                                        warmup=warmup, runs=runs, providers=providers, devices_file=devices_file,
                                        accept_new_host_key=accept_new_host_key)
        ort_version = device["onnxruntime"]
        if eval_x is not None:
            accuracy, samples, pred = lat["accuracy"], lat["samples"], np.asarray(lat["predictions"])
    else:
        providers = _check_providers(providers)
        ort_version, device = ort.__version__, local_device()
        lat = (_run_runner(model, threads=threads, batch=batch, warmup=warmup, runs=runs, providers=providers)
               if latency else dict.fromkeys(("p50", "p90", "p99", "mean", "min", "throughput_per_s")))
        if eval_x is not None:
            accuracy, samples, pred = _accuracy(model, eval_x, eval_y, threads=threads, providers=providers)
    if pred is not None and eval_groups:
        from edgec.groups import group_accuracy

        by_group = group_accuracy(pred, eval_y, eval_groups)

    results: dict[str, Any] = {
        "model": str(model),
        "runtime": "onnxruntime " + ort_version,
        "provider": lat.get("provider") or (providers or ["CPUExecutionProvider"])[0],
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
        **graph_summary(model),  # macs, params, peak_activation_bytes: counted on the ONNX graph, batch 1
        "budget_ms": budget_ms,
        "target": target_label(device),
        "emulated": bool(device.get("emulated")),
        "device": device,
    }
    check_budget(results, results["latency_ms"]["p50"], budget_ms,
                 f"{model.name} (batch {batch}, {threads} thread(s), {results['provider']})",
                 "compress further (fewer bits, more sparsity), use more threads, or raise --budget-ms")
    return results


# ------------------------------------------------------------------------------------------ table
def print_bench_table(results: list[dict], console) -> None:
    """Print bench results (dicts from :func:`bench`) as one compact rich table."""
    from rich.table import Table

    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    first = results[0] if results else {}
    emu = ", EMULATED: latency is not a device speed" if first.get("emulated") else ""
    table = Table(title=f"edgec bench on {first.get('target', 'local')} ({first.get('runtime', 'onnxruntime')}, "
                        f"{str(first.get('provider', '?')).replace('ExecutionProvider', '')}, "
                        f"{first.get('threads', '?')} thread(s), batch {first.get('batch', '?')}{emu})")
    table.add_column("model", overflow="fold", min_width=12)
    for col in ("p50 ms", "p99 ms", "items/s", "RSS MB", "acc %", "file KB", "wt KB", "MMACs/item", "act KB b1"):
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
            num(None if r.get("macs") is None else r["macs"] / 1e6, ".3f"),
            num(None if r.get("peak_activation_bytes") is None else r["peak_activation_bytes"] / 1024, ".1f"),
        )
    console.print(table)

"""Per-node time from ONNX Runtime's own profiler (numpy + onnxruntime + stdlib, like all of ``runtime/``).

Each artifact gets one session with ``SessionOptions.enable_profiling``; the sessions are run in turns,
one call each per round, the order rotating every round (a noisy machine drifts the same for all of
them), ``warmup`` rounds first, then ``runs`` timed rounds, on one random normal input of ``batch``
samples. ``session.end_profiling()`` writes ORT's JSON trace (Chrome trace format: a list of events,
``dur`` and ``ts`` in microseconds): one ``cat == "Session"`` / ``name == "model_run"`` event per call
and one ``cat == "Node"`` event per executed kernel, named ``<node name>_kernel_time`` with
``args.op_name`` (the kernel ORT ran, e.g. ``QLinearConv`` for a fused DequantizeLinear -> Conv ->
QuantizeLinear) and ``args.provider``. A node event belongs to the ``model_run`` whose interval holds
its timestamp; the warm-up calls are dropped by position.

The node names are those of ORT's *optimized* graph; mapping them back to the source model's layers
needs the onnx graph and is done on the host (``edgec/bench/profile.py``).

Result per artifact (:func:`profile_models`)::

    {"path": ..., "provider": ..., "runs": N, "run_us": [N whole-call times from the trace],
     "nodes": [{"name": ..., "op": ..., "provider": ..., "us": [N per-call times, summed when a
                node runs more than once in a call]}, ...]}      # in execution order
"""
from __future__ import annotations

import bisect
import json
import os
import shutil
import tempfile

import numpy as np

KERNEL_SUFFIX = "_kernel_time"

__all__ = ["KERNEL_SUFFIX", "parse_trace", "profile_job", "profile_models"]


def parse_trace(events: list, *, skip: int = 0) -> dict:
    """``{"run_us": [...], "nodes": [...]}`` (as in the module docstring) from ORT's trace ``events``,
    without the first ``skip`` calls (the warm-up)."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[skip:]
    starts = [r[0] for r in runs]
    nodes: dict[str, dict] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith(KERNEL_SUFFIX):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > runs[i][1]:
            continue  # a warm-up call (or outside any call)
        name = name[: -len(KERNEL_SUFFIX)]
        args = e.get("args") or {}
        node = nodes.get(name)
        if node is None:
            node = nodes[name] = {"name": name, "op": args.get("op_name", "?"), "provider": args.get("provider", "?"),
                                  "us": np.zeros(len(runs)), "first": e["ts"] - runs[i][0]}
        node["us"][i] += float(e["dur"])
    order = sorted(nodes.values(), key=lambda n: n.pop("first"))
    for n in order:
        n["us"] = n["us"].tolist()
    return {"run_us": [float(b - a) for a, b in runs], "nodes": order}


def _check(name: str, value, low: int) -> None:
    from . import RunnerError

    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RunnerError(f"{name} must be an integer >= {low}, got {value!r}")


def profile_models(paths: list, *, threads: int = 1, batch: int = 1, warmup: int = 10, runs: int = 50,
                   providers=None) -> list[dict]:
    """Profile the ONNX files ``paths`` against each other (interleaved calls); one result per path."""
    from . import RunnerError, _random_input, load_session, run_session

    for name, value, low in (("threads", threads, 0), ("batch", batch, 1), ("warmup", warmup, 0), ("runs", runs, 1)):
        _check(name, value, low)
    if not paths:
        raise RunnerError("profile needs at least one model file")
    tmp = tempfile.mkdtemp(prefix="edgec-profile-")
    try:
        calls = []
        for k, path in enumerate(paths):
            sess = load_session(path, threads=threads, providers=providers,
                                profile_prefix=os.path.join(tmp, f"m{k}"))
            inp = sess.get_inputs()[0]
            fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
            if fixed is not None and fixed != batch:
                raise RunnerError(f"{os.fspath(path)!r} has a fixed batch size of {fixed}; profile with batch={fixed}")
            feed = {inp.name: np.ascontiguousarray(_random_input(inp, batch))}
            calls.append((sess, feed))
        for sess, feed in calls:  # one checked call each: ORT's own errors become a RunnerError
            run_session(sess, feed)
        n = len(calls)
        for r in range(warmup + runs):
            for j in range(n):
                sess, feed = calls[(r + j) % n]
                sess.run(None, feed)
        out = []
        for path, (sess, _) in zip(paths, calls):
            with open(sess.end_profiling()) as fh:
                trace = parse_trace(json.load(fh), skip=1 + warmup)
            out.append({"path": os.fspath(path), "provider": sess.get_providers()[0], "runs": runs, **trace})
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def profile_job(job: dict, base: str) -> dict:
    """A ``runtime/device.py`` job of kind ``"profile"``: ``{"models": [paths relative to base], ...}``."""
    common = {k: job[k] for k in ("threads", "batch", "warmup", "runs") if k in job}
    models = [os.path.join(base, m) for m in job["models"]]
    return {"profiles": profile_models(models, providers=job.get("providers"), **common)}

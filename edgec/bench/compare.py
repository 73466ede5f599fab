"""Compare the latency of several ONNX artifacts in one interleaved run.

Two artifacts timed one after the other on a shared, noisy machine can differ by the machine's
drift alone (a demo once reported 1.04x for a model that is 1.5-2.2x faster). Here every timed call
of one model is followed by one call of each other model, the order rotating from call to call, for
``rounds`` rounds of ``runs`` calls: all models see the same machine state. Per model: p50 of each
round, and the median over rounds; per model against the first: the speed-up of each round
(first's p50 / this model's p50), its median and its spread (min .. max over rounds).
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgec.errors import InputError

__all__ = ["compare_latency"]


def compare_latency(paths: Mapping[str, str | os.PathLike], *, threads: int = 1, batch: int = 1, warmup: int = 10,
                    runs: int = 100, rounds: int = 5, providers: list[str] | None = None,
                    sample: np.ndarray | None = None) -> dict[str, Any]:
    """Interleaved latency of the artifacts ``{name: path}`` on one input of ``batch`` samples
    (``sample`` tiled/cut to ``batch``, e.g. real eval inputs; random normal data otherwise)."""
    from edgec import runtime

    for name, value, low in (("threads", threads, 0), ("batch", batch, 1), ("warmup", warmup, 0),
                             ("runs", runs, 1), ("rounds", rounds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if not paths:
        raise InputError("compare_latency needs at least one artifact")
    names = list(paths)
    calls = {}
    for n in names:
        try:
            sess = runtime.load_session(paths[n], threads=threads, providers=providers)
        except (runtime.RunnerError, FileNotFoundError) as e:
            raise InputError(str(e)) from e
        inp = sess.get_inputs()[0]
        x = runtime._random_input(inp, batch) if sample is None else runtime._as_model_input(sample, inp)
        feed = {inp.name: np.ascontiguousarray(x[np.arange(batch) % x.shape[0]])}
        calls[n] = (sess.run, feed)
    for _ in range(warmup):
        for run, feed in calls.values():
            run(None, feed)
    times = {n: np.empty((rounds, runs)) for n in names}
    clock = time.perf_counter
    for r in range(rounds):
        for j in range(runs):
            k = (r * runs + j) % len(names)
            for n in names[k:] + names[:k]:
                run, feed = calls[n]
                t0 = clock()
                run(None, feed)
                times[n][r, j] = clock() - t0
    models = {}
    for n in names:
        t = 1000.0 * times[n]
        per_round = np.median(t, axis=1)
        models[n] = {"p50_ms": float(np.median(per_round)), "p90_ms": float(np.percentile(t, 90)),
                     "mean_ms": float(t.mean()), "round_p50_ms": per_round.tolist(),
                     "throughput_per_s": batch * 1000.0 / float(t.mean())}
    first = np.asarray(models[names[0]]["round_p50_ms"])
    speedup = {}
    for n in names:
        ratio = first / np.asarray(models[n]["round_p50_ms"])
        speedup[n] = {"median": float(np.median(ratio)), "min": float(ratio.min()), "max": float(ratio.max())}
    return {"method": f"interleaved: {rounds} rounds x {runs} calls per model, the order rotating every call",
            "rounds": rounds, "runs": runs, "batch": batch, "threads": threads, "warmup": warmup,
            "input": "real eval samples" if sample is not None else "random normal", "models": models,
            "speedup_vs_first": speedup}

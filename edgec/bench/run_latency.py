"""A compress run's latency: its FP32 and compressed artifacts timed against each other at every
batch of the recipe (``bench.batch`` first, then ``bench.batches``), one interleaved run per batch
(:func:`edgec.bench.compare.compare_latency`).

The report rows keep their single-batch fields (``latency_p50_ms``, ``speedup_vs_fp32``, ...) at
``bench.batch``, the headline batch every other reader of a row uses, and gain ``latency_by_batch``:
``{"1": {...}, "32": {...}}`` with p50, p90, throughput and the speed-up against the first row (its
median and spread over rounds) at each batch. At a batch larger than ``bench.batch`` the calls per
round (and warm-up calls) are scaled by ``bench.batch / batch``, with a floor of 20 (3), so each batch
times about as many samples; the method string of each batch says how many calls it made.
"""
from __future__ import annotations

import math

__all__ = ["apply_to_benches", "batch_speedups", "interleaved_latency", "latency_batches", "latency_line"]


def latency_batches(bench_cfg) -> list[int]:
    """The batches a run is timed at: ``bench.batch`` first, then ``bench.batches`` (each once)."""
    out = [int(bench_cfg.batch)]
    for b in getattr(bench_cfg, "batches", None) or ():
        if int(b) not in out:
            out.append(int(b))
    return out


def _scaled(n: int, head: int, batch: int, floor: int) -> int:
    return n if batch <= head else max(min(n, floor), math.ceil(n * head / batch))


def interleaved_latency(rows: list[dict], recipe, ex) -> dict:
    """Time the artifacts of ``rows`` (``name``, ``path``; the first is the reference) in one interleaved
    run per batch; the rows take the numbers (see the module docstring). Returns the comparison at
    ``bench.batch`` (:func:`compare_latency`'s dict) with ``by_batch``: ``{batch: comparison}``."""
    from edgec.bench.compare import compare_latency

    bc = recipe.bench
    batches = latency_batches(bc)
    head = batches[0]
    by_batch = {}
    for b in batches:
        by_batch[b] = compare_latency({r["name"]: r["path"] for r in rows}, threads=bc.threads, batch=b,
                                      warmup=_scaled(bc.warmup, head, b, 3), runs=_scaled(bc.runs, head, b, 20),
                                      rounds=bc.rounds, sample=ex[:b] if ex is not None else None)
    for r in rows:
        per = {}
        for b, cmp in by_batch.items():
            m, s = cmp["models"][r["name"]], cmp["speedup_vs_first"][r["name"]]
            per[str(b)] = {"p50_ms": m["p50_ms"], "p90_ms": m["p90_ms"], "mean_ms": m["mean_ms"],
                           "throughput_per_s": m["throughput_per_s"], "round_p50_ms": m["round_p50_ms"],
                           "speedup_vs_fp32": s["median"], "speedup_spread": [s["min"], s["max"]],
                           "runs": cmp["runs"], "latency_method": cmp["method"]}
        h = per[str(head)]
        r.update(latency_p50_ms=h["p50_ms"], latency_p90_ms=h["p90_ms"], throughput_per_s=h["throughput_per_s"],
                 latency_rounds=by_batch[head]["rounds"], latency_round_p50_ms=h["round_p50_ms"],
                 speedup_vs_fp32=h["speedup_vs_fp32"], speedup_spread=h["speedup_spread"],
                 latency_method=h["latency_method"], latency_by_batch=per)
    return {**by_batch[head], "by_batch": by_batch}


def apply_to_benches(benches: list[dict], rows: list[dict], cmp: dict) -> None:
    """The bench results (the console's table) take the interleaved timing at ``bench.batch``."""
    for b, r in zip(benches, rows):
        m = cmp["models"][r["name"]]
        b["latency_ms"].update(p50=m["p50_ms"], p90=m["p90_ms"], mean=m["mean_ms"])
        b["throughput_per_s"] = m["throughput_per_s"]


def batch_speedups(row: dict) -> str:
    """``x1.30 at batch 1 (x1.29-x1.34), x2.10 at batch 32 (x2.0-x2.2)``: a row's speed-up at every batch."""
    per = row.get("latency_by_batch") or {}
    if not per:
        lo, hi = row.get("speedup_spread") or (row["speedup_vs_fp32"],) * 2
        return f"x{row['speedup_vs_fp32']:.2f} (x{lo:.2f}-x{hi:.2f})"
    return ", ".join(f"x{v['speedup_vs_fp32']:.2f} at batch {b} (x{v['speedup_spread'][0]:.2f}-"
                     f"x{v['speedup_spread'][1]:.2f})" for b, v in sorted(per.items(), key=lambda kv: int(kv[0])))


def latency_line(cmp: dict, threads: int) -> str:
    """The console's line under the bench table: how each batch was timed."""
    by = cmp.get("by_batch") or {cmp["batch"]: cmp}
    return "latency: " + "; ".join(f"batch {b}: {c['method']}" for b, c in by.items()) + f", {threads} thread(s)"

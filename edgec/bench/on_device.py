"""A compress run's artifacts measured on its recipe's ``bench.remote`` device (report rows)."""
from __future__ import annotations

from edgec.bench.latency import bench, print_bench_table
from edgec.devices import resolve_device

__all__ = ["device_rows"]

_LOCAL_TIMING = ("speedup_vs_fp32", "speedup_spread", "latency_rounds", "latency_round_p50_ms", "latency_method",
                 "latency_by_batch")


def device_rows(rows: list[dict], recipe, ex, ey, groups=None, *, console=None) -> list[dict]:
    """Report rows of the run's artifacts (``rows``: the local ones, fp32 first) measured on the
    recipe's ``bench.remote`` device: one bench there per artifact (latency, accuracy), speed-up
    against the fp32 artifact on the same device."""
    bc = recipe.bench
    dev = resolve_device(bc.remote)  # one clear error before any transfer when the name is unknown
    benches, out = [], []
    for r in rows:
        benches.append(bench(r["path"], eval_x=ex, eval_y=ey, threads=bc.threads, batch=bc.batch, warmup=bc.warmup,
                             runs=bc.runs, eval_groups=groups or None, remote=dev))
    base = benches[0]["latency_ms"]["p50"]
    for r, b in zip(rows, benches):
        row = {k: v for k, v in r.items() if k not in _LOCAL_TIMING}
        lat = b["latency_ms"]
        row.update(name=f"{r['name']} @ {b['target']}", device=b["target"], emulated=b["emulated"],
                   accuracy=b["accuracy"], latency_p50_ms=lat["p50"], latency_p90_ms=lat["p90"],
                   throughput_per_s=b["throughput_per_s"], samples=b["samples"], runtime=b["runtime"],
                   peak_rss_mb=b["peak_rss_mb"], speedup_vs_fp32=base / lat["p50"] if lat["p50"] else None,
                   device_facts=b["device"])
        if b.get("accuracy_by_group"):
            row["accuracy_by_group"] = b["accuracy_by_group"]
        out.append(row)
    if console is not None:
        print_bench_table(benches, console)
    return out

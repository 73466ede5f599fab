"""``edgec profile``: per-layer time of exported ONNX artifacts from ONNX Runtime's profiler, side by side.

The kernels are timed by :mod:`edgec.runtime.profile` (numpy + onnxruntime only: locally, or on a
device over SSH with ``remote=``), all artifacts in one interleaved run; each profiled kernel is mapped
to a LAYER key of the source model by :mod:`edgec.bench.layers` (the rule is written there), so the
same layer of the FP32 and the quantized export lands in one row.

Per artifact: per-kernel median over the timed calls, the whole call (``model_run`` in the same trace;
the profiler's own overhead included, so it is above what ``edgec bench`` measures) and the sum of the
kernel medians. Per layer: the median over calls of the per-call sum of its kernels (the same calls,
so a layer's kernels are added call by call). With one float and one quantized artifact each row also
has ``fp32_us``, ``int8_us``, ``ratio`` = int8_us / fp32_us (time: > 1 is slower), ``int8_slower``
(int8_us > fp32_us; None where a side has no time) and ``int8_slower_share``: the share of
interleaved calls in which the quantized layer took longer, to read the flag's noise by.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import InputError

__all__ = ["ArtifactProfile", "LayerRow", "ProfileResult", "print_profile_table", "profile_models", "write_profile"]

SCHEMA = "edgec.profile/1"
_INT_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinear", "ConvInteger", "MatMulInteger", "DynamicQuantize")


@dataclass
class ArtifactProfile:
    name: str
    path: str
    quantized: bool
    provider: str
    run_us: float  # median whole call, from the trace
    run_us_p90: float
    kernels_us: float  # sum of the kernel medians
    nodes: list[dict] = field(default_factory=list)  # {name, op, provider, us, layer, kind} in execution order


@dataclass
class LayerRow:
    layer: str
    kind: str  # layer | op | boundary | runtime (see edgec/bench/layers.py)
    us: dict[str, float]  # artifact name -> median per-call time (0.0: no kernel of that artifact here)
    kernels: dict[str, list[str]]  # artifact name -> the profiled kernels ("name (op)")
    fp32_us: float | None = None
    int8_us: float | None = None
    ratio: float | None = None
    int8_slower: bool | None = None
    int8_slower_share: float | None = None


@dataclass
class ProfileResult:
    artifacts: list[ArtifactProfile]
    layers: list[LayerRow]  # in the first artifact's execution order, then the others'
    settings: dict[str, Any]
    device: dict[str, Any]
    pair: dict[str, str] | None = None  # {"fp32": name, "int8": name} when there is one float + one quantized

    def top(self, n: int | None = None) -> list[LayerRow]:
        """The ``n`` rows that take the longest in any artifact (all rows for None)."""
        rows = sorted(self.layers, key=lambda r: -max(r.us.values(), default=0.0))
        return rows if n is None else rows[:n]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **self.settings, "device": self.device, "pair": self.pair,
                "artifacts": [asdict(a) for a in self.artifacts], "layers": [asdict(r) for r in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _load_graph(path: Path):
    import onnx

    if not path.is_file():
        raise InputError(f"model file {str(path)!r} " + ("is a directory" if path.is_dir() else "does not exist"),
                         hint="pass the path of an exported .onnx file (edgec export RUN_DIR writes one)")
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise InputError(f"{str(path)!r} is not an ONNX model ({type(e).__name__}: {str(e)[:200]})",
                         hint="pass an exported .onnx file, e.g. RUN_DIR/export/model_compressed.onnx") from e


def _names(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    names = [s if stems.count(s) == 1 else f"{p.parent.name}/{s}" for p, s in zip(paths, stems)]
    return [n if names.count(n) == 1 else f"{n}#{k}" for k, n in enumerate(names)]


def _measure(paths: list[Path], *, threads, batch, warmup, runs, providers, remote, devices_file,
             accept_new_host_key) -> tuple[list[dict], dict]:
    if remote is not None:
        from edgec.bench.remote import measure_on_device

        res, device = measure_on_device(paths, remote, kind="profile", threads=threads, batch=batch, warmup=warmup,
                                        runs=runs, providers=providers, devices_file=devices_file,
                                        accept_new_host_key=accept_new_host_key)
        return res["profiles"], device
    from edgec import runtime
    from edgec.runtime.device import device_facts
    from edgec.runtime.profile import profile_models as run_profiles

    try:
        profs = run_profiles([str(p) for p in paths], threads=threads, batch=batch, warmup=warmup, runs=runs,
                             providers=providers)
    except (runtime.RunnerError, FileNotFoundError) as e:
        raise InputError(str(e)) from e
    return profs, {"name": "local", "remote": False, **device_facts()}


def profile_models(paths, *, batch: int = 1, threads: int = 1, runs: int = 50, warmup: int = 10,
                   providers: list[str] | None = None, remote: Any = None, devices_file=None,
                   accept_new_host_key: bool = False) -> ProfileResult:
    """Profile the ONNX artifacts ``paths`` (the first is the reference) and line their layers up."""
    from edgec.bench.layers import LayerGraph

    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise InputError("profile needs at least one .onnx file")
    graphs = [LayerGraph(_load_graph(p)) for p in paths]  # every file checked before any measurement
    profs, device = _measure(paths, threads=threads, batch=batch, warmup=warmup, runs=runs, providers=providers,
                             remote=remote, devices_file=devices_file, accept_new_host_key=accept_new_host_key)
    names = _names(paths)
    artifacts, per_call = [], []  # per_call: artifact -> {layer: per-call sums}
    order: dict[str, str] = {}  # layer -> kind, in first-seen order
    for name, path, g, prof in zip(names, paths, graphs, profs):
        quant = any(n.op_type.startswith(_INT_OPS) for n in g.nodes)
        sums: dict[str, np.ndarray] = {}
        nodes = []
        for n in prof["nodes"]:
            key, kind = g.kernel_key(n["name"], n["op"])
            order.setdefault(key, kind)
            us = np.asarray(n["us"], dtype=float)
            sums[key] = sums.get(key, 0.0) + us
            nodes.append({"name": n["name"], "op": n["op"], "provider": n["provider"],
                          "us": float(np.median(us)), "layer": key, "kind": kind})
        run_us = np.asarray(prof["run_us"], dtype=float)
        artifacts.append(ArtifactProfile(name=name, path=str(path), quantized=quant, provider=prof["provider"],
                                         run_us=float(np.median(run_us)), run_us_p90=float(np.percentile(run_us, 90)),
                                         kernels_us=float(sum(n["us"] for n in nodes)), nodes=nodes))
        per_call.append(sums)
    floats = [a.name for a in artifacts if not a.quantized]
    quants = [a.name for a in artifacts if a.quantized]
    pair = {"fp32": floats[0], "int8": quants[0]} if floats and quants else None
    layers = [_row(key, kind, names, per_call, artifacts, pair) for key, kind in order.items()]
    settings = {"batch": batch, "threads": threads, "runs": runs, "warmup": warmup,
                "method": f"ORT profiler (enable_profiling), {len(paths)} artifact(s) interleaved: {warmup} warm-up + "
                          f"{runs} timed calls each, the order rotating every call; per-kernel and per-layer medians "
                          "over calls, in microseconds"}
    return ProfileResult(artifacts=artifacts, layers=layers, settings=settings, device=device, pair=pair)


def _row(key, kind, names, per_call, artifacts, pair) -> LayerRow:
    us = {n: float(np.median(s[key])) if key in s else 0.0 for n, s in zip(names, per_call)}
    kernels = {a.name: [f"{n['name']} ({n['op']})" for n in a.nodes if n["layer"] == key] for a in artifacts}
    row = LayerRow(layer=key, kind=kind, us=us, kernels={k: v for k, v in kernels.items() if v})
    if pair is not None:
        f, q = us[pair["fp32"]], us[pair["int8"]]
        row.fp32_us, row.int8_us = f, q
        row.ratio = q / f if f > 0 and q > 0 else None
        sf, sq = (per_call[names.index(pair[k])].get(key) for k in ("fp32", "int8"))
        if sf is not None and sq is not None:
            row.int8_slower = bool(q > f)
            row.int8_slower_share = float(np.mean(np.asarray(sq) > np.asarray(sf)))
    return row


# ------------------------------------------------------------------------------------- output
def print_profile_table(res: ProfileResult, console, *, top: int | None = 15) -> None:
    """The ``top`` layers by time (any artifact) as a rich table, then the whole-call times."""
    from rich.table import Table

    names = [a.name for a in res.artifacts]
    s = res.settings
    where = res.device.get("name", "local")
    table = Table(title=f"edgec profile on {where} (onnxruntime {res.device.get('onnxruntime', '?')}, {s['threads']} thread(s), "
                        f"batch {s['batch']}): median us per call over {s['runs']} interleaved calls")
    table.add_column("layer", overflow="fold")
    for n in names:
        table.add_column(n, justify="right", overflow="fold", width=10)
    if res.pair:
        table.add_column("int8/ fp32", justify="right", overflow="fold", width=5)
        table.add_column("int8 slower (calls)", justify="right", overflow="fold", width=8)
    rows = res.top(top)
    for r in rows:
        cells = [f"{r.us[n]:.1f}" if r.us[n] else "—" for n in names]
        if res.pair:
            slower = "" if r.int8_slower is None else (f"[red]yes[/] {r.int8_slower_share:.0%}" if r.int8_slower
                                                       else f"no {r.int8_slower_share:.0%}")
            cells += ["—" if r.ratio is None else f"{r.ratio:.2f}", slower]
        table.add_row(r.layer, *cells)
    runs = {a.name: a.run_us for a in res.artifacts}
    extra = []
    if res.pair:
        f, q = runs[res.pair["fp32"]], runs[res.pair["int8"]]
        extra = ["—" if not f else f"{q / f:.2f}", ""]
    table.add_row("whole call (trace)", *(f"{runs[n]:.1f}" for n in names), *extra, style="bold")
    console.print(table)
    if len(rows) < len(res.layers):
        console.print(f"({len(res.layers) - len(rows)} more row(s) in the JSON; --top 0 shows all)")


def _plot(res: ProfileResult, write, *, top: int | None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = res.top(top)[::-1]  # longest at the top
    names = [a.name for a in res.artifacts]
    k = len(names)
    fig = Figure(figsize=(9.0, max(2.5, 0.22 * k * len(rows) + 1.5)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    h = 0.8 / k
    y = np.arange(len(rows), dtype=float)
    for j, n in enumerate(names):
        ax.barh(y + (k - 1 - j - (k - 1) / 2) * h, [r.us[n] for r in rows], height=h, color=f"C{j % 10}", label=n)
    ax.set_yticks(y)
    ax.set_yticklabels([r.layer for r in rows], fontsize=8)
    ax.set_xlabel("median time per call (us)")
    s = res.settings
    ax.set_title(f"per-layer time, ORT profiler on {res.device.get('name', 'local')} ({s['threads']} thread(s), "
                 f"batch {s['batch']}, {s['runs']} interleaved calls)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="x", linestyle=":", alpha=0.7)
    fig.savefig(write, format="png", bbox_inches="tight")


def write_profile(res: ProfileResult, out_dir: str | os.PathLike, *, top: int | None = 30) -> dict[str, Path]:
    """``out_dir/profile.json`` (every row) and ``out_dir/profile.png`` (the ``top`` rows), written atomically."""
    from edgec.atomic import atomic_write, atomic_write_text

    out = Path(out_dir)
    return {"json": atomic_write_text(out / "profile.json", res.to_json()),
            "png": atomic_write(out / "profile.png", lambda fh: _plot(res, fh, top=top))}

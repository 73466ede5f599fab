"""Run report: ``report.json`` + ``report.md`` (table) + ``pareto.png`` (latency vs accuracy).

Rows are plain dicts with keys ``name, format, bits, accuracy (0..1 or None),
latency_p50_ms (or None), file_bytes, weight_bytes_deployed, sparsity (0..1), params_nonzero``;
missing values are shown as "—" and left out of the plot. Every file is written atomically
(temporary file in the same folder, then ``os.replace``). matplotlib is imported inside
:func:`write_report` (lean imports).
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["render_markdown", "write_report"]

from edgec.atomic import atomic_write  # noqa: E402

DASH = "—"


def _json_default(obj: Any):
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"report rows must hold plain values; got {type(obj).__name__}: {obj!r}")


def _plain(obj: Any):
    """JSON-safe copy: non-finite floats become None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _num(value) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(value, fmt: str, scale: float = 1.0) -> str:
    v = _num(value)
    return DASH if v is None else format(v * scale, fmt)


def _cell(text: Any) -> str:
    return str(text if text is not None else DASH).replace("|", "\\|").replace("\n", " ")


def render_markdown(rows: list[dict], *, title: str, created: str, precision: dict | None = None,
                    pruning: dict | None = None) -> str:
    """The Markdown report: title, one table row per model (p50 and speed-up at every batch the rows were
    timed at, ``latency_by_batch``), column notes, and the sections (``precision``: the run's precision
    decision, :func:`edgec.report_sections.precision_report`; ``pruning``: its channel-pruning rounds,
    :func:`edgec.report_pruning.pruning_report`)."""
    base = _num(rows[0].get("latency_p50_ms")) if rows else None
    batches = sorted({r.get("batch") for r in rows if r.get("batch")})
    bdesc = f"batch {batches[0]}" if len(batches) == 1 else "batch 1" if not batches else "see batch column"
    by_batch = _timed_batches(rows)  # two or more: a p50 / speed-up column pair per batch
    lat_head = [h for b in by_batch for h in (f"p50 ms (batch {b})", f"speed-up vs first (batch {b})")] \
        if by_batch else [f"p50 ms ({bdesc})", "speed-up vs first"]
    fid = any(r.get("fidelity_top1") is not None for r in rows)
    graph = any(r.get("macs") is not None for r in rows)  # MACs / params / peak memory of the ONNX graph
    head = ["name", "format", "bits", "accuracy %", *(["fidelity %"] if fid else []), *lat_head,
            "file KB", "deployed weight KB", *(_GRAPH_HEAD if graph else []), "sparsity %", "params nonzero"]
    targets = any(r.get("device") for r in rows)  # where each row was measured (bench --remote / bench.remote)
    if targets:
        head.append("measured on")
    lines = [f"# {title}", "", f"Created {created}.", "",
             "| " + " | ".join(head) + " |",
             "|" + "|".join([":---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        lat = _num(r.get("latency_p50_ms"))
        speedup = _speedup_cell(r, base, lat)
        nz = r.get("params_nonzero")
        cells = [
            _cell(r.get("name")), _cell(r.get("format")), _cell(r.get("bits")),
            _fmt(r.get("accuracy"), ".2f", 100.0),
            *([_fmt(r.get("fidelity_top1"), ".2f", 100.0)
               + (f" ({_fmt(r.get('fidelity_sqnr_db'), '.1f')} dB)" if _num(r.get("fidelity_sqnr_db")) is not None
                  else "")] if fid else []),
            *(_batch_cells(r, rows[0], by_batch) if by_batch else [_fmt(lat, ".3f"), speedup]),
            _fmt(r.get("file_bytes"), ".1f", 1 / 1024),
            _fmt(r.get("weight_bytes_deployed"), ".2f", 1 / 1024),
            *(_graph_cells(r) if graph else []),
            _fmt(r.get("sparsity"), ".1f", 100.0),
            DASH if nz is None else f"{int(nz):,}",
        ]
        if targets:
            cells.append(_cell(r.get("device")))
        lines.append("| " + " | ".join(cells) + " |")
    method = _methods(rows, by_batch)
    lines += [
        "",
        (f"Latency: {method}; p50 = median over rounds of each round's p50; speed-up = median over rounds of "
         "(first row's p50 / this row's p50), in brackets its range over the rounds. " if method else
         "Speed-up = p50 latency of the first row / p50 latency of this row. ") +
        "Deployed weight KB = non-zero weights and biases at their deployed bit width "
        "(sparse index overhead not included); file KB = size of the artifact on disk. "
        + (_GRAPH_NOTE if graph else "")
        + ("Fidelity = top-1 agreement of the artifact with the FP32 input model on the parity samples "
           "(output SQNR in dB). " if fid else "") +
        f"{DASH} = not measured.",
        "",
    ]
    lines += _robustness_table(rows)
    lines += _nm_sparsity_notes(rows)
    if targets:
        lines += ["Measured on: the machine whose onnxruntime timed the row and computed its accuracy; a device's "
                  "rows (NAME @ DEVICE) are timed there in separate runs, their speed-up against the fp32 artifact "
                  "on the same device; an emulated device's latency is not a device speed.", ""]
    lines += _group_sections(rows)
    from edgec.report_pruning import render_pruning
    from edgec.report_sections import render_precision

    lines += render_pruning(pruning)
    lines += render_precision(precision)
    return "\n".join(lines)


def _timed_batches(rows: list[dict]) -> list[int]:
    """The batches of the rows' ``latency_by_batch`` (ascending) when there are two or more."""
    out = sorted({int(b) for r in rows for b in (r.get("latency_by_batch") or {})})
    return out if len(out) > 1 else []


def _at_batch(r: dict, b: int, head: int | None) -> tuple[float | None, dict]:
    """(p50, the dict with its speed-up fields) of row ``r`` at batch ``b``; a row without per-batch
    timing counts at its own ``batch`` (else at the first row's)."""
    per = (r.get("latency_by_batch") or {}).get(str(b))
    if per:
        return _num(per.get("p50_ms")), per
    if (r.get("batch") or head) == b:
        return _num(r.get("latency_p50_ms")), r
    return None, {}


def _batch_cells(r: dict, first: dict, batches: list[int]) -> list[str]:
    cells = []
    for b in batches:
        lat, src = _at_batch(r, b, first.get("batch"))
        base, _ = _at_batch(first, b, first.get("batch"))
        cells += [_fmt(lat, ".3f"), _speedup_cell(src, base, lat) if lat is not None else DASH]
    return cells


def _methods(rows: list[dict], by_batch: list[int]) -> str | None:
    """How the latency was timed: the first timed row's method, one per batch when there are several."""
    r = next((r for r in rows if r.get("latency_method")), None)
    if r is None:
        return None
    per = r.get("latency_by_batch") or {}
    if not by_batch or not per:
        return r["latency_method"]
    head = f" (the headline batch, `speedup_vs_fp32` in report.json: batch {r['batch']})" if r.get("batch") else ""
    return "; ".join(f"batch {b}: {per[str(b)]['latency_method']}" for b in by_batch if str(b) in per) + head


_GRAPH_HEAD = ["MMACs/item", "params", "peak act KB (batch 1)"]
_GRAPH_NOTE = ("MMACs/item (per input sample), params and peak act KB are counted on the exported ONNX graph "
               "at batch 1 (edgec.export.graph_stats): multiply-accumulates of the conv/matmul nodes, elements of their "
               "weights and biases, and the peak of live activation tensors in ONNX Runtime's execution order "
               "(weights not included). ")


def _graph_cells(r: dict) -> list[str]:
    params = r.get("params")
    return [_fmt(r.get("macs"), ".3f", 1e-6), DASH if params is None else f"{int(params):,}",
            _fmt(r.get("peak_activation_bytes"), ".1f", 1 / 1024)]


def _nm_sparsity_notes(rows: list[dict]) -> list[str]:
    """One note per row whose artifact carries an N:M pattern: verified on the file, speed not measured
    (ONNX Runtime's CPU kernels run it dense)."""
    out = []
    for r in rows:
        nm = r.get("nm_sparsity")
        if not nm:
            continue
        state = (f"pattern verified on {nm['verified_layers']} layers" if nm.get("ok") else
                 f"pattern BROKEN ({nm['verified_layers']} of {nm['expected_layers']} layers verified)")
        out += [f"{_cell(r.get('name'))}: {nm['pattern']} sparsity: {state}; speed-up needs sparse tensor cores "
                "(TensorRT on Ampere or newer), not measured here: ONNX Runtime runs the pattern dense, so the "
                "latency above is the dense one.", ""]
    return out


def _speedup_cell(r: dict, base: float | None, lat: float | None) -> str:
    """Interleaved rows carry their measured speed-up and its spread over rounds; others: base / lat."""
    s = _num(r.get("speedup_vs_fp32"))
    if s is not None:
        spread = r.get("speedup_spread") or []
        if len(spread) == 2 and spread[0] != spread[1]:
            return f"{s:.2f}× ({spread[0]:.2f}–{spread[1]:.2f})"
        return f"{s:.2f}×"
    return f"{base / lat:.2f}×" if base is not None and lat else DASH


def _robustness_table(rows: list[dict]) -> list[str]:
    """Rows with robust accuracy (``pgd_accuracy``) or dynamic inference (``avg_members``): a second table."""
    sel = [r for r in rows if r.get("pgd_accuracy") is not None or r.get("avg_members") is not None]
    if not sel:
        return []
    attack = next((r["pgd"] for r in sel if r.get("pgd")), None)
    head = ["name", "clean acc % (PGD subset)", "PGD acc %", "sub-models per input", "mean ms", "latency vs all K"]
    lines = ["## Robustness and dynamic inference", "",
             "| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
    for r in sel:
        ratio = _num(r.get("latency_ratio_vs_all_k"))
        lines.append("| " + " | ".join([
            _cell(r.get("name")), _fmt(r.get("clean_accuracy_pgd_subset"), ".2f", 100.0),
            _fmt(r.get("pgd_accuracy"), ".2f", 100.0), _fmt(r.get("avg_members"), ".2f"),
            _fmt(r.get("latency_mean_ms"), ".3f"), DASH if ratio is None else f"{ratio:.3f}×"]) + " |")
    lines += ["", f"Attack: {attack or DASH}. Sub-models per input and latency: the dynamic ensemble's "
              "early-exit controller in ORT on the eval inputs, one input per call, each call timed in both modes "
              "back to back in one run (per input the median over rounds, then the mean over inputs); latency vs "
              "all K = mean(dynamic) / mean(all K).", ""]
    return lines


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another on both latency (lower) and accuracy (higher), by latency."""
    front = []
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((lat, acc))
    return front


def _group_sections(rows: list[dict]) -> list[str]:
    """One table per group key (device, seen/unseen device, speaker ...): accuracy of every row that has it."""
    keys = sorted({k for r in rows for k in (r.get("accuracy_by_group") or {})})
    if not keys:
        return []
    with_groups = [r for r in rows if r.get("accuracy_by_group")]
    out = ["## Accuracy per group", "",
           "Accuracy of the exported models in their runtime on the eval samples of each group "
           "(samples = eval samples in the group).", ""]
    for key in keys:
        values = sorted({v for r in with_groups for v in (r["accuracy_by_group"].get(key) or {})})
        out += [f"### {key}", "",
                "| " + " | ".join([_cell(key), "samples"] + [f"{_cell(r.get('name'))} %" for r in with_groups]) + " |",
                "|:---|" + "---:|" * (1 + len(with_groups))]
        for v in values:
            cells = [(r["accuracy_by_group"].get(key) or {}).get(v) for r in with_groups]
            n = next((c["samples"] for c in cells if c), None)
            out.append("| " + " | ".join([_cell(v), DASH if n is None else str(n)]
                                         + [_fmt(c["accuracy"] if c else None, ".2f", 100.0) for c in cells]) + " |")
        out.append("")
    return out


def _plot(rows: list[dict], *, title: str, write) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pts = [
        (str(r.get("name", "?")), _num(r.get("latency_p50_ms")), 100.0 * _num(r.get("accuracy")),
         _num(r.get("weight_bytes_deployed")), str(r.get("format") or ""))
        for r in rows
        if _num(r.get("latency_p50_ms")) is not None and _num(r.get("accuracy")) is not None
    ]
    max_w = max((w for *_, w, _f in pts if w), default=None)
    max_area = 900.0

    def area(w):  # marker area proportional to deployed bytes, with a floor to stay visible
        return 40.0 if not w or not max_w else max(12.0, max_area * w / max_w)

    if pts:
        formats = sorted({p[4] for p in pts})
        colors = {f: f"C{i % 10}" for i, f in enumerate(formats)}
        for name, lat, acc, w, fmt in pts:
            s = area(w)
            ax.scatter([lat], [acc], s=s, color=colors[fmt], alpha=0.55,
                       edgecolors="black", linewidths=0.8, zorder=3)
            off = 0.72 * math.sqrt(s) / 2 + 3  # clear of the marker edge
            ax.annotate(name, (lat, acc), xytext=(off, off), textcoords="offset points",
                        fontsize=8, zorder=4)
        front = _pareto_front([(lat, acc) for _, lat, acc, _, _ in pts])
        handles = [ax.scatter([], [], s=60, color=colors[f], alpha=0.55, edgecolors="black",
                              label=f or "?") for f in formats]
        if len(front) > 1:
            (line,) = ax.plot(*zip(*front), linestyle="--", color="grey", linewidth=1,
                              zorder=2, label="Pareto front")
            handles.append(line)
        leg1 = ax.legend(handles=handles, title="format", loc="upper left",
                         bbox_to_anchor=(1.02, 1.0), fontsize=8, title_fontsize=8)
        ax.add_artist(leg1)
        if max_w:
            refs = sorted({max_w, max_w / 4})
            size_handles = [ax.scatter([], [], s=area(w), color="grey", alpha=0.4,
                                       edgecolors="black", label=f"{w / 1024:,.1f} KB")
                            for w in refs]
            ax.legend(handles=size_handles, title="marker area =\ndeployed weight bytes",
                      loc="lower left", bbox_to_anchor=(1.02, 0.0), fontsize=8,
                      title_fontsize=8, labelspacing=2.2, borderpad=1.2, handletextpad=1.5)
        ax.margins(x=0.15, y=0.15)
    else:
        ax.text(0.5, 0.5, "no rows with both accuracy and latency", ha="center", va="center",
                transform=ax.transAxes)
    skipped = len(rows) - len(pts)
    batches = sorted({r.get("batch") for r in rows if r.get("batch")})
    bdesc = f"batch {batches[0]}" if len(batches) == 1 else "batch 1" if not batches else "mixed batches"
    ax.set_xlabel(f"latency p50, {bdesc} (ms)  —  lower is better")
    lo, hi = ax.get_ylim()
    if hi > 100:
        ax.set_ylim(lo, 101.0)
    ax.set_ylabel("accuracy (%)  —  higher is better")
    ax.set_title(title + (f"\n({skipped} row(s) without accuracy or latency not shown)"
                          if skipped else ""), fontsize=10)
    ax.grid(True, linestyle=":", alpha=0.7, zorder=0)
    fig.savefig(write, format="png", bbox_inches="tight")


def write_report(run_dir: Path, rows: list[dict], *, title: str, precision: dict | None = None,
                 pruning: dict | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``pareto.png`` into ``run_dir`` (atomically).
    ``precision``: the run's precision decision (report.json ``precision``, report.md's section).

    Returns ``{"json": path, "md": path, "png": path}``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in rows]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md",
             "png": run_dir / "pareto.png"}

    doc = json.loads(json.dumps({"title": title, "created": created, "rows": rows,
                                 **({"precision": precision} if precision else {}),
                                 **({"pruning": pruning} if pruning else {})},
                                default=_json_default))  # numpy scalars -> plain values
    text = json.dumps(_plain(doc), indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write(paths["json"], lambda f: f.write((text + "\n").encode()))
    md = render_markdown(rows, title=title, created=created, precision=precision, pruning=pruning)
    atomic_write(paths["md"], lambda f: f.write(md.encode()))
    atomic_write(paths["png"], lambda f: _plot(rows, title=title, write=f))
    return paths

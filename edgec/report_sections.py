"""The report's precision section: what each quantizing stage chose per layer and why.

Every quantizing stage writes its measured decision to ``RUN_DIR/stages/stageN.precision.json``
(:mod:`edgec.mixed_precision`); the exporter records what each conv/linear layer of the compressed
artifact runs at in ``export/model_compressed.check.json`` (``layer_precision``).
:func:`precision_report` reads both (a plain dict, stored as ``precision`` in report.json);
:func:`render_precision` turns it into the Markdown section of report.md: uniform vs chosen speed-up,
the layers not at the stage's uniform precision with their reason and their exported precision,
and the accuracy steps when the stage had a ``max_drop``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["exported_precision", "precision_report", "render_precision"]

DASH = "—"
_STAGE = re.compile(r"stage(\d+)\.precision\.json$")


def precision_report(run_dir: Path, recipe=None) -> dict | None:
    """``{"stages": [decision + stage/method/file], "exported": layer_precision}`` of a run directory, or
    None when it has neither a decision file nor a quantized export."""
    run_dir = Path(run_dir)
    stages = []
    found = sorted(((int(m.group(1)), p) for p in (run_dir / "stages").glob("stage*.precision.json")
                    if (m := _STAGE.search(p.name))), key=lambda t: t[0])
    for i, path in found:
        doc = json.loads(path.read_text())
        method = recipe.stages[i].method if recipe is not None and i < len(recipe.stages) else None
        stages.append({"stage": i, "method": method, "file": str(path.relative_to(run_dir)), **doc})
    check = run_dir / "export" / "model_compressed.check.json"
    exported = (json.loads(check.read_text()).get("layer_precision") or {}) if check.is_file() else {}
    if not stages and not exported:
        return None
    return {"stages": stages, "exported": exported}


def exported_precision(p: dict | None) -> str:
    """One layer's ``layer_precision`` entry as text: ``float``, ``w8 a8``, ``w4 a4 (out 8)``."""
    if not p:
        return DASH
    if p.get("float"):
        return "float"

    def bits(v):
        return DASH if v is None else str(v)

    out = f"w{bits(p.get('weight_bits'))} a{bits(p.get('input_bits'))}"
    ob = p.get("output_bits")
    return out + (f" (out {ob})" if ob is not None and ob != p.get("input_bits") else "")


def _cell(text) -> str:
    return str(DASH if text is None else text).replace("|", "\\|").replace("\n", " ")


def _x(v) -> str:
    return DASH if v is None else f"{float(v):.2f}×"


def _pct(v) -> str:
    return DASH if v is None else f"{100.0 * float(v):.2f}"


def _reason(name: str, choice: str, reasons: dict) -> str:
    if choice == "user":
        return "the recipe's `layers:` override"
    return reasons.get(name) or DASH


def _stage_section(d: dict, exported: dict) -> list[str]:
    layers = d.get("layers") or {}
    bench = d.get("bench") or {}
    where = (f"batch {bench['batch']}, {bench.get('threads', 1)} thread(s)" if bench.get("batch") else
             "the recipe's bench.batch and bench.threads")
    name = f"Stage {d['stage']}" + (f" ({d['method']})" if d.get("method") else "")
    lines = [f"{name}, decision in `{d['file']}`: {_cell(d.get('latency'))}; timed at {where}.", ""]
    nonuni = {n: c for n, c in layers.items() if c != "uniform"}
    measured = d.get("uniform_speedup") is not None
    lines += ["| | uniform | chosen |", "|:---|---:|---:|",
              f"| speed-up vs FP32 (the stage's measurement) | {_x(d.get('uniform_speedup'))} | "
              f"{_x(d.get('chosen_speedup', d.get('uniform_speedup')) if measured else None)} |",
              f"| layers not at the stage's uniform precision | 0 | {len(nonuni)} of {len(layers)} |", ""]
    if d.get("per_layer_rejected"):
        lines += [f"Per-layer choice rejected: {_cell(d['per_layer_rejected'])}.", ""]
    for key, label in (("more_float_skipped", "Not floated further"), ("all_float", "All float")):
        if d.get(key):
            lines += [f"{label}: {_cell(d[key])}.", ""]
    if d.get("norms_float"):
        lines += ["Unfoldable norms left float (`norm_bits` off): with them in int8 the artifact stayed slower "
                  "than FP32.", ""]
    reasons = {o["match"]: o.get("reason") for o in d.get("chosen_overrides") or []}
    slow = {r["layer"]: r for r in d.get("slow_layers") or []}
    if nonuni:
        lines += ["| layer | decision | exported as | reason | int8 µs | float µs |",
                  "|:---|:---|:---|:---|---:|---:|"]
        for n, c in nonuni.items():
            s = slow.get(n, {})
            lines.append(f"| {_cell(n)} | {_cell(c)} | {exported_precision(exported.get(n))} | "
                         f"{_cell(_reason(n, c, reasons))} | {_cell(s.get('int8_us'))} | {_cell(s.get('fp32_us'))} |")
        lines.append("")
    rest = [n for n, c in layers.items() if c == "uniform"]
    if rest:
        groups: dict[str, list[str]] = {}
        for n in rest:
            groups.setdefault(exported_precision(exported.get(n)), []).append(n)
        desc = "; ".join(f"{', '.join(ns)} ({p})" if p != DASH else ", ".join(ns) for p, ns in groups.items())
        lines += [f"At the stage's uniform precision: {_cell(desc)}.", ""]
    lines += _accuracy_steps(d)
    return lines


def _accuracy_steps(d: dict) -> list[str]:
    acc = d.get("accuracy")
    if not acc:
        return []
    tol = (d.get("policy") or {}).get("max_drop")
    lines = [f"Accuracy tolerance: max_drop {tol} (top-1 share vs FP32) on {acc.get('eval_samples', DASH)} "
             f"{_cell(acc.get('data', 'samples'))}; FP32 top-1 {_pct(acc.get('fp32'))} %; "
             f"{'met' if acc.get('met') else 'NOT met (no layer left to promote)'}.", ""]
    if acc.get("judged_on") == "qat_probe":
        lines += [f"Judged after short QAT probes ({_cell(acc.get('probe_share'))} of the stage's training samples "
                  f"each; uniform calibrated, untrained: {_pct(acc.get('calibrated_uniform'))} %): the fewest "
                  "promotions, in sensitivity order, whose probe met it.", "",
                  "| promotions | promoted | top-1 % after the probe | met |", "|---:|:---|---:|:---|"]
        for pr in acc.get("probes") or []:
            lines.append(f"| {len(pr['promoted'])} | {_cell(', '.join(pr['promoted']) or 'none')} | "
                         f"{_pct(pr.get('accuracy'))} | {'yes' if pr.get('met') else 'no'} |")
    else:
        lines += ["| step | promoted | top-1 % | agreement with FP32 % |", "|---:|:---|---:|---:|"]
        for i, s in enumerate(acc.get("steps") or []):
            lines.append(f"| {i} | {_cell(s.get('promoted') or 'none (after the speed step)')} | "
                         f"{_pct(s.get('accuracy'))} | {_pct(s.get('agreement'))} |")
    for key, what in (("after_training", "After the stage's training"),
                      ("after_export", "The exported artifact in ONNX Runtime")):
        after = d.get(key)
        if after:
            lines += ["", f"{what}: top-1 {_pct(after.get('accuracy'))} % on the same samples, drop "
                          f"{_pct(after.get('drop'))} pt: {'within' if after.get('met') else 'ABOVE'} max_drop."]
    return lines + [""]


def render_precision(precision: dict | None) -> list[str]:
    """The ``## Precision`` section of report.md (no lines when ``precision`` is empty)."""
    if not precision or not (precision.get("stages") or precision.get("exported")):
        return []
    exported = precision.get("exported") or {}
    lines = ["## Precision", ""]
    for d in precision.get("stages") or []:
        lines += _stage_section(d, exported)
    if not precision.get("stages"):
        groups: dict[str, list[str]] = {}
        for n, p in exported.items():
            groups.setdefault(exported_precision(p), []).append(n)
        lines += ["No measured precision decision in this run (the stage's `precision:` policy was off). "
                  "Exported: " + _cell("; ".join(f"{', '.join(ns)} ({p})" for p, ns in groups.items())) + ".", ""]
    if precision.get("stages"):
        lines += ["Uniform / chosen speed-ups are the stage's own interleaved measurement of its uniform and chosen "
                  "graphs against FP32 (edgec.mixed_precision) when it chose (a training stage: before it trained); the "
                  "latency table above times the exported artifacts. Exported as = what the layer runs at in "
                  "export/model_compressed.onnx (w = weight bits, a = input activation bits).", ""]
    return lines

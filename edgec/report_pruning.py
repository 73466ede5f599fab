"""The report's channel-pruning section: what each ``prune_channels`` stage removed, round by round, and
(``select: latency``) what one channel of each group was measured to cost on the target.

Read from the run's ``metrics.jsonl``: the stage's ``prune_channels_round`` / ``prune_channels_cost``
events and its closing ``prune_channels`` summary (the last attempt's, after a ``--resume``).
:func:`pruning_report` returns a plain dict (report.json ``pruning``); :func:`render_pruning` the Markdown.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["pruning_report", "render_pruning"]

DASH = "—"


def pruning_report(run_dir: Path) -> dict | None:
    """``{"stages": [{"stage", "summary", "costs"}]}`` or None when no stage pruned channels."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    stages: dict[int, dict] = {}
    costs: dict[int, list] = {}
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "prune_channels_cost":
            costs.setdefault(int(e["stage"]), []).append(e)
        elif e.get("event") == "prune_channels":
            i = int(e["stage"])
            stages[i] = {"stage": i, "summary": e, "costs": costs.pop(i, [])}  # a later attempt replaces it
    if not stages:
        return None
    return {"stages": [stages[i] for i in sorted(stages)]}


def _f(v, spec: str, scale: float = 1.0) -> str:
    return DASH if v is None else format(v * scale, spec)


def render_pruning(doc: dict | None) -> list[str]:
    """The ``## Channel pruning`` section of report.md (no lines without a pruning stage)."""
    if not doc:
        return []
    lines = ["## Channel pruning", ""]
    for st in doc["stages"]:
        s = st["summary"]
        how = f"channels selected by {s.get('select', 'importance')}"
        if s.get("latency_measured_as"):
            how += f", latency measured as {s['latency_measured_as']}"
        lines += [f"Stage {st['stage']} ({how}): MACs {s['macs_before']:,} -> {s['macs_after']:,} "
                  f"({s['macs_ratio']:.3f}), parameters {s['params_before']:,} -> {s['params_after']:,} "
                  f"({s['params_ratio']:.3f}); counted in PyTorch, the table above counts the ONNX graph.", ""]
        rounds = s.get("rounds") or []
        if rounds:
            lines += ["| round | MACs (share of input) | parameters | latency ms | share of input's latency | eval top-1 % |",
                      "|---:|---:|---:|---:|---:|---:|"]
            for r in rounds:
                lines.append(f"| {r['round']} | {r['macs']:,} ({r['macs_ratio']:.3f}) | {r['params']:,} | "
                             f"{_f(r.get('latency_ms'), '.3f')} | {_f(r.get('latency_share'), '.3f')} | "
                             f"{_f(r.get('eval_acc'), '.2f', 100.0)} |")
            lines.append("")
        for c in st["costs"]:
            gains = c.get("us_per_channel") or {}
            paid = [f"{n} {g:.2f}" for n, g in gains.items() if g > 0]
            free = [f"{n} {g:.2f}" for n, g in gains.items() if g <= 0]
            lines.append(f"- Round {c['round']}, us one channel costs ({c['measured_as']}): "
                         + (", ".join(paid) or "none measured positive")
                         + (f"; removing these saved nothing or cost time: {', '.join(free)}" if free else ""))
        if st["costs"]:
            lines += ["", "Cost = the profiled time difference between the model and a copy with every group "
                          "halved, split over each group's layers (edgec.channel_cost); the ranking divides "
                          "importance by it.", ""]
    return lines

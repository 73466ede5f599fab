"""The report's Channel pruning section (edgec.report_pruning) from a run's metrics.jsonl."""
from __future__ import annotations

import json

from edgec.report_pruning import pruning_report, render_pruning


def _summary(macs_after: int, rounds: list[dict]) -> dict:
    return {"stage": 0, "event": "prune_channels", "macs_before": 1000, "macs_after": macs_after, "params_before": 100,
            "params_after": 60, "macs_ratio": macs_after / 1000, "params_ratio": 0.6, "rounds": rounds,
            "select": "latency", "latency_measured_as": "W8A8"}


def test_the_last_attempt_of_a_stage_is_reported_with_its_own_costs(tmp_path):
    first_cost = {"stage": 0, "event": "prune_channels_cost", "round": 1, "measured_as": "W8A8",
                  "us_per_channel": {"a": 9.0}}
    cost = {"stage": 0, "event": "prune_channels_cost", "round": 1, "measured_as": "W8A8",
            "us_per_channel": {"layer2.0.conv1": 0.41, "layer1.0.conv1": -1.0}}
    rounds = [{"round": 1, "macs": 500, "params": 60, "macs_ratio": 0.5, "eval_acc": 0.8123, "latency_ms": 0.2,
               "latency_share": 0.883}]
    lines = [first_cost, _summary(700, []), {"stage": 0, "event": "stage_done"},  # a first attempt, then --resume
             cost, _summary(500, rounds), {"stage": 1, "event": "precision"}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    doc = pruning_report(tmp_path)
    assert len(doc["stages"]) == 1
    st = doc["stages"][0]
    assert st["summary"]["macs_after"] == 500 and st["costs"] == [cost]
    md = "\n".join(render_pruning(doc))
    assert "channels selected by latency, latency measured as W8A8" in md and "1,000 -> 500 (0.500)" in md
    assert "| 1 | 500 (0.500) | 60 | 0.200 | 0.883 | 81.23 |" in md
    assert "layer2.0.conv1 0.41" in md and "cost time: layer1.0.conv1 -1.00" in md


def test_no_pruning_stage_no_section(tmp_path):
    assert pruning_report(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"stage": 0, "event": "stage_done"}) + "\n")
    assert pruning_report(tmp_path) is None and render_pruning(None) == []

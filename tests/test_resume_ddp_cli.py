"""`edgec compress --resume` after a real SIGKILL, and `torchrun -m edgec compress` with 2 CPU processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # compress/torchrun in subprocesses, killed and resumed

RECIPE = """\
version: 1
name: resume-test
stages:
  - method: prune
    target_sparsity: 0.5
    epochs: 2
    batch_size: 64
    optimizer: adam
    lr: 0.001
    weight_decay: 0.0
  - method: qat
    epochs: 3
    batch_size: 64
    optimizer: adam
    lr: 0.0005
    weight_decay: 0.0
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", EDGEC_NO_PROGRESS="1")
    return env


def _cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgec", "compress", "--model", "digits_cnn", "--data", "digits", "--recipe",
            str(recipe), "--out", str(out), "--device", "cpu", "--no-export", *extra]


def _torchrun_compress(port: int, recipe, out: Path, *extra: str, timeout: int = 300) -> None:
    """``torchrun --nproc_per_node=2 -m edgec compress`` on digits_cnn / digits (CPU, no export); must exit 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "edgec", "compress", "--model", "digits_cnn", "--data", "digits", "--recipe", str(recipe),
           "--out", str(out), "--device", "cpu", "--no-export", *extra]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]


def _final(out: Path) -> dict:
    return torch.load(out / "model_final.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    full = subprocess.run(_cmd(recipe, tmp_path / "a"), env=_env(), capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    out = tmp_path / "b"
    proc = subprocess.Popen(_cmd(recipe, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoints" / "stage1.pt"  # first QAT epoch done: stage 0 finished, stage 1 running
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model_final.pt").exists(), "the run finished before it could be killed"

    again = subprocess.run(_cmd(recipe, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to overwrite without --resume
    resumed = subprocess.run(_cmd(recipe, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _final(tmp_path / "a"), _final(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torchrun_two_cpu_processes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("epochs: 2", "epochs: 1").replace("epochs: 3", "epochs: 1"))
    out = tmp_path / "ddp"
    _torchrun_compress(29631, recipe, out)
    state = _final(out)
    assert any(k.endswith("weight_mask") for k in state)
    import json

    run = json.loads((out / "run.json").read_text())
    assert run["identity"]["world_size"] == 2


LATENCY_RECIPE = """\
version: 1
name: ddp-select-latency
stages:
  - method: prune_channels
    target_macs: 0.5
    select: latency
    cost_runs: 20
    latency_runs: 20
    steps: 2
    epochs: 2
    batch_size: 64
    optimizer: adam
    lr: 0.001
  - method: qat
    epochs: 1
    batch_size: 64
"""


def test_torchrun_select_latency_measures_on_rank_0_and_every_rank_prunes_alike(tmp_path):
    """select: latency under DDP: rank 0 profiles (every round) and times (before and after), every rank gets
    its numbers (else the ranks would prune different channels and DDP would fail or hang)."""
    import json

    recipe = tmp_path / "r.yaml"
    recipe.write_text(LATENCY_RECIPE)
    out = tmp_path / "ddp"
    _torchrun_compress(29633, recipe, out)
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    costs = [e for e in events if e.get("event") == "prune_channels_cost"]
    assert len(costs) == 2 and all(c["measured_as"] == "W8A8" for c in costs)  # rank 0 records, once per round
    summary = next(e for e in events if e.get("event") == "prune_channels")
    assert summary["macs_after"] <= 0.5 * summary["macs_before"] and summary["rounds"][-1]["latency_share"] > 0
    state = _final(out)
    assert state["conv2.weight"].shape[0] < 64 or state["conv3.weight"].shape[0] < 64


def test_torchrun_max_drop_probes_on_rank_0_while_the_other_rank_waits(tmp_path):
    """A training stage's max_drop under DDP: rank 0 runs the short QAT probes (single-process training
    on its own, no collectives) while rank 1 waits at the decision's broadcast; both then train with
    the same precision and the run finishes."""
    import json

    from edgec.models import save_weights
    from test_precision import train

    weights = save_weights(train("digits_cnn", epochs=2), tmp_path / "fp32.pt")
    out = tmp_path / "ddp"
    _torchrun_compress(29635, "qat-int8", out, "--weights", str(weights),
                       "--set", "stages.0.weight_bits=3", "--set", "stages.0.act_bits=3", "--set", "stages.0.epochs=1",
                       "--set", "stages.0.max_train_samples=256", "--set", "stages.0.calibration_samples=256",
                       "--set", "stages.0.precision.keep_slow_float=false", "--set", "stages.0.precision.max_drop=0.0",
                       "--set", "stages.0.precision.eval_samples=200", timeout=400)
    doc = json.loads((out / "stages" / "stage0.precision.json").read_text())
    acc = doc["accuracy"]
    assert acc["judged_on"] == "qat_probe" and acc["probes"], acc  # rank 0 really probed
    # after the DDP training: the decision's after_training is the final model's top-1 on its samples
    from test_mixed_precision import _assert_after_training

    _assert_after_training(out, doc)

"""DDP for real: two gloo processes under torchrun on CPU (PLATFORM-NOTES: ~1.3 s start-up)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "ddp_train.py"

pytestmark = [pytest.mark.integration,  # torchrun: two processes training together
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")]


def torchrun(out: Path, *args: str, expect_rc: int = 0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", EDGEC_NO_PROGRESS="1", TORCH_SHOW_CPP_STACKTRACES="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), str(out), *args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    log = p.stdout + p.stderr
    shown = log if len(log) <= 12000 else f"{log[:4000]}\n[...]\n{log[-8000:]}"
    assert (p.returncode == 0) == (expect_rc == 0), f"torchrun exited {p.returncode}:\n{shown}"
    return log


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "full"
    torchrun(out)
    return out


def test_two_ranks_train_to_identical_weights(full_run):
    out = full_run
    r0, r1 = load(out / "rank0.pt"), load(out / "rank1.pt")
    i0, i1 = load(out / "init_rank0.pt"), load(out / "init_rank1.pt")
    assert not torch.equal(i0["0.weight"], i1["0.weight"])  # ranks started apart (DDP broadcasts rank 0)
    assert_same(r0, r1)  # parameters *and* BatchNorm buffers agree at the end
    assert not torch.equal(r0["0.weight"], i0["0.weight"]) and not torch.equal(r0["4.weight"], i0["4.weight"])

    m0 = json.loads((out / "metrics_rank0.json").read_text())
    m1 = json.loads((out / "metrics_rank1.json").read_text())
    assert m0["world_size"] == 2
    # eval is sharded and all-reduced: every rank reports the same numbers over all 100 samples
    for k in ("eval_acc", "eval_loss", "eval_samples", "train_loss", "train_acc"):
        assert m0[k] == m1[k], k
    assert m0["eval_samples"] == 100 and m0["eval_acc"] > 0.8

    # only rank 0 wrote the metrics: one line per epoch, one per log_every=2 of 3*8 steps
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["type"] == "epoch"] == [0, 1, 2]
    assert [r["step"] for r in rows if r["type"] == "step"] == list(range(2, 25, 2))
    ck = load(out / "ckpt.pt")
    assert ck["finished"] and ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert_same(ck["model"], r0)


def test_ddp_resume_matches_uninterrupted_run(full_run, tmp_path):
    full, cut = full_run, tmp_path / "cut"
    # 8 steps per rank per epoch; checkpoints every 3 steps, so the last one is mid-epoch 2 (step 9)
    log = torchrun(cut, "--ckpt-every", "3", "--stop-at-step", "11", expect_rc=3)
    assert "stopped at step 11 on purpose" in log
    ck = load(cut / "ckpt.pt")
    assert (ck["epochs_done"], ck["step_in_epoch"], ck["global_step"]) == (1, 1, 9) and not ck["finished"]
    assert len(ck["aug_rng"]) == 2 and len(ck["rng"]) == 2
    torchrun(cut, "--ckpt-every", "3", "--resume")
    for r in (0, 1):
        assert_same(load(full / f"rank{r}.pt"), load(cut / f"rank{r}.pt"))

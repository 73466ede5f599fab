"""Train the toy problem with DDP through ``edgec.engine.fit`` under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/scripts/ddp_train.py OUT
        [--resume] [--stop-at-step K] [--ckpt-every N] [--epochs N]

(or ``torchrun ... -m tests.scripts.ddp_train OUT`` from the repository root). Every rank starts
from *different* random weights (seeded by rank) so the test sees DDP's initial broadcast at work.
Writes, per rank r: ``OUT/init_rank{r}.pt`` (weights before training), ``OUT/rank{r}.pt`` (final
state_dict) and ``OUT/metrics_rank{r}.json`` (what fit returned); rank 0 alone writes
``OUT/ckpt.pt`` and ``OUT/metrics.jsonl``. ``--stop-at-step K`` raises from a hook at global step
K on every rank (an interrupted run, for resume tests).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from edgec.distributed import init_distributed, shutdown_distributed  # noqa: E402
from edgec.engine import Hooks, TrainConfig, fit  # noqa: E402
from toy_problem import ce_loss, make_data, make_model, noise_augment  # noqa: E402


class Stop(RuntimeError):
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-at-step", type=int)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ckpt-every", type=int, help="also checkpoint every N steps")
    a = ap.parse_args(argv)

    faulthandler.enable(all_threads=True)  # a rank that aborts in C++ still shows where Python was
    dist = init_distributed("cpu")
    clean = False
    try:
        a.out.mkdir(parents=True, exist_ok=True)
        model = make_model(seed=100 + dist.rank)
        torch.save(model.state_dict(), a.out / f"init_rank{dist.rank}.pt")

        def on_step_start(step: int) -> None:
            if a.stop_at_step is not None and step == a.stop_at_step:
                raise Stop(f"stopped at step {step} on purpose")

        cfg = TrainConfig(epochs=a.epochs, batch_size=16, lr=0.05, seed=11, log_every=2, warmup_epochs=0.5,
                          checkpoint_every_steps=a.ckpt_every)
        metrics = fit(
            model, loss_fn=ce_loss, train_set=make_data(256, seed=0), eval_set=make_data(100, seed=1),
            cfg=cfg, ckpt_path=a.out / "ckpt.pt", resume=a.resume, hooks=Hooks(on_step_start=on_step_start),
            augment=noise_augment, metrics_path=a.out / "metrics.jsonl", desc="ddp-toy", dist=dist,
        )
        torch.save(model.state_dict(), a.out / f"rank{dist.rank}.pt")
        (a.out / f"metrics_rank{dist.rank}.json").write_text(json.dumps({**metrics, "world_size": dist.world_size}))
        clean = True
    except Stop as exc:  # every rank stops at the same step: they can still meet at the barrier
        print(f"rank {dist.rank}: {exc}", file=sys.stderr)
        clean = True
        return 3
    finally:
        shutdown_distributed(sync=clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the toy problem with ``edgec.engine.fit`` in its own process (resume tests).

    python tests/scripts/train_toy.py --ckpt C.pt --out final.pt [--resume] [--ckpt-every N]
                                      [--step-sleep S] [--metrics M.jsonl]

Writes the final model state_dict to ``--out``. ``--step-sleep`` slows every step so a test can
kill the process (SIGKILL) after its first checkpoint appears.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from edgec.engine import Hooks, TrainConfig, fit  # noqa: E402
from toy_problem import ce_loss, make_data, make_model, noise_augment  # noqa: E402

EPOCHS = 3


def config(ckpt_every: int | None) -> TrainConfig:
    return TrainConfig(
        epochs=EPOCHS, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
        warmup_epochs=0.5, seed=7, log_every=4, checkpoint_every_steps=ckpt_every,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--metrics", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ckpt-every", type=int)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    a = ap.parse_args(argv)

    model = make_model(seed=3)
    hooks = Hooks(on_step_start=(lambda step: time.sleep(a.step_sleep)) if a.step_sleep else None)
    fit(
        model, loss_fn=ce_loss, train_set=make_data(256, seed=0), eval_set=make_data(128, seed=1),
        cfg=config(a.ckpt_every), ckpt_path=a.ckpt, resume=a.resume, hooks=hooks, augment=noise_augment,
        metrics_path=a.metrics, desc="toy",
    )
    torch.save(model.state_dict(), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

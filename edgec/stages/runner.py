"""Run a recipe's stages in order on one model, resumable: the training half of a compress run.

Each stage: ``prepare`` (structure, calibration) -> ``run`` (the shared engine) -> ``convert``; its
state goes to ``RUN_DIR/stages/stageN.pt`` and ``state.json`` records how many are done, so a
``--resume`` replays the structure of the finished stages, loads the last one's state and continues
inside the unfinished stage from its checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgec.atomic import atomic_torch_save, atomic_write_text

__all__ = ["run_stages"]


def run_stages(model, recipe, *, data, run_dir: Path, dist, teachers: dict[int, Any], resume: bool,
               completed: int, log) -> Any:
    """Run ``recipe.stages[completed:]`` after replaying the first ``completed``; returns the final model."""
    import torch

    from edgec.distributed import barrier, is_main
    from edgec.stages import get_handler
    from edgec.stages.base import StageContext
    from edgec.targets import get_target

    torch.manual_seed(recipe.seed)
    target = get_target(recipe.target)
    model = model.to(dist.device)
    for i, cfg in enumerate(recipe.stages):
        handler = get_handler(cfg.method)
        ctx = StageContext(index=i, data=data, target=target, seed=recipe.seed, run_dir=run_dir, dist=dist,
                           teachers=teachers, resume=resume and i == completed, rebuild=i < completed, log=log,
                           recipe=recipe)
        model = handler.prepare(model, cfg, ctx)
        if i < completed:
            if i == completed - 1:
                model.load_state_dict(torch.load(run_dir / "stages" / f"stage{i}.pt", map_location=dist.device,
                                                 weights_only=True)["model"])
            continue
        log(f"[bold]stage {i}: {cfg.method}[/]")
        metrics = handler.run(model, cfg, ctx)
        model = handler.convert(model, cfg, ctx)
        if is_main():
            atomic_torch_save({"model": model.state_dict()}, run_dir / "stages" / f"stage{i}.pt")
            ctx.record(event="stage_done", method=cfg.method, metrics=metrics)
            atomic_write_text(run_dir / "state.json", json.dumps({"completed": i + 1}))
        barrier()
    if is_main():
        atomic_torch_save({"model": model.state_dict()}, run_dir / "model_final.pt")
    barrier()
    return model

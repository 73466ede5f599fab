"""``prune``: unstructured pruning to a target sparsity on the cubic (AGP) schedule, by an importance
score from edgec.importance (default magnitude)."""
from __future__ import annotations

from edgec import prune as P
from edgec.stages import HANDLERS
from edgec.stages.base import steps_per_epoch, train_stage


def _scores(model, layers, cfg, ctx, step: int):
    """Precomputed scores for ``cfg.importance`` (None: magnitude, computed by update_masks itself)."""
    if cfg.importance == "magnitude":
        return None
    from edgec import importance as I

    batches = None
    if cfg.importance in I.DATA_AWARE:  # seeded by the step: identical on every rank and on resume
        batches = I.sample_batches(ctx.data.train, cfg.importance_batches, cfg.batch_size,
                                   seed=ctx.seed + 1000 * ctx.index + step + 1)
    return I.compute_scores(cfg.importance, model, layers, batches=batches, seed=ctx.seed + ctx.index)


class PruneHandler:
    def prepare(self, model, cfg, ctx):
        layers = P.prunable_layers(model, include_first_last=cfg.prune_first_last)
        P.ensure_masks(layers)
        return model

    def run(self, model, cfg, ctx):
        layers = P.prunable_layers(model, include_first_last=cfg.prune_first_last)
        n = len(ctx.data.train) if cfg.max_train_samples is None else min(cfg.max_train_samples, len(ctx.data.train))
        if cfg.kd is not None and cfg.kd.calibrate:
            n = int(n * (1 - cfg.kd.calibration_fraction))
        total = steps_per_epoch(n, cfg.batch_size, ctx.dist.world_size) * cfg.epochs
        ramp = int(total * cfg.ramp_fraction) if cfg.schedule_kind == "cubic" else 0

        def on_step_start(step: int) -> None:
            if step % cfg.update_every == 0 or step == ramp:
                P.update_masks(layers, P.cubic_sparsity(step, ramp, cfg.target_sparsity), scope=cfg.scope,
                               scores=_scores(model, layers, cfg, ctx, step))
                P.apply_masks(model)

        on_step_start(0)
        metrics = train_stage(model, cfg, ctx, hooks_extra={"on_step_start": on_step_start}, desc="prune")
        return metrics

    def convert(self, model, cfg, ctx):
        if not ctx.rebuild:
            layers = P.prunable_layers(model, include_first_last=cfg.prune_first_last)
            P.update_masks(layers, cfg.target_sparsity, scope=cfg.scope,  # exactly the target
                           scores=_scores(model, layers, cfg, ctx, -1))
            P.apply_masks(model)
        return model


HANDLERS.add("prune", PruneHandler())

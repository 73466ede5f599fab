"""``prune``: unstructured pruning to a target sparsity on the cubic (AGP) schedule, by an importance
score from edgec.importance (default magnitude). With ``target_bytes`` the sparsity is derived from a
size budget of the exported model (edgec.budget).

With ``pattern: "N:M"`` (e.g. ``"2:4"``, edgec.masks for the convention) the stage prunes to N:M
semi-structured sparsity instead, as apex ASP does: the masks are computed once, before training,
from the importance score, and the stage's epochs fine-tune with them held (the sparsity is fixed at
1 - N/M of the eligible layers, so no target is given). Later stages keep the masks (qat/ptq multiply
by ``weight_mask``), and the export verifies the pattern on the exported weights
(edgec.export.sparsity)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgec.stages.config import KD, Optim
from edgec.stages.registry import register_stage

from edgec import masks as P
from edgec.stages.base import steps_per_epoch, train_stage


class PruneStage(Optim):
    """Unstructured pruning to ``target_sparsity`` of the prunable weights, or to a size budget
    ``target_bytes`` (exactly one of the two): bytes of non-zero parameters of the exported model
    at their deployed bit width, as ``edgec bench`` counts them (edgec.budget)."""

    method: Literal["prune"]
    target_sparsity: float | None = Field(None, ge=0, lt=1)
    target_bytes: int | None = Field(
        None, ge=1, description="size budget: bytes of non-zero parameters of the exported model (weights at "
                                "deployed_bits, biases at 32 bits, norms left unfused as exported); the prune "
                                "sparsity is derived from it (edgec.budget)")
    deployed_bits: int = Field(
        8, description="bit width the pruned weights are deployed at: 8 when a quantizing stage follows "
                       "(edgec stores quantized weights in int8), 32 for a float export")
    scope: Literal["global", "layer"] = "global"
    schedule_kind: Literal["cubic", "oneshot"] = Field("cubic", description="cubic = AGP (Zhu & Gupta 2017)")
    ramp_fraction: float = Field(0.75, gt=0, le=1, description="share of the stage's steps over which sparsity ramps")
    update_every: int = Field(16, ge=1, description="recompute masks every k steps")
    prune_first_last: bool = Field(False, description="also prune the first conv and the classifier")
    importance: Literal["magnitude", "taylor", "snip", "fisher", "fisher_w2", "random"] = Field(
        "magnitude", description="importance score (edgec.importance); data-aware ones use importance_batches")
    importance_batches: int = Field(4, ge=1, description="training batches per mask update for data-aware scores")
    pattern: str | None = Field(
        None, description="N:M semi-structured sparsity, e.g. '2:4' (at most N non-zeros in every M consecutive "
                          "input weights, as NVIDIA sparse tensor cores need); masks computed once, then fine-tuned")
    kd: KD | None = None

    @field_validator("pattern", mode="before")
    @classmethod
    def _unquoted_pattern(cls, v):
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124 (so does `--set stages.0.pattern=2:4`)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 60:
            v = f"{v // 60}:{v % 60}"
        if v is not None:
            P.parse_pattern(v)  # ValueError -> a recipe problem at stages.N.pattern
        return v

    @model_validator(mode="after")
    def _one_target(self) -> "PruneStage":
        if self.pattern is not None:
            return self._check_pattern()
        if (self.target_sparsity is None) == (self.target_bytes is None):
            raise ValueError("give exactly one of target_sparsity (share of the prunable weights set to zero) "
                             "and target_bytes (size budget of the exported model in bytes)"
                             + (f"; got both ({self.target_sparsity}, {self.target_bytes})"
                                if self.target_sparsity is not None else ""))
        if self.deployed_bits not in (8, 32):
            raise ValueError(f"deployed_bits must be 8 (quantized export: int8 weights) or 32 (float export), "
                             f"got {self.deployed_bits}")
        return self

    def _check_pattern(self) -> "PruneStage":
        n, m = P.parse_pattern(self.pattern)
        given = [k for k in ("target_sparsity", "target_bytes") if getattr(self, k) is not None]
        if given:
            raise ValueError(f"pattern {self.pattern!r} fixes the sparsity ({m - n} of every {m} weights zero); "
                             f"remove {' and '.join(given)}")
        # a resolved recipe (the run's recipe.yaml) writes every default: only values that differ are refused
        unused = [k for k in ("scope", "schedule_kind", "ramp_fraction", "update_every")
                  if getattr(self, k) != type(self).model_fields[k].default]
        if unused:
            raise ValueError(f"{', '.join(unused)} have no effect with pattern {self.pattern!r} (its masks are "
                             "computed once per layer, then fine-tuned): remove them")
        return self


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


def byte_plan(model, cfg, ctx):
    """The edgec.budget plan for ``cfg.target_bytes`` (None with ``target_sparsity``); structural: the
    same on every rank, on resume and on rebuild."""
    if cfg.target_bytes is None:
        return None
    from edgec.budget import deployment_norm_bits, plan_bytes
    from edgec.capture import example_input

    return plan_bytes(model, target_bytes=cfg.target_bytes, deployed_bits=cfg.deployed_bits,
                      norm_bits=deployment_norm_bits(ctx.recipe), include_first_last=cfg.prune_first_last,
                      example_input=example_input(ctx))


def target_sparsity(model, cfg, ctx) -> float:
    """``cfg.target_sparsity``, or the sparsity that meets ``cfg.target_bytes``."""
    plan = byte_plan(model, cfg, ctx)
    return cfg.target_sparsity if plan is None else plan.target_sparsity


class PruneHandler:
    def prepare(self, model, cfg, ctx):
        layers = P.prunable_layers(model, include_first_last=cfg.prune_first_last)
        P.ensure_masks(layers)
        return model

    def run(self, model, cfg, ctx):
        layers = P.prunable_layers(model, include_first_last=cfg.prune_first_last)
        if cfg.pattern is not None:
            return _run_pattern(model, layers, cfg, ctx)
        n = len(ctx.data.train) if cfg.max_train_samples is None else min(cfg.max_train_samples, len(ctx.data.train))
        if cfg.kd is not None and cfg.kd.calibrate:
            n = int(n * (1 - cfg.kd.calibration_fraction))
        total = steps_per_epoch(n, cfg.batch_size, ctx.dist.world_size) * cfg.epochs
        ramp = int(total * cfg.ramp_fraction) if cfg.schedule_kind == "cubic" else 0
        plan = byte_plan(model, cfg, ctx)
        final = cfg.target_sparsity if plan is None else plan.target_sparsity
        budget = {}
        if plan is not None:
            budget = {"byte_budget": plan.as_dict()}
            ctx.record(event="byte_budget", **plan.as_dict())
            ctx.log(f"size budget {cfg.target_bytes:,} B at {cfg.deployed_bits} bit: fixed "
                    f"{sum(plan.fixed_bytes.values()):,} B ({', '.join(f'{k} {v:,}' for k, v in plan.fixed_bytes.items())}), "
                    f"keep {plan.kept_weights:,} of {plan.prunable_weights:,} prunable weights -> "
                    f"sparsity {plan.target_sparsity:.4f}")

        def on_step_start(step: int) -> None:
            if step % cfg.update_every == 0 or step == ramp:
                P.update_masks(layers, P.cubic_sparsity(step, ramp, final), scope=cfg.scope,
                               scores=_scores(model, layers, cfg, ctx, step))
                P.apply_masks(model)

        on_step_start(0)
        metrics = train_stage(model, cfg, ctx, hooks_extra={"on_step_start": on_step_start}, desc="prune")
        return {**metrics, "target_sparsity": final, **budget}

    def convert(self, model, cfg, ctx):
        if cfg.pattern is not None:  # masks fixed since run(); rebuild reads them from the state_dict
            P.apply_masks(model)
        elif not ctx.rebuild:
            layers = P.prunable_layers(model, include_first_last=cfg.prune_first_last)
            P.update_masks(layers, target_sparsity(model, cfg, ctx), scope=cfg.scope,  # exactly the target
                           scores=_scores(model, layers, cfg, ctx, -1))
            P.apply_masks(model)
        return model


def _run_pattern(model, layers, cfg, ctx) -> dict:
    """N:M masks once (on the eligible layers, from cfg.importance), then fine-tuning with them held."""
    n, m = P.parse_pattern(cfg.pattern)
    eligible = [(name, mod) for name, mod in layers if P.nm_eligible(mod, m)]
    scores = _scores(model, eligible, cfg, ctx, 0) if eligible else None
    patterned, _ = P.update_nm_masks(eligible, n, m, scores=scores)
    dense = [name for name, mod in layers if not P.nm_eligible(mod, m)]
    P.apply_masks(model)
    info = {"pattern": cfg.pattern, "pattern_layers": patterned, "dense_layers": dense}
    ctx.record(event="nm_masks", **info)
    ctx.log(f"{cfg.pattern} sparsity on {len(patterned)} layer(s) by {cfg.importance}"
            + (f"; left dense (input channels not a multiple of {m}): {', '.join(dense)}" if dense else ""))
    metrics = train_stage(model, cfg, ctx, desc=f"prune {cfg.pattern}")
    return {**metrics, "target_sparsity": 1 - n / m, **info}


register_stage("prune", PruneStage, PruneHandler())

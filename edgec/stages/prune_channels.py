"""``prune_channels``: structured pruning that removes whole channels (Torch-Pruning dependency groups),
so the exported graph itself is smaller and faster, to a MAC, parameter or measured-latency budget.

Schedule: ``steps`` rounds of (prune to the round's share of the budget, fine-tune ``epochs / steps``
epochs, optionally with KD from the unpruned input); the last round's fine-tune is the final one.
Each round's budget interpolates MACs (params) linearly from the input's to the target. With
``target_latency_ms`` every round exports the pruned FP32 model to ONNX, measures it in ONNX Runtime
at batch 1 (the run's target providers and ``bench.threads``) and aims the next round's MACs at
``MACs * (budget / latency)``; after ``steps`` rounds it keeps pruning (``max_extra_steps``) until the
budget holds, else stops with BudgetExceeded naming the best latency reached and the accuracy there.

The shrunk architecture goes to ``RUN_DIR/stages/stageN.arch.json`` (edgec.architecture): a replay
(``--resume``, ``edgec export``, ``rebuild_model``) resizes the fresh model to it in ``prepare``.
A ``--resume`` inside this stage restarts it from its input (its rounds change shapes, which the
engine's per-epoch checkpoints do not record).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field, model_validator

from edgec.stages.config import KD, Optim
from edgec.stages.registry import register_stage

from edgec import architecture as A
from edgec import channels as C
from edgec.errors import BudgetExceeded
from edgec.stages.base import train_stage

_IMPORTANCE = Literal["l1", "l2", "bn_scale", "taylor", "magnitude", "snip", "fisher", "fisher_w2", "random"]


class PruneChannelsStage(Optim):
    """Channel pruning to exactly one of ``target_macs``, ``target_params`` (a ratio of the input's
    when <= 1, else an absolute count) or ``target_latency_ms``."""

    method: Literal["prune_channels"]
    target_macs: float | None = Field(None, gt=0, description="MACs of one sample: ratio of the input's (<= 1) or count")
    target_params: float | None = Field(None, gt=0, description="parameters: ratio of the input's (<= 1) or count")
    target_latency_ms: float | None = Field(
        None, gt=0, description="p50 latency of the pruned model's FP32 ONNX export at batch 1 in ONNX Runtime "
                                "(the run's target providers, bench.threads)")
    importance: _IMPORTANCE = Field("l2", description="edgec.channels: l1/l2 group magnitude, bn_scale (network "
                                                      "slimming), taylor, or an edgec.importance score per group")
    scope: Literal["global", "layer"] = Field("global", description="rank channels over all groups or per layer")
    steps: int = Field(3, ge=1, description="prune / fine-tune rounds; epochs are split over them")
    round_to: int | None = Field(None, ge=1, description="keep channel counts multiples of this (8, 16)")
    prune_first_last: bool = Field(False, description="also prune the first layer's outputs (the classifier's "
                                                      "outputs, the classes, always stay)")
    ignore: list[str] = Field(default_factory=list, description="globs of module names whose outputs stay")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1, description="at most this share of one layer's channels goes")
    resolution: int = Field(100, ge=2, description="increments of max_layer_ratio Torch-Pruning prunes in")
    bn_reg: float = Field(1e-5, ge=0, description="bn_scale: L1 penalty on BatchNorm scales during fine-tuning "
                                                  "(network slimming); 0 = none")
    importance_batches: int = Field(4, ge=1, description="training batches for data-aware importance")
    max_extra_steps: int = Field(4, ge=0, description="target_latency_ms: rounds beyond `steps` before giving up")
    latency_runs: int = Field(200, ge=10, description="target_latency_ms: timed calls per measurement")
    kd: KD | None = None

    @model_validator(mode="after")
    def _one_target(self) -> "PruneChannelsStage":
        given = [k for k in ("target_macs", "target_params", "target_latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of target_macs, target_params (ratio of the input's when <= 1, "
                             "else a count) and target_latency_ms" + (f"; got {', '.join(given)}" if given else ""))
        return self


def _absolute(value: float, base: int) -> float:
    return value * base if value <= 1 else value


class _Pruning:
    """One stage run's pruner, example input and bookkeeping."""

    def __init__(self, model, cfg, ctx):
        from edgec.capture import example_input
        from edgec.importance import sample_batches

        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.example = example_input(ctx, batch=1).to(ctx.device)
        self.macs0, self.params0 = C.count(model, self.example)

        def batches(step: int):
            return sample_batches(ctx.data.train, cfg.importance_batches, cfg.batch_size,
                                  seed=ctx.seed + 1000 * ctx.index + step + 1)

        self.batches = batches
        ignored, self.protected = C.protected_layers(model, self.example, prune_first_last=cfg.prune_first_last,
                                                     ignore=cfg.ignore)
        self.importance = C.make_importance(cfg.importance, batches_fn=batches, seed=ctx.seed + ctx.index)
        self.pruner = C.build_pruner(model, self.example, self.importance, ignored=ignored,
                                     global_pruning=cfg.scope == "global", round_to=cfg.round_to,
                                     max_layer_ratio=cfg.max_layer_ratio, resolution=cfg.resolution,
                                     bn_reg=cfg.bn_reg if cfg.importance == "bn_scale" and cfg.bn_reg > 0 else None)
        self.rounds: list[dict] = []

    def refresh(self, step: int) -> None:
        if self.cfg.importance == "taylor":
            C.taylor_gradients(self.model, self.batches(step), self.ctx.device)
        elif isinstance(self.importance, C.RegistryImportance):
            self.importance.refresh(self.model, step)

    def prune_to(self, *, macs: float | None = None, params: float | None = None) -> bool:
        def holds(m, p):
            return (macs is None or m <= macs) and (params is None or p <= params)

        _, _, held = C.prune_until(self.pruner, self.model, self.example, holds, refresh=self.refresh)
        return held

    def fine_tune(self, epochs: int) -> dict:
        if epochs == 0:
            return {}
        cfg = self.cfg.model_copy(update={"epochs": epochs})
        ctx = dataclasses.replace(self.ctx, resume=False)
        extra = {}
        if type(self.pruner).__name__ == "BNScalePruner":  # network slimming: L1 on the BatchNorm scales
            extra["after_backward"] = lambda: self.pruner.regularize(self.model)
        return train_stage(self.model, cfg, ctx, hooks_extra=extra, desc="prune_channels")

    def note(self, rnd: int, metrics: dict, latency_ms: float | None = None) -> dict:
        macs, params = C.count(self.model, self.example)
        row = {"round": rnd, "macs": macs, "params": params, "macs_ratio": macs / self.macs0,
               "eval_acc": metrics.get("eval_acc"), "latency_ms": latency_ms}
        self.rounds.append(row)
        self.ctx.record(event="prune_channels_round", **row)
        self.ctx.log(f"channel pruning round {rnd}: MACs {macs:,} ({macs / self.macs0:.3f} of input), params "
                     f"{params:,}" + (f", latency {latency_ms:.3f} ms" if latency_ms is not None else "")
                     + (f", eval acc {row['eval_acc']:.4f}" if row["eval_acc"] is not None else ""))
        return row


def _epoch_split(epochs: int, steps: int) -> list[int]:
    base, extra = divmod(epochs, steps)
    return [base + (1 if i >= steps - extra else 0) for i in range(steps)]


def _measure_latency(model, cfg, ctx) -> float:
    """p50 ms of the model's FP32 ONNX export at batch 1 in ORT (the run's providers and threads)."""
    import tempfile
    from pathlib import Path

    from edgec.bench.latency import bench
    from edgec.export.onnx_export import export_onnx

    threads = ctx.recipe.bench.threads if ctx.recipe is not None else 1
    with tempfile.TemporaryDirectory(prefix="edgec-prune-lat-") as tmp:
        out = Path(tmp) / "pruned.onnx"
        export_onnx(model.cpu().eval(), tuple(ctx.data.input_shape), out)
        model.to(ctx.device)
        res = bench(out, threads=threads, batch=1, warmup=20, runs=cfg.latency_runs,
                    providers=list(ctx.target.ort_providers))
    return float(res["latency_ms"]["p50"])


def _run_budget(pr: _Pruning, cfg, target_macs: float | None, target_params: float | None) -> None:
    split = _epoch_split(cfg.epochs, cfg.steps)
    for k in range(1, cfg.steps + 1):
        goal_m = None if target_macs is None else pr.macs0 - (pr.macs0 - target_macs) * k / cfg.steps
        goal_p = None if target_params is None else pr.params0 - (pr.params0 - target_params) * k / cfg.steps
        held = pr.prune_to(macs=goal_m, params=goal_p)
        pr.note(k, pr.fine_tune(split[k - 1]))
        if not held:
            pr.ctx.log(f"[yellow]channel pruning reached its floor (max_layer_ratio {cfg.max_layer_ratio} of every "
                       "prunable layer) before the budget[/]")
            break


def _run_latency(pr: _Pruning, cfg, ctx) -> None:
    budget = cfg.target_latency_ms
    lat = _measure_latency(pr.model, cfg, ctx)
    pr.note(0, {}, lat)
    split = _epoch_split(cfg.epochs, cfg.steps)
    k, floor = 0, False
    while lat > budget and not floor and k < cfg.steps + cfg.max_extra_steps:
        k += 1
        left = max(cfg.steps - k + 1, 1)
        macs, _ = C.count(pr.model, pr.example)
        goal = macs * (budget / lat) ** (1.0 / left) * (0.95 if k > cfg.steps else 1.0)
        floor = not pr.prune_to(macs=goal)
        metrics = pr.fine_tune(split[k - 1] if k <= cfg.steps else split[-1])
        lat = _measure_latency(pr.model, cfg, ctx)
        pr.note(k, metrics, lat)
    if lat > budget:
        best = min(pr.rounds, key=lambda r: r["latency_ms"])
        acc = best["eval_acc"]
        raise BudgetExceeded(
            f"channel pruning did not reach target_latency_ms={budget} in {k} rounds: the best was "
            f"{best['latency_ms']:.3f} ms (round {best['round']}, MACs {best['macs_ratio']:.3f} of the input, eval "
            f"accuracy {'n/a' if acc is None else f'{acc:.4f}'})"
            + (" and the pruning floor was reached" if floor else ""),
            hint="raise target_latency_ms, raise max_layer_ratio / max_extra_steps, measure with more "
                 "bench.threads, or add a quantizing stage and budget the int8 artifact with `edgec bench --budget-ms`")


class PruneChannelsHandler:
    def prepare(self, model, cfg, ctx):
        if ctx.rebuild:  # replay: the fresh model takes the shrunk shapes, load_state_dict the values
            A.apply(model, A.load(A.stage_path(ctx.run_dir, ctx.index)))
        return model

    def run(self, model, cfg, ctx):
        pr = _Pruning(model, cfg, ctx)
        ctx.log(f"channel pruning ({cfg.importance}, {cfg.scope}, {cfg.steps} rounds): input MACs {pr.macs0:,}, "
                f"params {pr.params0:,}; kept: {', '.join(pr.protected)}")
        if cfg.target_latency_ms is not None:
            _run_latency(pr, cfg, ctx)
        else:
            _run_budget(pr, cfg, None if cfg.target_macs is None else _absolute(cfg.target_macs, pr.macs0),
                        None if cfg.target_params is None else _absolute(cfg.target_params, pr.params0))
        macs, params = C.count(model, pr.example)
        summary = {"macs_before": pr.macs0, "macs_after": macs, "params_before": pr.params0, "params_after": params,
                   "macs_ratio": macs / pr.macs0, "params_ratio": params / pr.params0, "rounds": pr.rounds}
        ctx.record(event="prune_channels", **summary)
        ctx.log(f"channel pruning done: MACs {pr.macs0:,} -> {macs:,} ({macs / pr.macs0:.3f}), params "
                f"{pr.params0:,} -> {params:,} ({params / pr.params0:.3f})")
        if ctx.dist.rank == 0:
            A.save(model, A.stage_path(ctx.run_dir, ctx.index))
        pr.pruner = None  # drop Torch-Pruning's graph (it holds references to the modules)
        return {**(pr.rounds[-1] if pr.rounds else {}), **summary}

    def convert(self, model, cfg, ctx):
        return model


register_stage("prune_channels", PruneChannelsStage, PruneChannelsHandler())

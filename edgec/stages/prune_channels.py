"""``prune_channels``: structured pruning that removes whole channels (Torch-Pruning dependency groups),
so the exported graph itself is smaller and faster, to a MAC, parameter or measured-latency budget.

Schedule: ``steps`` rounds of (prune to the round's share of the budget, fine-tune ``epochs / steps``
epochs, optionally with KD from the unpruned input); the last round's fine-tune is the final one.
Each round's budget interpolates MACs (params) linearly from the input's to the target. With
``target_latency_ms`` every round exports the pruned FP32 model to ONNX, measures it in ONNX Runtime
at batch 1 (the run's target providers and ``bench.threads``) and aims the next round's MACs at
``MACs * (budget / latency)``; after ``steps`` rounds it keeps pruning (``max_extra_steps``) until the
budget holds, else stops with BudgetExceeded naming the best latency reached and the accuracy there.
``target_latency_ratio`` is the same budget as a share of the input model's latency, measured the same way.

What is measured (``measure_as``): ``auto`` times the artifact the run deploys -- the recipe's quantizing
stage's graph, calibrated on a few training batches, when a quantizing stage follows (int8 kernels scale
with channels very differently from float ones), the FP32 export otherwise.

Which channels go (``select``): ``importance`` ranks by the importance score alone (Torch-Pruning);
``latency`` divides every group's score by the microseconds one of its channels measurably costs on the
target at that precision (:mod:`edgec.channel_cost`, re-measured at the start of every round), so the
budget is spent where removing channels saves time.

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
from edgec import channel_cost as K
from edgec import channels as C
from edgec.errors import BudgetExceeded
from edgec.importance import sample_batches
from edgec.stages.base import train_stage

_TARGETS = ("target_macs", "target_params", "target_latency_ms", "target_latency_ratio")
_IMPORTANCE = Literal["l1", "l2", "bn_scale", "taylor", "magnitude", "snip", "fisher", "fisher_w2", "random"]


class PruneChannelsStage(Optim):
    """Channel pruning to exactly one of ``target_macs``, ``target_params`` (a ratio of the input's
    when <= 1, else an absolute count) or ``target_latency_ms``."""

    method: Literal["prune_channels"]
    target_macs: float | None = Field(None, gt=0, description="MACs of one sample: ratio of the input's (<= 1) or count")
    target_params: float | None = Field(None, gt=0, description="parameters: ratio of the input's (<= 1) or count")
    target_latency_ms: float | None = Field(
        None, gt=0, description="p50 latency of the pruned model's export (measure_as) at batch 1 in ONNX Runtime "
                                "(the run's target providers, bench.threads)")
    target_latency_ratio: float | None = Field(
        None, gt=0, lt=1, description="target_latency_ms as a share of the input model's latency, measured the same way")
    measure_as: Literal["auto", "fp32", "quantized"] = Field(
        "auto", description="latency of the FP32 export or of the recipe's quantized graph (calibrated on a few "
                            "training batches); auto: quantized when a quantizing stage follows")
    select: Literal["importance", "latency"] = Field(
        "importance", description="latency: each group's importance divided by the measured time one of its "
                                  "channels costs on the target (edgec.channel_cost)")
    cost_slim: float = Field(0.5, gt=0, lt=1, description="select: latency: the share of every group's channels the "
                                                         "slimmed copy it is measured against lacks")
    cost_runs: int = Field(100, ge=10, description="select: latency: profiled calls per measurement")
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
        given = [k for k in _TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of target_macs, target_params (ratio of the input's when <= 1, "
                             "else a count), target_latency_ms and target_latency_ratio"
                             + (f"; got {', '.join(given)} (unset one with --set stages.N.{given[0]}=null)"
                                if len(given) > 1 else ""))
        return self

    @property
    def latency_target(self) -> bool:
        return self.target_latency_ms is not None or self.target_latency_ratio is not None


def _absolute(value: float, base: int) -> float:
    return value * base if value <= 1 else value


class _Pruning:
    """One stage run's pruner, example input and bookkeeping."""

    def __init__(self, model, cfg, ctx):
        from edgec.capture import example_input

        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.example = example_input(ctx, batch=1).to(ctx.device)
        self.macs0, self.params0 = C.count(model, self.example)

        def batches(step: int):
            return sample_batches(ctx.data.train, cfg.importance_batches, cfg.batch_size,
                                  seed=ctx.seed + 1000 * ctx.index + step + 1)

        self.batches = batches
        ignored, self.protected = C.protected_layers(model, self.example, prune_first_last=cfg.prune_first_last,
                                                     ignore=cfg.ignore)
        self.inner = C.make_importance(cfg.importance, batches_fn=batches, seed=ctx.seed + ctx.index)
        self.importance = K.LatencyAwareImportance(self.inner) if cfg.select == "latency" else self.inner
        self.spec = _deployed_spec(cfg, ctx)
        self.calib = ([] if self.spec is None else
                      sample_batches(ctx.data.train, 4, min(cfg.batch_size, 64), seed=ctx.seed + 77 + ctx.index))
        self.pruner = C.build_pruner(model, self.example, self.importance, ignored=ignored,
                                     global_pruning=cfg.scope == "global", round_to=cfg.round_to,
                                     max_layer_ratio=cfg.max_layer_ratio, resolution=cfg.resolution,
                                     bn_reg=cfg.bn_reg if cfg.importance == "bn_scale" and cfg.bn_reg > 0 else None)
        self.rounds: list[dict] = []
        self.input_artifact = None  # the input's export, for target_latency_ratio's interleaved comparisons

    @property
    def measured_as(self) -> str:
        return "fp32" if self.spec is None else f"W{self.spec.weight_bits}A{self.spec.act_bits}"

    def refresh(self, step: int) -> None:
        if self.cfg.importance == "taylor":
            C.taylor_gradients(self.model, self.batches(step), self.ctx.device)
        elif isinstance(self.inner, C.RegistryImportance):
            self.inner.refresh(self.model, step)

    def export(self, model, path):
        """``model`` as the run deploys it (``measure_as``), written to ``path``."""
        return K.deployed_export(model, tuple(self.ctx.data.input_shape), path, spec=self.spec,
                                 target=self.ctx.target, calib=self.calib)

    def measure_gains(self, rnd: int) -> None:
        """select: latency -- what one channel of every group costs now (rank 0 measures, every rank uses it)."""
        from edgec import distributed as D

        if self.cfg.select != "latency":
            return
        res = None
        if self.ctx.dist.rank == 0:
            res = K.group_gains(self.pruner, self.model, self.example, self.protected, export=self.export,
                                threads=_threads(self.ctx), providers=list(self.ctx.target.ort_providers),
                                runs=self.cfg.cost_runs, slim=self.cfg.cost_slim, round_to=self.cfg.round_to)
            self.model.to(self.ctx.device)
        res = D.broadcast_object(res)
        roots = {n: m for m, n in K.root_names(self.pruner, self.model).items()}
        self.importance.set_gains({roots[n]: g for n, g in res["gains"].items() if n in roots},
                                  {roots[n]: v for n, v in res["noise"].items() if n in roots})
        gains = {n: round(g, 3) for n, g in sorted(res["gains"].items(), key=lambda kv: -kv[1])}
        self.ctx.record(event="prune_channels_cost", round=rnd, measured_as=self.measured_as, us_per_channel=gains,
                        noise_us_per_channel={n: round(v, 3) for n, v in res["noise"].items()}, run_us=res["run_us"])
        shown = ", ".join(f"{n} {g:.2f}" for n, g in gains.items())
        self.ctx.log(f"channel cost ({self.measured_as}, us per channel, round {rnd}): {shown}")

    def prune_to(self, *, macs: float | None = None, params: float | None = None, rnd: int = 0) -> bool:
        def holds(m, p):
            return (macs is None or m <= macs) and (params is None or p <= params)

        self.measure_gains(rnd)
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

    def note(self, rnd: int, metrics: dict, latency_ms: float | None = None, share: float | None = None) -> dict:
        macs, params = C.count(self.model, self.example)
        acc = metrics.get("eval_acc")
        if acc is None and latency_ms is not None and self.ctx.data.eval is not None:  # the error names it
            from edgec.engine.evaluation import evaluate

            acc = evaluate(self.model, self.ctx.data.eval, device=self.ctx.device)["accuracy"]
        row = {"round": rnd, "macs": macs, "params": params, "macs_ratio": macs / self.macs0,
               "eval_acc": acc, "latency_ms": latency_ms, "latency_share": share}
        self.rounds.append(row)
        self.ctx.record(event="prune_channels_round", **row)
        self.ctx.log(f"channel pruning round {rnd}: MACs {macs:,} ({macs / self.macs0:.3f} of input), params "
                     f"{params:,}" + (f", latency {latency_ms:.3f} ms" if latency_ms is not None else "")
                     + (f" ({share:.3f} of the input's, interleaved)" if share is not None and rnd else "")
                     + (f", eval acc {row['eval_acc']:.4f}" if row["eval_acc"] is not None else ""))
        return row


def _epoch_split(epochs: int, steps: int) -> list[int]:
    base, extra = divmod(epochs, steps)
    return [base + (1 if i >= steps - extra else 0) for i in range(steps)]


def _threads(ctx) -> int:
    return ctx.recipe.bench.threads if ctx.recipe is not None else 1


def _deployed_spec(cfg, ctx):
    """The QuantSpec the latency is measured at (None: the FP32 export), from ``measure_as``."""
    from edgec.stages import quantizing_methods

    if cfg.measure_as == "fp32" or (cfg.select != "latency" and not cfg.latency_target):
        return None
    later = [] if ctx.recipe is None else [s for s in ctx.recipe.stages[ctx.index + 1:]
                                           if s.method in quantizing_methods()]
    if not later:  # measure_as: quantized without one is refused when the recipe is validated
        return None
    from edgec.sensitivity import quant_spec_of

    return quant_spec_of(ctx.recipe)


def _p50(pr: "_Pruning", path) -> float:
    """p50 ms of ``path`` at batch 1 in ORT (the run's providers and threads)."""
    from edgec.bench.latency import bench

    res = bench(path, threads=_threads(pr.ctx), batch=1, warmup=20, runs=pr.cfg.latency_runs,
                providers=list(pr.ctx.target.ort_providers))
    return float(res["latency_ms"]["p50"])


def _measure_input(pr: "_Pruning") -> float:
    """p50 ms of the unpruned model's export (``measure_as``); the export is kept for the later
    interleaved comparisons. Rank 0 measures, every rank gets the number."""
    import tempfile
    from pathlib import Path

    from edgec import distributed as D

    lat = None
    if pr.ctx.dist.rank == 0:
        pr.input_artifact = Path(tempfile.mkdtemp(prefix="edgec-prune-lat-")) / "input.onnx"
        pr.export(pr.model, pr.input_artifact)
        pr.model.to(pr.ctx.device)
        lat = _p50(pr, pr.input_artifact)
    return float(D.broadcast_object(lat))


def _measure_latency(pr: "_Pruning", lat0: float) -> tuple[float, float | None]:
    """(p50 ms, share of the input's latency) of the pruned model's export (``measure_as``); rank 0
    measures, every rank gets the numbers.

    The share is measured against the input's export in one interleaved run
    (:func:`edgec.bench.compare.compare_latency`, 3 rounds) and the latency is ``lat0`` x that share, so a
    loaded machine moves both sides alike; for ``target_latency_ms`` the pruned export is timed alone."""
    import tempfile
    from pathlib import Path

    from edgec import distributed as D
    from edgec.bench.compare import compare_latency

    out = None
    if pr.ctx.dist.rank == 0:
        with tempfile.TemporaryDirectory(prefix="edgec-prune-lat-") as tmp:
            path = pr.export(pr.model, Path(tmp) / "pruned.onnx")
            pr.model.to(pr.ctx.device)
            if pr.cfg.target_latency_ms is not None:
                out = (_p50(pr, path), None)
            else:
                cmp = compare_latency({"input": pr.input_artifact, "pruned": path}, threads=_threads(pr.ctx), batch=1,
                                      warmup=10, runs=pr.cfg.latency_runs, rounds=3,
                                      providers=list(pr.ctx.target.ort_providers))
                share = 1.0 / cmp["speedup_vs_first"]["pruned"]["median"]
                out = (lat0 * share, share)
    lat, share = D.broadcast_object(out)
    return float(lat), share


def _run_budget(pr: _Pruning, cfg, target_macs: float | None, target_params: float | None) -> None:
    split = _epoch_split(cfg.epochs, cfg.steps)
    for k in range(1, cfg.steps + 1):
        goal_m = None if target_macs is None else pr.macs0 - (pr.macs0 - target_macs) * k / cfg.steps
        goal_p = None if target_params is None else pr.params0 - (pr.params0 - target_params) * k / cfg.steps
        held = pr.prune_to(macs=goal_m, params=goal_p, rnd=k)
        pr.note(k, pr.fine_tune(split[k - 1]))
        if not held:
            pr.ctx.log(f"[yellow]channel pruning reached its floor (max_layer_ratio {cfg.max_layer_ratio} of every "
                       "prunable layer) before the budget[/]")
            break


def _next_macs(rounds: list[dict], goal_ms: float, left: int) -> float:
    """The MACs to prune to for a latency of ``goal_ms``: along the secant of the last two measured
    rounds (latency vs MACs), else -- no usable slope yet, or a measured one that is flat or noisy --
    MACs scaled by (goal / latency) ** (1 / rounds left). Never more than 30 % of the MACs at once (a
    slope read from two noisy latencies can point far beyond what one round of fine-tuning recovers
    from), never less than 2 %."""
    last = rounds[-1]
    macs, lat = last["macs"], last["latency_ms"]
    goal = macs * (goal_ms / lat) ** (1.0 / max(left, 1))
    if len(rounds) >= 2:
        prev = rounds[-2]
        dm, dl = prev["macs"] - macs, prev["latency_ms"] - lat
        if dm > 0 and dl > 0:
            goal = macs - (lat - goal_ms) * dm / dl
    return min(max(goal, 0.7 * macs), 0.98 * macs)


def _run_latency(pr: _Pruning, cfg, ctx) -> None:
    lat = lat0 = _measure_input(pr)
    pr.note(0, {}, lat)
    budget = cfg.target_latency_ms if cfg.target_latency_ms is not None else cfg.target_latency_ratio * lat
    if cfg.target_latency_ratio is not None:
        ctx.log(f"latency budget: {cfg.target_latency_ratio} x {lat:.3f} ms = {budget:.3f} ms ({pr.measured_as})")
    split = _epoch_split(cfg.epochs, cfg.steps)
    k, floor = 0, False
    while lat > budget and not floor and k < cfg.steps + cfg.max_extra_steps:
        k += 1
        goal_ms = budget if k >= cfg.steps else lat0 - (lat0 - budget) * k / cfg.steps  # linear in latency
        floor = not pr.prune_to(macs=_next_macs(pr.rounds, goal_ms, cfg.steps - k + 1), rnd=k)
        metrics = pr.fine_tune(split[k - 1] if k <= cfg.steps else split[-1])
        lat, share = _measure_latency(pr, lat0)
        pr.note(k, metrics, lat, share)
    if lat > budget:
        what = (f"target_latency_ms={cfg.target_latency_ms}" if cfg.target_latency_ms is not None else
                f"target_latency_ratio={cfg.target_latency_ratio} ({budget:.3f} ms)") + f", measured as {pr.measured_as},"
        best = min(pr.rounds, key=lambda r: r["latency_ms"])
        acc = best["eval_acc"]
        raise BudgetExceeded(
            f"channel pruning did not reach {what} in {k} rounds: the best was "
            f"{best['latency_ms']:.3f} ms (round {best['round']}, MACs {best['macs_ratio']:.3f} of the input, eval "
            f"accuracy {'n/a' if acc is None else f'{acc:.4f}'})"
            + (" and the pruning floor was reached" if floor else ""),
            hint="raise the budget (target_latency_ms / target_latency_ratio), raise max_layer_ratio / max_extra_steps"
                 + (", try select: latency (channels chosen by their measured cost)" if cfg.select != "latency" else "")
                 + ", or measure with more bench.threads; the report of a run with a MAC target shows what "
                   "pruning buys on this target (select: latency measures it)")


def _say_speed(pr: _Pruning, lat0: float) -> None:
    """select: latency under a MAC / parameter budget: measure what the pruning bought at the deployed
    precision (interleaved against the input), keep it on the last round, and say when it bought nothing."""
    lat, share = _measure_latency(pr, lat0)
    last = pr.rounds[-1]
    last.update(latency_ms=lat, latency_share=share)
    pr.ctx.log(f"channel pruning: {pr.measured_as} latency {lat0:.3f} -> {lat:.3f} ms ({share:.3f} of the input's, "
               "interleaved)")
    if share > 0.98:
        pr.ctx.log(f"[yellow]channel pruning made the {pr.measured_as} graph no faster on this target ({share:.3f} of "
                   "the input's latency): the model got smaller, not faster; int8 alone (qat-int8 / ptq-int8) may "
                   "serve as well, or give target_latency_ratio to prune until it is faster[/]")


class PruneChannelsHandler:
    def prepare(self, model, cfg, ctx):
        if ctx.rebuild:  # replay: the fresh model takes the shrunk shapes, load_state_dict the values
            A.apply(model, A.load(A.stage_path(ctx.run_dir, ctx.index)))
        return model

    def run(self, model, cfg, ctx):
        pr = _Pruning(model, cfg, ctx)
        ctx.log(f"channel pruning ({cfg.importance}, {cfg.scope}, {cfg.steps} rounds): input MACs {pr.macs0:,}, "
                f"params {pr.params0:,}; kept: {', '.join(pr.protected)}")
        try:
            if cfg.latency_target:
                _run_latency(pr, cfg, ctx)
            else:
                lat0 = _measure_input(pr) if cfg.select == "latency" else None
                _run_budget(pr, cfg, None if cfg.target_macs is None else _absolute(cfg.target_macs, pr.macs0),
                            None if cfg.target_params is None else _absolute(cfg.target_params, pr.params0))
                if lat0 is not None:
                    _say_speed(pr, lat0)
        finally:  # the input's export, also when the budget was not reached
            if pr.input_artifact is not None:
                import shutil

                shutil.rmtree(pr.input_artifact.parent, ignore_errors=True)
        macs, params = C.count(model, pr.example)
        timed = cfg.latency_target or cfg.select == "latency"
        summary = {"macs_before": pr.macs0, "macs_after": macs, "params_before": pr.params0, "params_after": params,
                   "macs_ratio": macs / pr.macs0, "params_ratio": params / pr.params0, "rounds": pr.rounds,
                   "select": cfg.select, "latency_measured_as": pr.measured_as if timed else None}
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

"""``fit``: set up -> restore -> per epoch (train steps, evaluate, checkpoint) -> final metrics."""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from edgec import distributed as D
from edgec.distributed import DistContext
from edgec.engine.batches import _augment_seed, _batches_of, _chunk
from edgec.engine.checkpoint import non_finite_names, restore, save_checkpoint
from edgec.engine.config import Augment, EvalFn, Hooks, LossFn, TrainConfig, _cfg_dict, config_fingerprint
from edgec.engine.evaluation import _eval_sums, _sums_to_metrics
from edgec.engine.optim import _make_optimizer, _make_scheduler, _param_groups
from edgec.engine.progress import _clean, _Progress, _progress_enabled
from edgec.engine.state import RUNNING_KEYS, WINDOW_KEYS, Run
from edgec.errors import InputError, TrainingError


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def fit(
    model: nn.Module,
    *,
    loss_fn: LossFn,
    train_set: Dataset,
    eval_set: Dataset | None,
    cfg: TrainConfig,
    ckpt_path: Path | None,
    resume: bool = False,
    hooks: Hooks | None = None,
    augment: Augment | None = None,
    params: Iterable[Any] | None = None,
    extra_state: dict[str, nn.Module] | None = None,
    metrics_path: Path | None = None,
    desc: str = "train",
    dist: DistContext | None = None,
    eval_fn: EvalFn | None = None,
) -> dict:
    """Train ``model`` in place and return the final metrics.

    ``loss_fn(model_or_ddp, x, y) -> (loss, logits)`` must call ``model_or_ddp`` (the DDP wrapper
    under torchrun) for the forward pass; ``logits`` may be None when accuracy makes no sense.
    ``params`` (parameters or param-group dicts) restricts what the optimizer trains.
    ``extra_state`` modules are moved to the device and checkpointed/restored with the model.
    With ``resume=True`` and a checkpoint at ``ckpt_path`` the run continues where it stopped; a
    finished checkpoint returns its saved metrics at once (after loading its weights).

    Returns ``{"epoch", "step", "train_loss", "train_acc", "lr", "eval_acc", "eval_loss", ...,
    "best_eval_acc", "best_epoch"}``; eval keys are absent when there is no ``eval_set``.
    Raises TrainingError on a non-finite loss, InputError on a checkpoint that does not fit.
    """
    run = _setup(
        model, loss_fn=loss_fn, train_set=train_set, eval_set=eval_set, cfg=cfg, ckpt_path=ckpt_path,
        hooks=hooks, augment=augment, params=params, extra_state=extra_state, metrics_path=metrics_path,
        desc=desc, dist=dist, eval_fn=eval_fn,
    )
    finished = restore(run, resume)
    if finished is not None:
        return finished
    _wrap_ddp(run)

    final: dict = dict(run.history[-1]) if run.history else {}
    progress_on = _progress_enabled(run.dist)
    model.train()
    for epoch in range(run.start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        _train_epoch(run, epoch, progress_on)
        final = _end_epoch(run, epoch, t0)
    return final


# --------------------------------------------------------------------------------------------
# set-up (nothing here depends on a checkpoint)


def _setup(
    model: nn.Module,
    *,
    loss_fn: LossFn,
    train_set: Dataset,
    eval_set: Dataset | None,
    cfg: TrainConfig,
    ckpt_path: Path | None,
    hooks: Hooks | None,
    augment: Augment | None,
    params: Iterable[Any] | None,
    extra_state: dict[str, nn.Module] | None,
    metrics_path: Path | None,
    desc: str,
    dist: DistContext | None,
    eval_fn: EvalFn | None,
) -> Run:
    """Check the inputs, move the model, lay out the data, build optimizer / schedule / scaler."""
    hooks = hooks or Hooks()
    ckpt_path = Path(ckpt_path) if ckpt_path is not None else None
    metrics_path = Path(metrics_path) if metrics_path is not None else None
    if dist is None:
        dist = DistContext(rank=0, world_size=1, local_rank=0, device=_model_device(model))
    device = torch.device(dist.device)
    ddp = dist.world_size > 1
    if ddp and not D.is_initialized():
        raise InputError(
            "dist.world_size > 1 but no process group is initialised",
            hint="call edgec.distributed.init_distributed() first (under torchrun)",
        )
    extra_state = dict(extra_state or {})
    use_amp = bool(cfg.amp) and device.type == "cuda"

    n_train = len(train_set)  # type: ignore[arg-type]
    if n_train == 0:
        raise InputError("the training set is empty")

    model.to(device)
    for m in extra_state.values():
        m.to(device)

    # ---- data layout (fixed for the whole run) ----
    sampler = None
    if ddp:
        sampler = torch.utils.data.DistributedSampler(
            train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=False
        )
        per_rank = len(sampler)
    else:
        per_rank = n_train
    steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    # ---- optimizer, schedule, scaler ----
    groups = _param_groups(model, params)
    optimizer = _make_optimizer(groups, cfg)
    scheduler = _make_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    model_param_ids = {id(p) for p in model.parameters()}
    outside_params = [p for p in trainable if id(p) not in model_param_ids]

    run = Run(
        model=model, loss_fn=loss_fn, train_set=train_set, eval_set=eval_set, cfg=cfg, hooks=hooks,
        augment=augment, extra_state=extra_state, ckpt_path=ckpt_path, metrics_path=metrics_path, desc=desc,
        dist=dist, eval_fn=eval_fn, device=device, use_amp=use_amp, n_train=n_train, sampler=sampler,
        steps_per_epoch=steps_per_epoch, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        trainable=trainable, outside_params=outside_params, fingerprint=config_fingerprint(cfg),
        cfg_dict=_cfg_dict(cfg), train_model=model,
    )
    run.nonfinite_at_start = non_finite_names(run)
    return run


def _wrap_ddp(run: Run) -> None:
    """Under DDP, train through the DistributedDataParallel wrapper (after restore: it broadcasts rank 0's state)."""
    if not run.ddp:
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = run.device
    run.train_model = DDP(
        run.model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=run.cfg.find_unused_parameters,
    )


# --------------------------------------------------------------------------------------------
# one epoch of training steps


def _epoch_batches(run: Run, epoch: int) -> tuple[torch.Generator, list[list[int]]]:
    """This epoch's batches (data order) and its augment generator."""
    cfg = run.cfg
    gen = torch.Generator().manual_seed(cfg.seed + epoch)
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
        order = list(run.sampler)
        gen = torch.Generator().manual_seed(_augment_seed(cfg.seed, epoch, run.dist))
    else:
        order = torch.randperm(run.n_train, generator=gen).tolist()
    return gen, _chunk(order, cfg.batch_size, run.steps_per_epoch)


def _train_epoch(run: Run, epoch: int, progress_on: bool) -> None:
    """Run epoch ``epoch``'s steps, from where a restored checkpoint stopped inside it if it did."""
    cfg = run.cfg
    gen, batches = _epoch_batches(run, epoch)
    skip = run.start_step_in_epoch if epoch == run.start_epoch else 0
    if skip:
        if run.aug_state is not None:
            gen.set_state(run.aug_state)
    else:
        run.running = {}
    run.aug_state = None
    for k in RUNNING_KEYS:
        run.running.setdefault(k, 0.0)

    bar = _Progress(progress_on, run.desc, epoch, cfg.epochs, len(batches), skip)
    try:
        for step_in_epoch, (x, y) in enumerate(_batches_of(run.train_set, batches[skip:]), start=skip):
            loss_val, correct, lr_used, bs = _train_step(run, epoch, gen, x, y)
            acc = _account_step(run, loss_val, correct, bs)
            bar.update(loss_val, acc)
            if run.global_step % cfg.log_every == 0:
                _log_window(run, epoch, lr_used)
            last_in_epoch = step_in_epoch + 1 == len(batches)
            if cfg.checkpoint_every_steps and run.global_step % cfg.checkpoint_every_steps == 0 and not last_in_epoch:
                save_checkpoint(run, epochs_done=epoch, step_in_epoch=step_in_epoch + 1, finished=False, final=None,
                                aug_gen=gen)
    finally:
        bar.close()


def _train_step(
    run: Run, epoch: int, gen: torch.Generator, x: Tensor, y: Tensor
) -> tuple[float, float | None, float, float]:
    """Forward, NaN guard, backward, optimizer and LR step; returns (loss, #correct or None, lr used, batch size)."""
    cfg, hooks, device = run.cfg, run.hooks, run.device
    if hooks.on_step_start is not None:
        hooks.on_step_start(run.global_step)
    if run.augment is not None:
        x = run.augment(x, gen)
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    run.probe = x if isinstance(x, Tensor) else None
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=run.use_amp):
        loss, logits = run.loss_fn(run.train_model, x, y)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return (scalar loss tensor, logits); got loss {type(loss).__name__} "
                        f"of shape {tuple(getattr(loss, 'shape', ()))}")

    # one host sync per step: loss value, #correct, and the NaN guard
    stats = [loss.detach().float().reshape(())]
    has_acc = logits is not None and logits.ndim >= 2
    if has_acc:
        target = y.argmax(-1) if y.ndim == logits.ndim else y
        stats.append((logits.detach().argmax(-1) == target).sum().float())
    vals = torch.stack(stats).cpu().tolist()
    loss_val = vals[0]
    _guard_loss(run, epoch, loss_val)

    optimizer, scaler = run.optimizer, run.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if run.use_amp:
        scaler.unscale_(optimizer)
    if run.ddp and run.outside_params:
        for p in run.outside_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            D.all_reduce_mean(p.grad)
    if hooks.after_backward is not None:
        hooks.after_backward()
    if cfg.grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
        if not run.use_amp and not math.isfinite(float(norm)):
            raise TrainingError(
                f"gradient norm became {float(norm)} at epoch {epoch + 1}/{cfg.epochs} step {run.global_step} "
                f"(the weights were not updated); {run.kept()}; lower the learning rate / check the data"
            )
    lr_used = optimizer.param_groups[0]["lr"]
    scaler.step(optimizer)
    scaler.update()
    if hooks.after_step is not None:
        hooks.after_step()
    run.scheduler.step()
    run.global_step += 1
    return loss_val, (vals[1] if has_acc else None), lr_used, float(len(y))


def _guard_loss(run: Run, epoch: int, loss_val: float) -> None:
    """Refuse a non-finite loss (on any rank) before backward: no step, no checkpoint."""
    bad = not math.isfinite(loss_val)
    if run.ddp:  # every rank must stop together, else the others hang in the next all-reduce
        flag = torch.tensor([1.0 if bad else 0.0], device=run.device)
        D.all_reduce_sum(flag)
        bad = bool(flag.item() > 0)
    if bad:
        what = f"{loss_val}" if not math.isfinite(loss_val) else "non-finite on another rank"
        raise TrainingError(
            f"loss became {what} at epoch {epoch + 1}/{run.cfg.epochs} step {run.global_step}; "
            f"{run.kept()}; lower the learning rate / check the data"
        )


def _account_step(run: Run, loss_val: float, correct: float | None, bs: float) -> float | None:
    """Add the step to the epoch and log-window sums; returns the step's accuracy (None without logits)."""
    running = run.running
    running["loss_sum"] += loss_val * bs
    running["count"] += bs
    running["win_loss"] += loss_val * bs
    running["win_count"] += bs
    if correct is None:
        return None
    running["correct"] += correct
    running["acc_count"] += bs
    running["win_correct"] += correct
    running["win_acc_count"] += bs
    return correct / bs


def _log_window(run: Run, epoch: int, lr_used: float) -> None:
    """One ``step`` metrics line over the steps since the last one; resets the window."""
    running = run.running
    run.log({
        "type": "step",
        "epoch": epoch,
        "step": run.global_step,
        "loss": running["win_loss"] / running["win_count"],
        "acc": running["win_correct"] / running["win_acc_count"] if running["win_acc_count"] else None,
        "lr": lr_used,
    })
    for k in WINDOW_KEYS:
        running[k] = 0.0


# --------------------------------------------------------------------------------------------
# end of epoch: sync, evaluate, hook, checkpoint


def _end_epoch(run: Run, epoch: int, t0: float) -> dict:
    """Epoch metrics (evaluated when due), the ``epoch`` line, the hook, the checkpoint; returns the final metrics."""
    cfg, device = run.cfg, run.device
    if run.ddp:
        import torch.distributed as tdist

        for b in run.model.buffers():
            tdist.broadcast(b, src=0)
    running = run.running
    totals = torch.tensor(
        [running["loss_sum"], running["correct"], running["count"], running["acc_count"]],
        dtype=torch.float64,
        device=device,
    )
    if run.ddp:
        D.all_reduce_sum(totals)
    loss_sum, correct, count, acc_count = totals.cpu().tolist()
    metrics: dict[str, Any] = {
        "epoch": epoch,
        "step": run.global_step,
        "train_loss": loss_sum / count if count else None,
        "train_acc": correct / acc_count if acc_count else None,
        "lr": run.optimizer.param_groups[0]["lr"],
    }
    last_epoch = epoch + 1 == cfg.epochs
    due = last_epoch or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0)
    if run.eval_set is not None and due:
        _evaluate_into(run, epoch, metrics)
    metrics["time_s"] = round(time.perf_counter() - t0, 3)
    metrics = {k: (_clean(v) if isinstance(v, float) else v) for k, v in metrics.items()}
    run.history.append(metrics)
    run.log({"type": "epoch", **metrics})
    if run.hooks.on_epoch_end is not None:
        run.hooks.on_epoch_end(epoch, dict(metrics))
    final = {**metrics, "best_eval_acc": run.best["eval_acc"], "best_epoch": run.best["epoch"]}
    run.running = {}
    save_checkpoint(run, epochs_done=epoch + 1, step_in_epoch=0, finished=last_epoch,
                    final=final if last_epoch else None, aug_gen=None)
    return final


def _evaluate_into(run: Run, epoch: int, metrics: dict[str, Any]) -> None:
    """Add ``eval_*`` keys to ``metrics`` (identical on every rank) and update the best epoch."""
    model, eval_set, dist = run.model, run.eval_set, run.dist
    if run.eval_fn is not None:
        res = run.eval_fn(model, eval_set) if run.main else None
        res = D.broadcast_object(res) if run.ddp else res
        for k, v in (res or {}).items():
            metrics["eval_acc" if k == "accuracy" else f"eval_{k}"] = v
    else:
        idx = list(range(dist.rank, len(eval_set), dist.world_size))  # type: ignore[arg-type]
        sums = _eval_sums(model, eval_set, idx, run.cfg.batch_size * 2, run.device)
        if run.ddp:
            D.all_reduce_sum(sums)
        res = _sums_to_metrics(sums)
        metrics.update(eval_acc=res["accuracy"], eval_loss=res["loss"], eval_samples=res["samples"])
    ea = metrics.get("eval_acc")
    if ea is not None and (run.best["eval_acc"] is None or ea > run.best["eval_acc"]):
        run.best = {"eval_acc": ea, "epoch": epoch}

"""The one training engine every compression method shares (DESIGN.md principle 3).

A plain PyTorch loop: device and AMP, DDP under ``torchrun``, gradient clipping, per-step LR
schedules, atomic checkpoints (every epoch and every N steps), exact resume, a NaN/inf guard, a
rich progress bar and JSONL metrics. Methods supply a ``loss_fn`` and optional :class:`Hooks`;
they never copy the loop.

Determinism and exact resume
    Epoch ``e`` draws its data order from ``torch.Generator().manual_seed(cfg.seed + e)``
    (single process: ``randperm``; DDP: ``DistributedSampler(seed=cfg.seed).set_epoch(e)``). In a
    single process the same generator then feeds ``augment``; under DDP the augment generator is
    seeded per rank. A checkpoint holds everything the loop's future depends on (weights, optimizer,
    scheduler, GradScaler, ``extra_state`` modules, python/numpy/torch RNG states of every rank, the
    augment generator, the position inside the epoch and the running metric sums), so a run
    resumed from any checkpoint ends with weights bitwise identical to an uninterrupted run on CPU.
    Hooks must therefore keep their state in the model / ``extra_state`` buffers or derive it from
    the step they are given.

NaN/inf guard
    The loss is checked before ``backward``: a non-finite loss raises TrainingError without an
    optimizer step and without a checkpoint, so the file on disk stays the last good state. (The
    failing forward pass itself may already have touched buffers such as BatchNorm running stats
    in memory; the checkpoint is the state to go back to.) With ``grad_clip`` and no AMP a
    non-finite gradient norm is refused the same way, and weights are checked to be finite before
    every checkpoint write.

Distributed (``dist.world_size > 1``)
    The model is wrapped in ``DistributedDataParallel`` (buffers broadcast from rank 0; after each
    epoch buffers are broadcast once more so every rank evaluates and saves the same model).
    ``cfg.batch_size`` is per process. Trainable parameters outside ``model`` (``params=``) get
    their gradients averaged by hand. Only rank 0 writes checkpoints, metrics and progress; all
    ranks read the checkpoint through rank 0 (no shared filesystem needed for resume).
    Evaluation with the default evaluator is sharded over ranks and its sums all-reduced, so every
    rank sees identical eval metrics; a custom ``eval_fn`` runs on rank 0 only and its result is
    broadcast. Step log lines carry rank 0's local loss/accuracy; epoch ``train_*`` numbers are
    all-reduced.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from edgec import distributed as D
from edgec.atomic import atomic_torch_save
from edgec.distributed import DistContext
from edgec.errors import InputError, TrainingError

__all__ = [
    "TrainConfig",
    "Hooks",
    "fit",
    "evaluate",
    "read_checkpoint",
    "config_fingerprint",
    "OPTIMIZERS",
    "SCHEDULES",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "step", "onecycle")
CHECKPOINT_FORMAT = 1
# Fields that change how a run is observed, not what it computes: free to differ on resume.
_NOT_FINGERPRINTED = frozenset({"log_every", "checkpoint_every_steps", "find_unused_parameters"})

LossFn = Callable[[nn.Module, Tensor, Tensor], "tuple[Tensor, Tensor | None]"]
EvalFn = Callable[[nn.Module, Dataset], dict]
Augment = Callable[[Tensor, torch.Generator], Tensor]


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """How to train. ``batch_size`` is per process under DDP; ``warmup_epochs`` may be fractional."""

    epochs: int
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | constant | step | onecycle
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    amp: bool = True  # used only on CUDA (fp16 autocast + GradScaler)
    seed: int = 0
    eval_every: int = 1  # epochs; 0 = only after the last epoch
    max_steps_per_epoch: int | None = None
    log_every: int = 10
    checkpoint_every_steps: int | None = None  # besides every epoch
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step

    def __post_init__(self) -> None:
        from edgec.registry import did_you_mean

        problems: list[str] = []
        if not isinstance(self.epochs, int) or self.epochs < 1:
            problems.append(f"epochs must be an integer >= 1 (got {self.epochs!r})")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size must be an integer >= 1 (got {self.batch_size!r})")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number (got {self.lr!r})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"unknown optimizer {self.optimizer!r}; {did_you_mean(str(self.optimizer), OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"unknown schedule {self.schedule!r}; {did_you_mean(str(self.schedule), SCHEDULES)}")
        if self.momentum < 0 or self.weight_decay < 0:
            problems.append("momentum and weight_decay must be >= 0")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0 (got {self.warmup_epochs!r})")
        elif isinstance(self.epochs, int) and self.warmup_epochs >= self.epochs > 0 and self.warmup_epochs > 0:
            problems.append(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0 or None (got {self.grad_clip!r})")
        if self.eval_every < 0:
            problems.append(f"eval_every must be >= 0 (got {self.eval_every!r})")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            problems.append(f"max_steps_per_epoch must be >= 1 or None (got {self.max_steps_per_epoch!r})")
        if self.log_every < 1:
            problems.append(f"log_every must be >= 1 (got {self.log_every!r})")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            problems.append(f"checkpoint_every_steps must be >= 1 or None (got {self.checkpoint_every_steps!r})")
        if problems:
            raise InputError("invalid training config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class Hooks:
    """Optional callbacks into the loop; all run on every rank."""

    on_step_start: Callable[[int], None] | None = None  # global step about to run (0-based)
    after_backward: Callable[[], None] | None = None  # grads are unscaled (AMP) and DDP-averaged here
    after_step: Callable[[], None] | None = None  # after optimizer.step(), before the LR step
    on_epoch_end: Callable[[int, dict], None] | None = None  # (epoch 0-based, epoch metrics); before its checkpoint


def _cfg_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_FINGERPRINTED}


def config_fingerprint(cfg: TrainConfig) -> str:
    """sha256 over every field that influences the trained weights (not logging/checkpoint cadence)."""
    blob = json.dumps(_cfg_dict(cfg), sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# data


def _batches_of(dataset: Dataset, batches: list[list[int]]) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x, y) for each list of indices; no global RNG is touched."""
    if isinstance(dataset, torch.utils.data.TensorDataset):
        if len(dataset.tensors) < 2:
            raise InputError("training data must yield (input, target) pairs; this TensorDataset has one tensor")
        for idx in batches:
            ix = torch.as_tensor(idx, dtype=torch.long)
            yield dataset.tensors[0][ix], dataset.tensors[1][ix]
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=0, generator=torch.Generator().manual_seed(0)
    )
    for batch in loader:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise InputError(f"training data must yield (input, target) pairs; got a {type(batch).__name__}")
        yield batch[0], batch[1]


def _chunk(indices: list[int], size: int, limit: int | None) -> list[list[int]]:
    out = [indices[i : i + size] for i in range(0, len(indices), size)]
    return out[:limit] if limit is not None else out


def _augment_seed(seed: int, epoch: int, dist: DistContext) -> int:
    if dist.world_size == 1:
        return seed + epoch
    return (seed + epoch) * 1_000_003 + dist.rank + 1


# --------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def _eval_sums(model: nn.Module, dataset: Dataset, indices: list[int], batch_size: int, device: torch.device) -> Tensor:
    """[loss_sum, correct, count] (float64, on ``device``) over ``indices`` in eval mode."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    try:
        for x, y in _batches_of(dataset, _chunk(indices, batch_size, None)):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits = model(x)
            if y.ndim == logits.ndim:  # soft / one-hot targets
                loss = torch.nn.functional.cross_entropy(logits.float(), y.float(), reduction="sum")
                target = y.argmax(-1)
            else:
                loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
                target = y
            sums += torch.stack(
                [
                    loss.double(),
                    (logits.argmax(-1) == target).sum().double(),
                    torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                ]
            )
    finally:
        model.train(was_training)
    return sums


def _sums_to_metrics(sums: Tensor) -> dict:
    loss_sum, correct, count = (float(v) for v in sums.cpu().tolist())
    n = int(count)
    return {
        "accuracy": correct / n if n else float("nan"),
        "loss": loss_sum / n if n else float("nan"),
        "samples": n,
    }


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device = "cpu") -> dict:
    """Top-1 accuracy and mean cross-entropy of ``model`` (moved to ``device``) on ``dataset``.

    Runs in eval mode without gradients and restores the model's train/eval mode afterwards.
    Returns ``{"accuracy", "loss", "samples"}``.
    """
    dev = torch.device(device)
    model.to(dev)
    sums = _eval_sums(model, dataset, list(range(len(dataset))), batch_size, dev)
    return _sums_to_metrics(sums)


# --------------------------------------------------------------------------------------------
# optimizer and schedule


def _param_groups(model: nn.Module, params: Iterable[Any] | None) -> list[dict]:
    if params is None:
        chosen: list[Any] = [p for p in model.parameters() if p.requires_grad]
    else:
        chosen = list(params)
    if not chosen:
        raise InputError("nothing to train: no parameter requires grad (check params= or requires_grad flags)")
    if all(isinstance(p, dict) for p in chosen):
        groups = [dict(g, params=list(g["params"])) for g in chosen]
    elif any(isinstance(p, dict) for p in chosen):
        raise TypeError("params= must be all nn.Parameters or all param-group dicts, not a mix")
    else:
        groups = [{"params": chosen}]
    seen: set[int] = set()
    for g in groups:
        for p in g["params"]:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params= holds a {type(p).__name__}, expected nn.Parameter")
            if id(p) in seen:
                raise TypeError("params= lists the same parameter twice")
            seen.add(id(p))
    return groups


def _make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = cfg.epochs * steps_per_epoch
    warm = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)
    if cfg.schedule == "onecycle":
        pct = cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs > 0 else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=total,
            pct_start=pct,
            cycle_momentum=cfg.optimizer != "sgd" or cfg.momentum > 0,
        )
    schedule = cfg.schedule

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * t))
        frac = step / total  # "step": x0.1 at 50% and again at 75% of all steps
        return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --------------------------------------------------------------------------------------------
# checkpoints


def _atomic_save(obj: Any, path: Path) -> None:
    """Checkpoint write: readers see the old checkpoint or the new one, never half."""
    atomic_torch_save(obj, path)


def _remove_stale_tmp(path: Path) -> None:
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass


def read_checkpoint(path: str | Path) -> dict:
    """Load an engine checkpoint (tensors on CPU, ``weights_only`` unpickling)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # truncated, not a checkpoint, unsafe pickle
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "error:" in ln.lower()), lines[0] if lines else "")
        raise InputError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {why})",
            hint="delete it and start the stage again without resume, or point to another run directory",
        ) from None


def _rng_state(device: torch.device) -> dict:
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, g))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _describe_cfg_change(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(diffs) if diffs else "(fields equal but fingerprint differs: older engine version?)"


# --------------------------------------------------------------------------------------------
# progress + metrics (rank 0 only)


def _progress_enabled(dist: DistContext) -> bool:
    if dist.rank != 0 or os.environ.get("EDGEC_NO_PROGRESS", "") == "1":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Progress:
    """A transient per-epoch rich bar; a no-op when disabled."""

    def __init__(self, enabled: bool, desc: str, epoch: int, epochs: int, total: int, done: int):
        self._p = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._p.add_task(f"{desc} {epoch + 1}/{epochs}", total=total, completed=done, loss="-", acc="-")
        self._p.start()

    def update(self, loss: float, acc: float | None) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1, loss=f"{loss:.4f}", acc="-" if acc is None else f"{acc:.3f}")

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def _write_metrics(path: Path | None, record: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False, default=_json_default) + "\n")
        f.flush()


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return repr(o)


def _clean(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v


# --------------------------------------------------------------------------------------------
# the loop


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
    main = dist.rank == 0
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

    fingerprint = config_fingerprint(cfg)
    cfg_dict = _cfg_dict(cfg)

    # ---- state of the run ----
    start_epoch, start_step_in_epoch, global_step = 0, 0, 0
    history: list[dict] = []
    best: dict[str, Any] = {"eval_acc": None, "epoch": None}
    running: dict[str, float] = {}
    aug_state: Tensor | None = None
    last_good: str | None = None  # where the newest checkpoint on disk stands

    def where(epochs_done: int, step_in_epoch: int, step: int) -> str:
        if step_in_epoch == 0:
            return f"end of epoch {epochs_done}/{cfg.epochs}, step {step}"
        return f"epoch {epochs_done + 1}/{cfg.epochs}, step {step}"

    def kept() -> str:
        if ckpt_path is None:
            return "no checkpoint is kept (no checkpoint path was given)"
        if last_good is None:
            return f"no checkpoint has been written yet to {ckpt_path}"
        return f"the last good checkpoint ({last_good}) is kept at {ckpt_path}"

    if main and ckpt_path is not None:
        _remove_stale_tmp(ckpt_path)

    ckpt = None
    if resume and ckpt_path is not None:
        if main:
            ckpt = read_checkpoint(ckpt_path) if ckpt_path.exists() else None
        ckpt = D.broadcast_object(ckpt) if ddp else ckpt

    if ckpt is not None:
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise InputError(
                f"checkpoint {ckpt_path} has format {ckpt.get('format')!r}, this engine reads {CHECKPOINT_FORMAT}",
                hint="start this stage fresh (resume off / a new run directory)",
            )
        if ckpt["fingerprint"] != fingerprint:
            raise InputError(
                f"cannot resume from {ckpt_path}: it was written with a different training config "
                f"({_describe_cfg_change(ckpt['cfg'], cfg_dict)}); resuming would not reproduce either run",
                hint="restore the original settings, or start this stage fresh (resume off / a new run directory)",
            )
        if ckpt["world_size"] != dist.world_size or ckpt["train_size"] != n_train:
            raise InputError(
                f"cannot resume from {ckpt_path}: it was written with world_size={ckpt['world_size']} and "
                f"{ckpt['train_size']} training samples, this run has world_size={dist.world_size} and {n_train}",
                hint="resume with the same number of processes and the same data, or start fresh",
            )
        try:
            model.load_state_dict(ckpt["model"])
            for name, m in extra_state.items():
                m.load_state_dict(ckpt["extra_state"][name])
        except (RuntimeError, KeyError) as exc:
            raise InputError(
                f"checkpoint {ckpt_path} does not match the model being trained: {str(exc).splitlines()[0]}",
                hint="resume with the same model and extra_state modules, or start fresh",
            ) from None
        history = list(ckpt["metrics"]["history"])
        best = dict(ckpt["metrics"]["best"])
        if ckpt["finished"]:
            return dict(ckpt["metrics"]["final"])
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as exc:
            raise InputError(
                f"checkpoint {ckpt_path} holds optimizer state for other parameters: {exc}",
                hint="resume with the same params= selection, or start fresh",
            ) from None
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch = ckpt["epochs_done"]
        start_step_in_epoch = ckpt["step_in_epoch"]
        global_step = ckpt["global_step"]
        running = dict(ckpt["running"])
        aug_state = ckpt["aug_rng"][dist.rank] if ckpt["aug_rng"] is not None else None
        rng = ckpt["rng"]
        _set_rng_state(rng[dist.rank] if len(rng) > dist.rank else rng[0], device)
        last_good = where(ckpt["epochs_done"], ckpt["step_in_epoch"], ckpt["global_step"])
        if main and metrics_path is not None and ckpt.get("metrics_offset") is not None and metrics_path.exists():
            if metrics_path.stat().st_size > ckpt["metrics_offset"]:  # drop lines written after the checkpoint
                with open(metrics_path, "r+b") as f:
                    f.truncate(ckpt["metrics_offset"])
        del ckpt
    else:
        random.seed(cfg.seed + dist.rank)
        np.random.seed(cfg.seed + dist.rank)
        torch.manual_seed(cfg.seed + dist.rank)

    train_model: nn.Module = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )

    def save(
        *, epochs_done: int, step_in_epoch: int, finished: bool, final: dict | None, aug_gen: torch.Generator | None
    ) -> None:
        nonlocal last_good
        if ckpt_path is None:
            return
        for p in trainable:
            if not torch.isfinite(p.detach()).all():
                raise TrainingError(
                    f"weights became non-finite at step {global_step} and were not checkpointed; {kept()}",
                    hint="lower the learning rate, set grad_clip, or check the data",
                )
        rngs = D.all_gather_object(_rng_state(device)) if ddp else [_rng_state(device)]
        augs = None
        if aug_gen is not None:
            augs = D.all_gather_object(aug_gen.get_state()) if ddp else [aug_gen.get_state()]
        if not main:
            last_good = where(epochs_done, step_in_epoch, global_step)
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "desc": desc,
            "finished": finished,
            "epochs_done": epochs_done,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "extra_state": {k: m.state_dict() for k, m in extra_state.items()},
            "metrics": {"history": history, "best": best, "final": final},
            "running": dict(running),
            "aug_rng": augs,
            "rng": rngs,
            "cfg": cfg_dict,
            "fingerprint": fingerprint,
            "world_size": dist.world_size,
            "train_size": n_train,
            "metrics_offset": metrics_offset(),
            "torch_version": str(torch.__version__),
        }
        _atomic_save(state, ckpt_path)
        last_good = where(epochs_done, step_in_epoch, global_step)

    def metrics_offset() -> int | None:
        return metrics_path.stat().st_size if metrics_path is not None and metrics_path.exists() else None

    def log(record: dict) -> None:
        if main:
            _write_metrics(metrics_path, {"stage": desc, **record})

    final: dict = dict(history[-1]) if history else {}
    progress_on = _progress_enabled(dist)
    model.train()

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        # data order and augment randomness for this epoch
        gen = torch.Generator().manual_seed(cfg.seed + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
            order = list(sampler)
            gen = torch.Generator().manual_seed(_augment_seed(cfg.seed, epoch, dist))
        else:
            order = torch.randperm(n_train, generator=gen).tolist()
        batches = _chunk(order, cfg.batch_size, steps_per_epoch)
        skip = start_step_in_epoch if epoch == start_epoch else 0
        if skip:
            if aug_state is not None:
                gen.set_state(aug_state)
        else:
            running = {}
        aug_state = None
        for k in ("loss_sum", "correct", "count", "acc_count", "win_loss", "win_correct", "win_count", "win_acc_count"):
            running.setdefault(k, 0.0)

        bar = _Progress(progress_on, desc, epoch, cfg.epochs, len(batches), skip)
        try:
            for step_in_epoch, (x, y) in enumerate(_batches_of(train_set, batches[skip:]), start=skip):
                if hooks.on_step_start is not None:
                    hooks.on_step_start(global_step)
                if augment is not None:
                    x = augment(x, gen)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    loss, logits = loss_fn(train_model, x, y)
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
                bad = not math.isfinite(loss_val)
                if ddp:  # every rank must stop together, else the others hang in the next all-reduce
                    flag = torch.tensor([1.0 if bad else 0.0], device=device)
                    D.all_reduce_sum(flag)
                    bad = bool(flag.item() > 0)
                if bad:
                    what = f"{loss_val}" if not math.isfinite(loss_val) else "non-finite on another rank"
                    raise TrainingError(
                        f"loss became {what} at epoch {epoch + 1}/{cfg.epochs} step {global_step}; "
                        f"{kept()}; lower the learning rate / check the data"
                    )

                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if use_amp:
                    scaler.unscale_(optimizer)
                if ddp and outside_params:
                    for p in outside_params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        D.all_reduce_mean(p.grad)
                if hooks.after_backward is not None:
                    hooks.after_backward()
                if cfg.grad_clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                    if not use_amp and not math.isfinite(float(norm)):
                        raise TrainingError(
                            f"gradient norm became {float(norm)} at epoch {epoch + 1}/{cfg.epochs} step {global_step} "
                            f"(the weights were not updated); {kept()}; lower the learning rate / check the data"
                        )
                lr_used = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                if hooks.after_step is not None:
                    hooks.after_step()
                scheduler.step()
                global_step += 1

                bs = float(len(y))
                running["loss_sum"] += loss_val * bs
                running["count"] += bs
                running["win_loss"] += loss_val * bs
                running["win_count"] += bs
                acc = None
                if has_acc:
                    running["correct"] += vals[1]
                    running["acc_count"] += bs
                    running["win_correct"] += vals[1]
                    running["win_acc_count"] += bs
                    acc = vals[1] / bs
                bar.update(loss_val, acc)

                if global_step % cfg.log_every == 0:
                    log({
                        "type": "step",
                        "epoch": epoch,
                        "step": global_step,
                        "loss": running["win_loss"] / running["win_count"],
                        "acc": running["win_correct"] / running["win_acc_count"] if running["win_acc_count"] else None,
                        "lr": lr_used,
                    })
                    for k in ("win_loss", "win_correct", "win_count", "win_acc_count"):
                        running[k] = 0.0

                last_in_epoch = step_in_epoch + 1 == len(batches)
                if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0 and not last_in_epoch:
                    save(epochs_done=epoch, step_in_epoch=step_in_epoch + 1, finished=False, final=None, aug_gen=gen)
        finally:
            bar.close()

        # ---- end of epoch: sync, evaluate, hook, checkpoint ----
        if ddp:
            import torch.distributed as tdist

            for b in model.buffers():
                tdist.broadcast(b, src=0)
        totals = torch.tensor(
            [running["loss_sum"], running["correct"], running["count"], running["acc_count"]],
            dtype=torch.float64,
            device=device,
        )
        if ddp:
            D.all_reduce_sum(totals)
        loss_sum, correct, count, acc_count = totals.cpu().tolist()
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "step": global_step,
            "train_loss": loss_sum / count if count else None,
            "train_acc": correct / acc_count if acc_count else None,
            "lr": optimizer.param_groups[0]["lr"],
        }
        last_epoch = epoch + 1 == cfg.epochs
        do_eval = eval_set is not None and (last_epoch or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0))
        if do_eval:
            if eval_fn is not None:
                res = eval_fn(model, eval_set) if main else None
                res = D.broadcast_object(res) if ddp else res
                for k, v in (res or {}).items():
                    metrics["eval_acc" if k == "accuracy" else f"eval_{k}"] = v
            else:
                idx = list(range(dist.rank, len(eval_set), dist.world_size))  # type: ignore[arg-type]
                sums = _eval_sums(model, eval_set, idx, cfg.batch_size * 2, device)
                if ddp:
                    D.all_reduce_sum(sums)
                res = _sums_to_metrics(sums)
                metrics.update(eval_acc=res["accuracy"], eval_loss=res["loss"], eval_samples=res["samples"])
            ea = metrics.get("eval_acc")
            if ea is not None and (best["eval_acc"] is None or ea > best["eval_acc"]):
                best = {"eval_acc": ea, "epoch": epoch}
        metrics["time_s"] = round(time.perf_counter() - t0, 3)
        metrics = {k: (_clean(v) if isinstance(v, float) else v) for k, v in metrics.items()}
        history.append(metrics)
        log({"type": "epoch", **metrics})
        if hooks.on_epoch_end is not None:
            hooks.on_epoch_end(epoch, dict(metrics))
        final = {**metrics, "best_eval_acc": best["eval_acc"], "best_epoch": best["epoch"]}
        running = {}
        save(epochs_done=epoch + 1, step_in_epoch=0, finished=last_epoch, final=final if last_epoch else None,
             aug_gen=None)

    return final

"""The one training engine every compression method shares (docs/design.md principle 3).

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

Layout: :mod:`~edgec.engine.config` (TrainConfig, Hooks, fingerprint), :mod:`~edgec.engine.loop`
(``fit``), :mod:`~edgec.engine.checkpoint` (write, read, restore), :mod:`~edgec.engine.state` (the
run's state), :mod:`~edgec.engine.evaluation`, :mod:`~edgec.engine.optim`,
:mod:`~edgec.engine.batches`, :mod:`~edgec.engine.progress` (progress bar, metrics JSONL).
"""
# CHECKPOINT_FORMAT and the LossFn / EvalFn / Augment aliases stay importable from here, as before the split
from edgec.engine.checkpoint import CHECKPOINT_FORMAT, read_checkpoint
from edgec.engine.config import OPTIMIZERS, SCHEDULES, Augment, EvalFn, Hooks, LossFn, TrainConfig, config_fingerprint
from edgec.engine.evaluation import evaluate
from edgec.engine.loop import fit

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

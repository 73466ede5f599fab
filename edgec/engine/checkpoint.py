"""Engine checkpoints: atomic write, read, RNG state capture/restore, stale temp-file cleanup, resume.

A checkpoint holds everything the loop's future depends on (see :mod:`edgec.engine`); only rank 0
writes it, and all ranks read it through rank 0.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from edgec import distributed as D
from edgec.atomic import atomic_torch_save
from edgec.engine.state import Run
from edgec.errors import InputError, TrainingError

CHECKPOINT_FORMAT = 1


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


def state_tensors(run: Run):
    """``(name, tensor)`` of everything a checkpoint stores of the model: parameters, buffers, extra state,
    and trainable parameters outside the model."""
    for name, t in run.model.state_dict(keep_vars=True).items():
        yield name, t
    for key, m in run.extra_state.items():
        for name, t in m.state_dict(keep_vars=True).items():
            yield f"{key}.{name}", t
    for i, p in enumerate(run.outside_params):
        yield f"<trainable {i}>", p


def non_finite_names(run: Run) -> frozenset[str]:
    return frozenset(n for n, t in state_tensors(run)
                     if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t.detach()).all())


def first_non_finite(run: Run) -> str | None:
    """What became non-finite since training started: a parameter/buffer, or the model's output in eval
    mode on the last training batch (finite weights can still overflow); None when all is finite."""
    for name, t in state_tensors(run):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and name not in run.nonfinite_at_start \
                and not torch.isfinite(t.detach()).all():
            return name
    if run.probe is None:
        return None
    was_training = run.model.training
    try:
        with torch.no_grad():
            out = run.model.eval()(run.probe)
    except TypeError:  # a model whose forward takes more than the batch: the state check alone
        return None
    finally:
        run.model.train(was_training)
    if isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
        return "the model's output (eval mode, on the last training batch)"
    return None


# --------------------------------------------------------------------------------------------
# writing (every rank calls it: RNG states are gathered; rank 0 writes)


def save_checkpoint(
    run: Run, *, epochs_done: int, step_in_epoch: int, finished: bool, final: dict | None,
    aug_gen: torch.Generator | None,
) -> None:
    """Write the run's state to ``run.ckpt_path`` atomically (no-op without a path)."""
    if run.ckpt_path is None:
        return
    bad = first_non_finite(run)
    if run.ddp:  # every rank must stop together (buffers can differ between ranks inside an epoch)
        flag = torch.tensor([0.0 if bad is None else 1.0], device=run.device)
        D.all_reduce_sum(flag)
        bad = bad or ("a tensor on another rank" if flag.item() > 0 else None)
    if bad is not None:
        raise TrainingError(
            f"training diverged: {bad} became non-finite at step {run.global_step}, so that state was not "
            f"checkpointed; {run.kept()}",
            hint="lower the learning rate, set grad_clip, or check the data",
        )
    rngs = D.all_gather_object(_rng_state(run.device)) if run.ddp else [_rng_state(run.device)]
    augs = None
    if aug_gen is not None:
        augs = D.all_gather_object(aug_gen.get_state()) if run.ddp else [aug_gen.get_state()]
    if not run.main:
        run.last_good = run.where(epochs_done, step_in_epoch, run.global_step)
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "desc": run.desc,
        "finished": finished,
        "epochs_done": epochs_done,
        "step_in_epoch": step_in_epoch,
        "global_step": run.global_step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "extra_state": {k: m.state_dict() for k, m in run.extra_state.items()},
        "metrics": {"history": run.history, "best": run.best, "final": final},
        "running": dict(run.running),
        "aug_rng": augs,
        "rng": rngs,
        "cfg": run.cfg_dict,
        "fingerprint": run.fingerprint,
        "world_size": run.dist.world_size,
        "train_size": run.n_train,
        "metrics_offset": _metrics_offset(run.metrics_path),
        "torch_version": str(torch.__version__),
    }
    atomic_torch_save(state, run.ckpt_path)
    run.last_good = run.where(epochs_done, step_in_epoch, run.global_step)


def _metrics_offset(metrics_path: Path | None) -> int | None:
    return metrics_path.stat().st_size if metrics_path is not None and metrics_path.exists() else None


# --------------------------------------------------------------------------------------------
# resuming


def restore(run: Run, resume: bool) -> dict | None:
    """Bring ``run`` to the state of its checkpoint (with ``resume``), else seed the RNGs afresh.

    Returns the saved final metrics when the checkpoint is of a finished run (its weights are
    loaded, nothing else is), else None.
    """
    ckpt = _load(run, resume)
    if ckpt is None:
        seed = run.cfg.seed + run.dist.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return None
    _check_fits(run, ckpt)
    try:
        run.model.load_state_dict(ckpt["model"])
        for name, m in run.extra_state.items():
            m.load_state_dict(ckpt["extra_state"][name])
    except (RuntimeError, KeyError) as exc:
        raise InputError(
            f"checkpoint {run.ckpt_path} does not match the model being trained: {str(exc).splitlines()[0]}",
            hint="resume with the same model and extra_state modules, or start fresh",
        ) from None
    run.history = list(ckpt["metrics"]["history"])
    run.best = dict(ckpt["metrics"]["best"])
    if ckpt["finished"]:
        return dict(ckpt["metrics"]["final"])
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as exc:
        raise InputError(
            f"checkpoint {run.ckpt_path} holds optimizer state for other parameters: {exc}",
            hint="resume with the same params= selection, or start fresh",
        ) from None
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.start_epoch = ckpt["epochs_done"]
    run.start_step_in_epoch = ckpt["step_in_epoch"]
    run.global_step = ckpt["global_step"]
    run.running = dict(ckpt["running"])
    rank = run.dist.rank
    run.aug_state = ckpt["aug_rng"][rank] if ckpt["aug_rng"] is not None else None
    rng = ckpt["rng"]
    _set_rng_state(rng[rank] if len(rng) > rank else rng[0], run.device)
    run.last_good = run.where(ckpt["epochs_done"], ckpt["step_in_epoch"], ckpt["global_step"])
    _truncate_metrics(run.metrics_path if run.main else None, ckpt.get("metrics_offset"))
    return None


def _load(run: Run, resume: bool) -> dict | None:
    """Remove stale temp files (rank 0); with ``resume`` read the checkpoint on rank 0 and share it."""
    ckpt_path = run.ckpt_path
    if run.main and ckpt_path is not None:
        _remove_stale_tmp(ckpt_path)
    ckpt = None
    if resume and ckpt_path is not None:
        if run.main:
            ckpt = read_checkpoint(ckpt_path) if ckpt_path.exists() else None
        ckpt = D.broadcast_object(ckpt) if run.ddp else ckpt
    return ckpt


def _check_fits(run: Run, ckpt: dict) -> None:
    ckpt_path, dist = run.ckpt_path, run.dist
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(
            f"checkpoint {ckpt_path} has format {ckpt.get('format')!r}, this engine reads {CHECKPOINT_FORMAT}",
            hint="start this stage fresh (resume off / a new run directory)",
        )
    if ckpt["fingerprint"] != run.fingerprint:
        raise InputError(
            f"cannot resume from {ckpt_path}: it was written with a different training config "
            f"({_describe_cfg_change(ckpt['cfg'], run.cfg_dict)}); resuming would not reproduce either run",
            hint="restore the original settings, or start this stage fresh (resume off / a new run directory)",
        )
    if ckpt["world_size"] != dist.world_size or ckpt["train_size"] != run.n_train:
        raise InputError(
            f"cannot resume from {ckpt_path}: it was written with world_size={ckpt['world_size']} and "
            f"{ckpt['train_size']} training samples, this run has world_size={dist.world_size} and {run.n_train}",
            hint="resume with the same number of processes and the same data, or start fresh",
        )


def _truncate_metrics(metrics_path: Path | None, offset: int | None) -> None:
    """Drop metrics lines written after the checkpoint."""
    if metrics_path is not None and offset is not None and metrics_path.exists():
        if metrics_path.stat().st_size > offset:
            with open(metrics_path, "r+b") as f:
                f.truncate(offset)

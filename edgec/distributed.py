"""Process-group helpers for the training engine (docs/design.md principle 3).

``torchrun --nproc_per_node=N ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (and the
rendezvous variables); :func:`init_distributed` reads them and joins the process group once
(gloo on CPU, nccl on CUDA). Without them every helper here degrades to a single-process no-op,
so code written against this module runs unchanged in a plain ``python`` process.

torch is imported lazily inside the functions (docs/design.md principle 6).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgec.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DistContext",
    "init_distributed",
    "shutdown_distributed",
    "is_initialized",
    "is_main",
    "get_rank",
    "get_world_size",
    "barrier",
    "all_reduce_mean",
    "all_reduce_sum",
    "broadcast_object",
    "all_gather_object",
    "resolve_device",
]


@dataclass
class DistContext:
    """Where this process sits in the job and which device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: "torch.device | str" = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: "torch.device | str" = "cpu") -> "DistContext":
        import torch

        return cls(rank=0, world_size=1, local_rank=0, device=torch.device(device))


def resolve_device(device: str = "auto") -> "torch.device":
    """``"cpu"``, ``"cuda"`` / ``"cuda:N"`` or ``"auto"`` (CUDA when available) -> torch.device.

    Raises InputError when CUDA is asked for but this torch cannot use it.
    """
    import torch

    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise InputError(
                f"device {device!r} was requested but CUDA is not available "
                f"(torch {torch.__version__} is {build}, or no GPU/driver is visible)",
                hint="use --device cpu (or auto), or install a CUDA build of torch on a GPU host",
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"device {device!r} was requested but only {torch.cuda.device_count()} CUDA device(s) are visible",
                hint="use cuda:0 .. cuda:{} or check CUDA_VISIBLE_DEVICES".format(torch.cuda.device_count() - 1),
            )
        return dev
    raise InputError(f"unknown device {device!r}", hint="use one of: cpu, cuda, cuda:N, auto")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group (once) or return a single-process context.

    With ``WORLD_SIZE > 1`` in the environment (as torchrun sets it) the default process group is
    initialised with backend ``nccl`` when the resolved device is CUDA, ``gloo`` otherwise; on
    CUDA each process is pinned to ``cuda:LOCAL_RANK``. Calling it again reuses the group.
    """
    import torch
    import torch.distributed as tdist

    dev = resolve_device(device)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistContext(rank=0, world_size=1, local_rank=0, device=dev)

    _env_int("RANK", 0)  # validated here; the process group reads it itself
    local_rank = _env_int("LOCAL_RANK", 0)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible",
                hint="launch at most one process per GPU (torchrun --nproc_per_node=<number of GPUs>)",
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not tdist.is_available():
        raise InputError("WORLD_SIZE>1 but this torch build has no torch.distributed support")
    if not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        tdist.init_process_group(**kwargs)
    return DistContext(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=local_rank, device=dev)


def shutdown_distributed(*, sync: bool = True) -> None:
    """Leave the process group (no-op when none was joined).

    With ``sync`` (the normal end of a job) every rank first meets at a barrier, so no rank tears
    its gloo/nccl connections down while a peer is still using them: a rank whose peer had already
    closed its sockets was seen to abort ("terminate called without an active exception") after
    the work itself had finished. Pass ``sync=False`` on an error path, where a peer may never
    reach the barrier.
    """
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        if sync and tdist.get_world_size() > 1:
            tdist.barrier()
        tdist.destroy_process_group()


def is_initialized() -> bool:
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    import torch.distributed as tdist

    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    import torch.distributed as tdist

    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return get_rank() == 0


def barrier() -> None:
    import torch.distributed as tdist

    if is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def all_reduce_sum(tensor: "torch.Tensor") -> "torch.Tensor":
    """Sum ``tensor`` over all ranks in place and return it (unchanged in a single process)."""
    import torch.distributed as tdist

    if is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: "torch.Tensor") -> "torch.Tensor":
    """Average ``tensor`` over all ranks in place and return it (unchanged in a single process).

    Integer tensors are summed then floor-divided; pass floats for exact means.
    """
    import torch.distributed as tdist

    if is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.div_(tdist.get_world_size())
        else:
            tensor.floor_divide_(tdist.get_world_size())
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself in a single process)."""
    import torch.distributed as tdist

    if not (is_initialized() and tdist.get_world_size() > 1):
        return obj
    box = [obj if tdist.get_rank() == src else None]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    import torch.distributed as tdist

    if not (is_initialized() and tdist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out

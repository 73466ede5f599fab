"""Record a model's layer shapes and re-apply them to a fresh instance: a shrunk architecture without pickle.

Channel pruning (Torch-Pruning) changes the shapes of a model's layers in place, so a state_dict
alone no longer fits a fresh instance of the user's class. :func:`record` writes down, as plain
JSON, every shape-carrying attribute of the known layer types (conv / linear / norms) and the shape
of every parameter and buffer; :func:`apply` resizes a fresh instance of the same class to it (new
empty tensors of the recorded shapes, whose values then come from ``load_state_dict``). No module
is pickled and no user code runs besides the user's own constructor.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgec.errors import InputError

__all__ = ["FORMAT", "record", "apply", "save", "load", "stage_path"]

FORMAT = "edgec-architecture/1"

# shape attributes by layer type (the first isinstance match wins: subclasses first)
_ATTRS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.PReLU, ("num_parameters",)),
    (nn.Embedding, ("num_embeddings", "embedding_dim")),
)


def _kind(mod: nn.Module) -> tuple[type, tuple[str, ...]] | None:
    for cls, attrs in _ATTRS:
        if isinstance(mod, cls):
            return cls, attrs
    return None


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def record(model: nn.Module) -> dict:
    """The model's shapes as a JSON-able dict: per module of a known layer type its class and shape
    attributes, per parameter / buffer (any module) its shape."""
    modules = {}
    for name, mod in model.named_modules():
        kind = _kind(mod)
        if kind is not None:
            modules[name] = {"type": type(mod).__name__, **{a: _jsonable(getattr(mod, a)) for a in kind[1]}}
    tensors = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if t is not None:
            tensors[name] = list(t.shape)
    return {"format": FORMAT, "modules": modules, "tensors": tensors}


def _check(model: nn.Module, rec: dict) -> dict[str, nn.Module]:
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise InputError(f"not an edgec architecture record (format {rec.get('format') if isinstance(rec, dict) else None!r},"
                         f" expected {FORMAT!r})", hint="the run directory's stages/stageN.arch.json was written by "
                                                        "another edgec version or edited; rerun the compress")
    mods = dict(model.named_modules())
    for name, entry in rec["modules"].items():
        mod = mods.get(name)
        if mod is None:
            raise InputError(f"the recorded architecture has a module {name!r} that this model lacks",
                             hint="rebuild with the model class the run was compressed from")
        if type(mod).__name__ != entry["type"]:
            raise InputError(f"module {name!r} is a {type(mod).__name__} here but the recorded architecture has a "
                             f"{entry['type']}", hint="rebuild with the model class the run was compressed from")
    for name, mod in mods.items():
        if _kind(mod) is not None and name not in rec["modules"]:
            raise InputError(f"this model has a {type(mod).__name__} {name!r} that the recorded architecture lacks",
                             hint="rebuild with the model class the run was compressed from")
    return mods


def _owner(model: nn.Module, mods: dict[str, nn.Module], tname: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = tname.rpartition(".")
    mod = mods.get(prefix)
    if mod is None:
        raise InputError(f"the recorded architecture has a tensor {tname!r} whose module this model lacks",
                         hint="rebuild with the model class the run was compressed from")
    return mod, leaf


@torch.no_grad()
def apply(model: nn.Module, rec: dict) -> nn.Module:
    """Resize ``model`` (a fresh instance of the recorded class) to ``rec`` in place; returns it.

    Shape attributes are set and every recorded parameter / buffer is replaced by an uninitialised
    tensor of its recorded shape (same dtype and device), so ``load_state_dict`` then fills it."""
    mods = _check(model, rec)
    for name, entry in rec["modules"].items():
        mod = mods[name]
        for attr, value in entry.items():
            if attr != "type":
                setattr(mod, attr, tuple(value) if isinstance(getattr(mod, attr), tuple) else value)
    for tname, shape in rec["tensors"].items():
        mod, leaf = _owner(model, mods, tname)
        if leaf in mod._parameters and mod._parameters[leaf] is not None:
            old = mod._parameters[leaf]
            if list(old.shape) != shape:
                mod._parameters[leaf] = nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad)
        elif leaf in mod._buffers and mod._buffers[leaf] is not None:
            old = mod._buffers[leaf]
            if list(old.shape) != shape:
                mod._buffers[leaf] = old.new_empty(shape)
        else:
            raise InputError(f"the recorded architecture has a tensor {tname!r} that this model lacks",
                             hint="rebuild with the model class the run was compressed from")
    return model


def stage_path(run_dir, index: int):
    """Where a run keeps the architecture stage ``index`` left: ``RUN_DIR/stages/stage{index}.arch.json``.

    A stage that changes shapes writes it after its run and applies it in ``prepare`` when
    replayed (``ctx.rebuild``: ``--resume``, ``edgec export``, ``edgec.runs.rebuild_model``)."""
    from pathlib import Path

    return Path(run_dir) / "stages" / f"stage{int(index)}.arch.json"


def save(model: nn.Module, path) -> None:
    """Write :func:`record` of ``model`` to ``path`` as JSON, atomically."""
    import json

    from edgec.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(record(model), indent=1, sort_keys=True))


def load(path) -> dict:
    """Read a record written by :func:`save` (an InputError naming the file when it is missing)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise InputError(f"the shrunk architecture record {path} is missing",
                         hint="the run directory is incomplete: rerun the compress (or --resume it)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})", hint="rerun the compress") from exc

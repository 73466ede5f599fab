"""Resolve model specs and load/save weights safely.

A *spec* is one of

* a zoo name: ``resnet20`` (see ``edgec.models.list_models``);
* a Python file and a factory in it: ``path/to/net.py:build``;
* an importable module and a factory: ``mypkg.nets:build``.

Weights are read with ``torch.load(weights_only=True)``: a file holding a pickled object (a whole
``nn.Module``, numpy arrays, custom classes) is refused unless the caller passes
``trust_pickle=True`` (CLI ``--trust-pickle``), because unpickling can run arbitrary code.

torch is imported inside the functions (docs/design.md principle 6).
"""
from __future__ import annotations

import hashlib
import inspect
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgec import usercode
from edgec.errors import ModelError
from edgec.registry import did_you_mean

if TYPE_CHECKING:
    from torch import nn

__all__ = ["load_weights", "resolve_model", "save_weights"]

_SHOW = 10  # how many keys of each kind a mismatch error lists
_RESAVE = "re-save it with `torch.save(model.state_dict(), path)`"


# --------------------------------------------------------------------------------------- specs
def resolve_model(
    spec: str,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """Build the model named by ``spec`` and, if given, load ``weights`` into it strictly."""
    from torch import nn

    spec = str(spec).strip()
    if not spec:
        raise ModelError("empty model spec", hint="give a zoo name (see `edgec models`), file.py:factory or module:factory")
    if ":" in spec and not _looks_like_bare_windows_path(spec):
        source, _, attr = spec.rpartition(":")
        if not source or not attr:
            raise ModelError(f"model spec {spec!r} must look like 'path/to/file.py:factory' or 'package.module:factory'")
        module = _import_file(source) if _is_file_source(source) else _import_module(source)
        model = _call_factory(_get_factory(module, attr, spec), spec, num_classes=num_classes, in_channels=in_channels)
    else:
        from edgec.models import ZOO, create_model

        if spec not in ZOO and (spec.endswith(".py") or "/" in spec or os.sep in spec):
            raise ModelError(
                f"model spec {spec!r} looks like a file but names no factory",
                hint=f"write it as '{spec}:factory', where factory is a function that returns the nn.Module",
            )
        model = create_model(spec, num_classes=num_classes, in_channels=in_channels)
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory of {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights, trust_pickle=trust_pickle)
    return model


def _looks_like_bare_windows_path(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z]:[\\/][^:]*", spec))


def _is_file_source(source: str) -> bool:
    return source.endswith(".py") or "/" in source or "\\" in source or os.sep in source


def _import_file(source: str) -> Any:
    path = Path(source).expanduser()
    if not path.is_file():
        what = "is a directory, not a Python file" if path.is_dir() else "does not exist"
        raise ModelError(f"model file {str(path)!r} {what}", hint="check the path before ':' in the model spec")
    path = path.resolve()
    name = "_edgec_user_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    try:
        # reused: the same file twice in one process (teacher + student) gives the same classes
        module = usercode.import_file(path, name, reuse=True)
    except Exception as e:
        raise ModelError(f"importing model file {str(path)!r} failed: {type(e).__name__}: {e}") from e
    if module is None:
        raise ModelError(f"cannot import {str(path)!r} as a Python module")
    return module


def _import_module(source: str) -> Any:
    try:
        return usercode.import_module(source)
    except ModuleNotFoundError as e:
        if usercode.is_missing_module(e, source):
            raise ModelError(
                f"cannot import module {source!r} (no module named {e.name!r})",
                hint="install the package or put its folder on PYTHONPATH; for a file use 'path/to/file.py:factory'",
            ) from e
        raise ModelError(f"importing module {source!r} failed: {e}", hint="a dependency of that module is missing") from e
    except Exception as e:
        raise ModelError(f"importing module {source!r} failed: {type(e).__name__}: {e}") from e


def _get_factory(module: Any, attr: str, spec: str) -> Any:
    from torch import nn

    try:
        obj = getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        raise ModelError(f"{spec!r}: module has no attribute {attr!r}; {did_you_mean(attr, names)}") from None
    if isinstance(obj, nn.Module):
        raise ModelError(
            f"{spec!r} is an nn.Module instance, not a factory",
            hint=f"expose a function (or the class) that builds the model, e.g. `def {attr}(num_classes=10): ...`",
        )
    if not callable(obj):
        raise ModelError(f"{spec!r} is a {type(obj).__name__}, not a callable that builds the model")
    return obj


def _call_factory(factory: Any, spec: str, **requested: int | None) -> Any:
    kwargs: dict[str, int] = {}
    ignored: list[str] = []
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins / C callables without a signature
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in requested.items():
        if value is None:
            continue
        p = params.get(key)
        if takes_any or (p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)):
            kwargs[key] = value
        else:
            ignored.append(f"{key}={value}")
    if ignored:
        warnings.warn(
            f"{spec!r} does not accept {', '.join(ignored)}; it was built with its own defaults",
            stacklevel=3,
        )
    try:
        return factory(**kwargs)
    except Exception as e:
        raise ModelError(f"calling factory {spec!r}({_fmt_kwargs(kwargs)}) failed: {type(e).__name__}: {e}") from e


def _fmt_kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


# ------------------------------------------------------------------------------------- weights
def load_weights(model: nn.Module, path: str | os.PathLike[str], *, trust_pickle: bool = False) -> nn.Module:
    """Load a checkpoint into ``model`` strictly and return ``model``.

    Accepts a raw state_dict or a dict holding one under ``"model"`` or ``"state_dict"``; with
    ``trust_pickle=True`` also a pickled whole ``nn.Module``. A ``module.`` prefix (DataParallel/DDP)
    is stripped when that makes the keys match.
    """
    state = _extract_state_dict(_read_checkpoint(Path(path).expanduser(), trust_pickle=trust_pickle), path)
    _load_strict(model, state, path)
    return model


def _read_checkpoint(path: Path, *, trust_pickle: bool) -> Any:
    import pickle

    import torch

    if not path.exists():
        raise ModelError(f"weights file {str(path)!r} does not exist", hint="check the --weights path")
    if not path.is_file():
        raise ModelError(f"weights path {str(path)!r} is not a file")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*pickle protocol.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*weights_only.*")
        try:
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as e:
            if trust_pickle:
                raise _not_torch(path, e) from e
            msg = str(e)
            m = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
            if m is not None:
                raise ModelError(
                    f"weights file {str(path)!r} contains a pickled object ({m.group(1)}), not just tensors; "
                    "loading it would unpickle it, which can run arbitrary code",
                    hint=f"pass --trust-pickle (trust_pickle=True) only if you trust the source of this file, or {_RESAVE}",
                ) from e
            if "Weights only load failed" in msg and not _looks_like_pickle(path):
                raise ModelError(  # random bytes: --trust-pickle would not help, never suggest it
                    f"weights file {str(path)!r} is not a PyTorch checkpoint (neither a torch.save zip archive "
                    "nor a pickle)",
                    hint="expected a file written by torch.save(model.state_dict(), path) or edgec's save_weights",
                ) from e
            if "Weights only load failed" in msg:
                raise ModelError(
                    f"weights file {str(path)!r} is not a PyTorch weights file that can be loaded safely "
                    "(weights-only unpickler refused it)",
                    hint=f"expected a file written by torch.save; if it is a pickle from a source you trust, "
                    f"pass --trust-pickle, or {_RESAVE}",
                ) from e
            raise _not_torch(path, e) from e
        except (AttributeError, ModuleNotFoundError) as e:
            # trust_pickle: the pickled object refers to a class that cannot be imported here
            raise ModelError(
                f"weights file {str(path)!r} holds a pickled object whose class cannot be imported: {e}",
                hint=f"import/install the code that defines the model, or {_RESAVE} where it can be loaded",
            ) from e
        except Exception as e:
            raise _not_torch(path, e) from e


def _looks_like_pickle(path: Path) -> bool:
    """torch.save's zip archive, or a pickle of protocol 2..5 (what a pickled checkpoint starts with)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _not_torch(path: Path, e: BaseException) -> ModelError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelError(
        f"weights file {str(path)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {reason[:200]})",
        hint="expected a file written by torch.save(model.state_dict(), path) or edgec's save_weights",
    )


def _extract_state_dict(obj: Any, path: Any) -> Mapping[str, Any]:
    from torch import nn

    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict()
            if isinstance(inner, Mapping) and _is_state_dict(inner):
                return inner
        if _is_state_dict(obj):
            return obj
        keys = ", ".join(repr(k) for k in list(obj)[:_SHOW])
        raise ModelError(
            f"weights file {str(path)!r} holds a dict that is not a state_dict (top-level keys: {keys})",
            hint="expected a state_dict, or a checkpoint dict with the state_dict under 'model' or 'state_dict'",
        )
    raise ModelError(
        f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state_dict",
        hint=f"{_RESAVE}",
    )


def _is_state_dict(d: Mapping[Any, Any]) -> bool:
    import torch

    return len(d) > 0 and all(isinstance(k, str) for k in d) and any(isinstance(v, torch.Tensor) for v in d.values())


def _load_strict(model: nn.Module, state: Mapping[str, Any], path: Any) -> None:
    expected = model.state_dict()
    state = _maybe_strip_prefix(dict(state), expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and hasattr(v, "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                shown = "\n".join(f"    {s}" for s in items[:_SHOW])
                more = f"\n    ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
                parts.append(f"  {label} ({len(items)}):\n{shown}{more}")
        raise ModelError(
            f"weights in {str(path)!r} do not match {type(model).__name__}:\n" + "\n".join(parts),
            hint="were these weights saved from the same architecture / num_classes / in_channels?",
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. dtype/extra-state problems not caught above
        raise ModelError(f"loading weights from {str(path)!r} failed: {e}") from e


def _maybe_strip_prefix(state: dict[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``{"model": model.state_dict()}`` atomically (temp file in the same folder, then
    ``os.replace``); returns the path. Readable with ``weights_only=True``."""
    import torch

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    from edgec.atomic import atomic_torch_save

    atomic_torch_save({"model": state}, path)
    return path

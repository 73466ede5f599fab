"""``python:MODULE:FACTORY`` / ``python:FILE.py:FACTORY``: a user's factory returning
``(train_dataset, eval_dataset)`` or a :class:`~edgec.data.bundle.DataBundle`."""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from typing import Any

import numpy as np

from edgec import usercode
from edgec.data.bundle import DataBundle, DataKind, _check_path, _random_indices
from edgec.errors import DataError
from edgec.registry import did_you_mean

HELP = ("python:MODULE:FACTORY or python:FILE.py:FACTORY -- factory() returns "
        "(train_dataset, eval_dataset) or a DataBundle")


def _import_target(target: str) -> Any:
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = _check_path(target, "python data module")
        name = "_edgec_user_data_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        try:
            module = usercode.import_file(path, name)
        except Exception as e:
            raise DataError(f"importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
        if module is None:
            raise DataError(f"cannot load {str(path)!r} as a python module")
        return module
    try:
        return usercode.import_module(target, search=os.getcwd())
    except ModuleNotFoundError as e:
        if usercode.is_missing_module(e, target):
            raise DataError(
                f"cannot import python module {target!r}",
                hint="give an importable module (installed, or relative to the current directory) "
                "or a file: python:path/to/file.py:factory",
            ) from e
        raise DataError(f"importing {target!r} failed: {e}") from e
    except Exception as e:
        raise DataError(f"importing {target!r} failed: {type(e).__name__}: {e}") from e


def _labels_of(ds: Any) -> np.ndarray:
    """All labels of a map-style dataset (fast for TensorDataset and Subsets of one)."""
    from torch.utils.data import Subset, TensorDataset

    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[1].detach().cpu().numpy().astype(np.int64).reshape(-1)
    if isinstance(ds, Subset):
        return _labels_of(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


def _check_dataset(ds: Any, which: str, where: str) -> None:
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise DataError(
            f"{where} returned a {which} dataset of type {type(ds).__name__} without __len__/__getitem__",
            hint="return map-style datasets, e.g. torch.utils.data.TensorDataset(x, y)",
        )
    if len(ds) == 0:
        raise DataError(f"{where} returned an empty {which} dataset")


def load_python(spec: str, arg: str, *, seed: int, max_train: int | None, max_eval: int | None) -> DataBundle:
    from torch.utils.data import Subset

    target, sep, factory_name = arg.rpartition(":")
    if not sep or not target or not factory_name:
        raise DataError(f"bad python data spec {spec!r}", hint="use: " + HELP)
    module = _import_target(target)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise DataError(f"{target!r} has no callable {factory_name!r}; {did_you_mean(factory_name, names)}")
    where = f"{target}:{factory_name}()"
    try:
        result = factory()
    except Exception as e:
        raise DataError(f"{where} raised {type(e).__name__}: {e}") from e

    if isinstance(result, DataBundle):
        _check_dataset(result.train, "train", where)
        _check_dataset(result.eval, "eval", where)
        changes: dict[str, Any] = {}
        if max_train is not None and max_train < len(result.train):
            changes["train"] = Subset(result.train, _random_indices(len(result.train), max_train, seed, 1).tolist())
        if max_eval is not None and max_eval < len(result.eval):
            changes["eval"] = Subset(result.eval, _random_indices(len(result.eval), max_eval, seed, 2).tolist())
        if not result.spec:
            changes["spec"] = spec
        return replace(result, **changes) if changes else result

    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise DataError(
            f"{where} returned {type(result).__name__}, expected (train_dataset, eval_dataset) or a DataBundle"
        )
    train, evald = result
    return bundle_from_datasets(train, evald, where=where, spec=spec, seed=seed, max_train=max_train,
                                max_eval=max_eval)


def bundle_from_datasets(train: Any, evald: Any, *, where: str, spec: str, seed: int = 0,
                         max_train: int | None = None, max_eval: int | None = None) -> DataBundle:
    """A :class:`DataBundle` around a pair of map-style datasets yielding ``(tensor, label)`` (a
    ``python:`` factory's result, or the datasets given to :func:`edgec.compress`). Classes come from
    the train set's ``num_classes`` / ``classes`` attributes or its labels; ``normalization`` and
    ``augment`` attributes are used when present. ``where`` names the source in error messages."""
    import torch
    from torch.utils.data import Subset

    _check_dataset(train, "train", where)
    _check_dataset(evald, "eval", where)
    sample = train[0]
    if not (isinstance(sample, (tuple, list)) and len(sample) >= 2 and isinstance(sample[0], torch.Tensor)):
        raise DataError(
            f"{where}: train[0] is {type(sample).__name__}, expected a tuple (x: float tensor (C,H,W), y: int)",
            hint="make the dataset yield (torch.Tensor, label) pairs",
        )
    input_shape = tuple(int(v) for v in sample[0].shape)
    classes_attr = getattr(train, "classes", None)
    if getattr(train, "num_classes", None) is not None:
        num_classes = int(train.num_classes)
    elif classes_attr is not None:
        num_classes = len(classes_attr)
    else:
        num_classes = int(max(_labels_of(train).max(), _labels_of(evald).max())) + 1
    if classes_attr is not None and len(classes_attr) == num_classes:
        classes = [str(c) for c in classes_attr]
    else:
        classes = [str(i) for i in range(num_classes)]
    normalization = dict(getattr(train, "normalization", None) or {})
    augment = getattr(train, "augment", None)
    if max_train is not None and max_train < len(train):
        train = Subset(train, _random_indices(len(train), max_train, seed, 1).tolist())
    if max_eval is not None and max_eval < len(evald):
        evald = Subset(evald, _random_indices(len(evald), max_eval, seed, 2).tolist())
    return DataBundle(
        spec=spec,
        train=train,
        eval=evald,
        num_classes=num_classes,
        input_shape=input_shape,
        classes=classes,
        augment=augment if callable(augment) else None,
        normalization=normalization,
    )




KIND = DataKind("python", HELP, load_python)

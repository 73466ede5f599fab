"""``cifar10:PATH``: CIFAR-10 from the python pickle batches or an ImageFolder copy."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from edgec.data.augment import RandomCropFlip
from edgec.data.bundle import DataBundle, DataKind, _check_path, _stratified_indices, _tensor_dataset
from edgec.data.images import _decode_split, _normalize_uint8, _scan_split
from edgec.errors import DataError

log = logging.getLogger(__name__)

HELP = "cifar10:PATH -- CIFAR-10 from the python pickle batches or an ImageFolder copy"


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR10_LAYOUTS = (
    "cifar10:PATH accepts exactly two layouts:\n"
    "  1. python pickle batches (from cifar-10-python.tar.gz): PATH/data_batch_1 ... "
    "PATH/data_batch_5 and PATH/test_batch (optionally PATH/batches.meta), or PATH/cifar-10-batches-py/ "
    "holding those files\n"
    "  2. ImageFolder: PATH/train/<class>/*.png|jpg and PATH/test/<class>/*.png|jpg with the 10 "
    "class folders airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck"
)
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def load_cifar10(spec: str, arg: str, *, seed: int, max_train: int | None, max_eval: int | None) -> DataBundle:
    root = _check_path(arg, "cifar10")
    if not root.is_dir():
        raise DataError(f"cifar10 path {str(root)!r} is a file, not a folder", hint=CIFAR10_LAYOUTS)
    pickle_dir = _find_cifar_pickle_dir(root)
    if pickle_dir is not None:
        classes, (xtr, ytr), (xev, yev) = _read_cifar_pickles(pickle_dir)
        itr = _stratified_indices(ytr, max_train, seed, 1)
        iev = _stratified_indices(yev, max_eval, seed, 2)
        xtr, ytr, xev, yev = xtr[itr], ytr[itr], xev[iev], yev[iev]
    elif (root / "train").is_dir() and (root / "test").is_dir():
        tr = _scan_split(root / "train", layout=CIFAR10_LAYOUTS)
        classes = tr.classes
        if len(classes) != 10:
            raise DataError(
                f"{str(root / 'train')!r} has {len(classes)} class folders ({', '.join(classes)}), "
                "CIFAR-10 has 10",
                hint=CIFAR10_LAYOUTS,
            )
        if tuple(classes) != CIFAR10_CLASSES:
            log.warning("cifar10 class folders %s differ from the canonical names; using them as found", classes)
        ev = _scan_split(root / "test", classes=classes, layout=CIFAR10_LAYOUTS)
        xtr, ytr = _decode_split(tr, _stratified_indices(tr.labels, max_train, seed, 1), "RGB", (32, 32))
        xev, yev = _decode_split(ev, _stratified_indices(ev.labels, max_eval, seed, 2), "RGB", (32, 32))
    else:
        raise DataError(f"{str(root)!r} is not a CIFAR-10 folder: {_describe_cifar_miss(root)}", hint=CIFAR10_LAYOUTS)

    return DataBundle(
        spec=f"cifar10:{root}",
        train=_tensor_dataset(_normalize_uint8(xtr, CIFAR10_MEAN, CIFAR10_STD), ytr),
        eval=_tensor_dataset(_normalize_uint8(xev, CIFAR10_MEAN, CIFAR10_STD), yev),
        num_classes=10,
        input_shape=(3, 32, 32),
        classes=list(classes),
        augment=RandomCropFlip(padding=4, flip=True),
        normalization={"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD), "input_scale": 1.0 / 255.0},
    )


def _find_cifar_pickle_dir(root: Path) -> Path | None:
    for cand in (root, root / "cifar-10-batches-py"):
        if any((cand / name).is_file() for name in (*_CIFAR_TRAIN_BATCHES, "test_batch")):
            return cand
    return None


def _describe_cifar_miss(root: Path) -> str:
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    parts = []
    if (root / "train").is_dir() and not (root / "test").is_dir():
        parts.append("it has train/ but no test/ folder")
    elif (root / "test").is_dir() and not (root / "train").is_dir():
        parts.append("it has test/ but no train/ folder")
    else:
        parts.append("no data_batch_*/test_batch files and no train/ + test/ folders")
    for label, names in (("folders", subdirs), ("files", files)):
        if names:
            parts.append(f"{label}: " + ", ".join(names[:8]) + (" ..." if len(names) > 8 else ""))
    if not subdirs and not files:
        parts.append("the folder is empty")
    return "; ".join(parts)


class _CifarUnpickler(pickle.Unpickler):
    """Loads the CIFAR batch dicts without running arbitrary code from a user-supplied pickle."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"cannot read CIFAR pickle {str(path)!r}: {e}", hint=CIFAR10_LAYOUTS) from e
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR pickle {str(path)!r} holds a {type(obj).__name__}, expected a dict", hint=CIFAR10_LAYOUTS)
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    if "data" not in d or "labels" not in d:
        raise DataError(
            f"CIFAR pickle {str(path)!r} lacks b'data'/b'labels' (keys: {sorted(map(str, d))})",
            hint=CIFAR10_LAYOUTS,
        )
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(
            f"CIFAR pickle {str(path)!r}: data has shape {data.shape} with {len(labels)} labels, "
            "expected (N, 3072) uint8 and N labels",
            hint=CIFAR10_LAYOUTS,
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR pickle {str(path)!r}: labels outside 0..9", hint=CIFAR10_LAYOUTS)
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_pickles(d: Path) -> tuple[list[str], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    missing = [n for n in (*_CIFAR_TRAIN_BATCHES, "test_batch") if not (d / n).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 pickle folder {str(d)!r} is missing {', '.join(missing)}", hint=CIFAR10_LAYOUTS
        )
    parts = [_read_cifar_batch(d / n) for n in _CIFAR_TRAIN_BATCHES]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xev, yev = _read_cifar_batch(d / "test_batch")
    classes = list(CIFAR10_CLASSES)
    if (d / "batches.meta").is_file():
        names = _read_pickle(d / "batches.meta").get("label_names")
        if names is not None:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            if len(names) != 10:
                raise DataError(f"{str(d / 'batches.meta')!r} lists {len(names)} label names, expected 10")
            classes = names
    return classes, (xtr, ytr), (xev, yev)


KIND = DataKind("cifar10", HELP, load_cifar10)

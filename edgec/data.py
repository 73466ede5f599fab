"""Datasets for compression runs: one spec string -> a :class:`DataBundle`.

Spec forms (``load_data(spec)``)::

    digits                          sklearn 8x8 digits, 1x8x8, 10 classes (tiny; tests and demos)
    cifar10:PATH                    CIFAR-10, pickle batches or ImageFolder (see CIFAR10_LAYOUTS)
    imagefolder:PATH                PATH/train/<class>/<img> + PATH/test|val/<class>/<img>
    python:pkg.module:factory       factory() -> (train_ds, eval_ds) or a DataBundle
    python:path/to/file.py:factory  same, loading the file by path
    speechcommands:PATH | fsdd:PATH | tau2020mobile:PATH   audio -> log-mel (see edgec.audio_data)

Every dataset yields ``(x: float32 (C,H,W), y: int64 scalar)``, already normalised; the
``normalization`` dict of the bundle says how (``x = (pixel * input_scale - mean) / std`` per
channel) so a device-side user can reproduce the preprocessing. Train-time augmentation is *not*
baked into the dataset: ``bundle.augment(batch, generator)`` is applied by the training engine on
a float batch, deterministically given the generator.

Decoding 60k JPEGs is slow, so image folders are decoded once into uint8 ``.npy`` files under
``$EDGEC_CACHE`` (default ``~/.cache/edgec``), keyed by the absolute path, file count and newest
mtime. With ``max_train``/``max_eval`` and no cache yet, only the selected images are decoded.

Calibration sets are recorded as manifests (which indices, seed, sha256 of the indices) so PTQ
and INT8 engine builds can be reproduced and verified later.

torch, PIL and scikit-learn are imported inside the functions that need them (lean imports).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgec import usercode
from edgec.errors import DataError
from edgec.registry import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch.utils.data import Dataset, Subset

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_LAYOUTS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATA_KINDS",
    "IMAGEFOLDER_LAYOUT",
    "DataBundle",
    "RandomCropFlip",
    "calibration_subset",
    "default_cache_dir",
    "holdout_split",
    "indices_sha256",
    "load_data",
    "load_manifest",
    "save_manifest",
    "subset_from_manifest",
    "to_numpy",
]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

#: spec form -> one-line description (for ``edgec`` help / discovery)
DATA_KINDS: dict[str, str] = {
    "digits": "digits -- sklearn 8x8 handwritten digits (1x8x8, 10 classes, stratified 80/20 split)",
    "cifar10": "cifar10:PATH -- CIFAR-10 from the python pickle batches or an ImageFolder copy",
    "imagefolder": "imagefolder:PATH -- PATH/train/<class>/<img> and PATH/test|val/<class>/<img>",
    "python": "python:MODULE:FACTORY or python:FILE.py:FACTORY -- factory() returns "
    "(train_dataset, eval_dataset) or a DataBundle",
    # audio kinds: loaded by edgec.audio_data
    "speechcommands": "speechcommands:PATH[?eval=test|val] -- Speech Commands folder per label, 12 classes, "
    "speaker-disjoint split; log-mel (1,40,101)",
    "fsdd": "fsdd:PATH[?train_speakers=a,b,c,d] -- Free Spoken Digit Dataset (8 kHz -> 16 kHz), official "
    "or speaker split; log-mel (1,40,101)",
    "tau2020mobile": "tau2020mobile:PATH -- TAU Urban Acoustic Scenes 2020 Mobile layout, 10 scenes, "
    "per-device groups",
}

CIFAR10_LAYOUTS = (
    "cifar10:PATH accepts exactly two layouts:\n"
    "  1. python pickle batches (from cifar-10-python.tar.gz): PATH/data_batch_1 ... "
    "PATH/data_batch_5 and PATH/test_batch (optionally PATH/batches.meta), or PATH/cifar-10-batches-py/ "
    "holding those files\n"
    "  2. ImageFolder: PATH/train/<class>/*.png|jpg and PATH/test/<class>/*.png|jpg with the 10 "
    "class folders airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck"
)
IMAGEFOLDER_LAYOUT = (
    "imagefolder:PATH expects PATH/train/<class>/<image> and PATH/test/<class>/<image> "
    "(PATH/val/ is accepted instead of PATH/test/); images are .png/.jpg/.jpeg/.bmp/.webp, "
    "all of the same size"
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CACHE_FORMAT = "edgec-imagefolder-v1"
_POOL_MIN_IMAGES = 4000  # below this a process pool costs more than it saves
_POOL_CHUNK = 1000


# --------------------------------------------------------------------------------------------
# the bundle


@dataclass
class DataBundle:
    """Everything a run needs to know about its data.

    ``augment`` is a batch-level train augmentation ``(x: float (N,C,H,W), generator) -> x``
    applied by the training engine (``None``: no augmentation). ``normalization`` holds
    ``mean``/``std`` lists (per channel) and ``input_scale`` (raw pixel -> [0, 1]) so the
    preprocessing can be reproduced on a device: ``x = (pixel * input_scale - mean) / std``.
    """

    spec: str
    train: Dataset
    eval: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    classes: list[str]
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    normalization: dict = field(default_factory=dict)
    #: per-sample metadata of the eval split, aligned with ``eval``: name -> array (N,), e.g.
    #: ``{"speaker": ...}`` or ``{"device": ...}`` for audio data (accuracy per group)
    groups: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line for logs and reports."""
        return (
            f"{self.spec}: {len(self.train)} train / {len(self.eval)} eval samples, "  # type: ignore[arg-type]
            f"{self.num_classes} classes, input {tuple(self.input_shape)}"
        )


# --------------------------------------------------------------------------------------------
# augmentation


class RandomCropFlip:
    """Random crop (with ``padding`` pixels of zeros around) + random horizontal flip, batched.

    Works on an already normalised float batch (N,C,H,W), so the zero padding is zero in the
    normalised space (the dataset mean colour). All randomness comes from ``generator``: the same
    generator state gives the same output. A picklable class rather than a closure, so it can be
    sent to worker processes.
    """

    def __init__(self, padding: int = 4, flip: bool = True):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = int(padding)
        self.flip = bool(flip)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        if x.dim() != 4:
            raise ValueError(f"RandomCropFlip expects a batch (N,C,H,W), got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        p = self.padding
        gdev = generator.device
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=gdev).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=gdev).to(x.device)
        flip = torch.rand(n, generator=generator, device=gdev).to(x.device) < 0.5
        if not self.flip:
            flip = torch.zeros_like(flip)
        padded = F.pad(x, (p, p, p, p)) if p else x
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)
        rows = oy[:, None] + ar_h  # (N, H)
        cols = torch.where(flip[:, None], ox[:, None] + (w - 1 - ar_w), ox[:, None] + ar_w)  # (N, W)
        out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * p))
        return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


# --------------------------------------------------------------------------------------------
# entry point


def load_data(
    spec: str,
    *,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> DataBundle:
    """Parse a data spec (see the module docstring) and load it.

    ``max_train``/``max_eval`` keep a deterministic, seeded, class-stratified subset (seeded
    random for ``python:`` datasets whose labels are not cheap to read).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("empty data spec", hint="use one of: " + "; ".join(DATA_KINDS.values()))
    for name, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{name} must be a positive integer or None, got {value!r}")
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in DATA_KINDS:
        raise DataError(
            f"unknown data kind {kind!r} in spec {spec!r}; {did_you_mean(kind, tuple(DATA_KINDS))}",
            hint="data specs: " + "; ".join(DATA_KINDS.values()),
        )
    if kind == "digits":
        if arg:
            raise DataError(f"the digits dataset takes no argument, got {spec!r}", hint="use: digits")
        return _load_digits(seed=seed, max_train=max_train, max_eval=max_eval)
    if not arg:
        raise DataError(f"data spec {spec!r} needs an argument", hint=f"use: {DATA_KINDS[kind]}")
    if kind == "cifar10":
        return _load_cifar10(arg, seed=seed, max_train=max_train, max_eval=max_eval)
    if kind == "imagefolder":
        return _load_imagefolder(arg, seed=seed, max_train=max_train, max_eval=max_eval)
    if kind in ("speechcommands", "fsdd", "tau2020mobile"):
        from edgec.audio_data import load_audio_data

        return load_audio_data(kind, arg, seed=seed, max_train=max_train, max_eval=max_eval)
    return _load_python(spec, arg, seed=seed, max_train=max_train, max_eval=max_eval)


# --------------------------------------------------------------------------------------------
# helpers shared by the loaders


def _stratified_indices(labels: np.ndarray, n: int | None, seed: int, salt: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``n`` samples, class proportions kept.

    Each class is shuffled; a sample's key is its fractional position within its class, so the
    first ``n`` keys take (nearly) the same fraction of every class.
    """
    total = len(labels)
    if n is None or n >= total:
        return np.arange(total)
    rng = np.random.default_rng([seed, salt])
    perm = rng.permutation(total)
    lab = np.asarray(labels, dtype=np.int64)[perm]
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]
    rank_sorted = np.arange(total) - np.searchsorted(sorted_lab, sorted_lab, side="left")
    rank = np.empty(total, dtype=np.int64)
    rank[order] = rank_sorted
    counts = np.bincount(lab)
    key = (rank + 0.5) / counts[lab]
    return np.sort(perm[np.argsort(key, kind="stable")[:n]])


def _random_indices(total: int, n: int | None, seed: int, salt: int) -> np.ndarray:
    if n is None or n >= total:
        return np.arange(total)
    rng = np.random.default_rng([seed, salt])
    return np.sort(rng.choice(total, size=n, replace=False))


def _normalize_uint8(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N,C,H,W) -> normalised float32 tensor, in place on one float copy."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    t.div_(255.0)
    t.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    t.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return t


def _tensor_dataset(x: torch.Tensor, y: np.ndarray) -> Dataset:
    import torch
    from torch.utils.data import TensorDataset

    return TensorDataset(x, torch.as_tensor(np.asarray(y, dtype=np.int64)))


def _channel_stats_uint8(x: np.ndarray, block: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 (N,C,H,W) on the [0,1] scale, in blocks (no big float copy)."""
    c = x.shape[1]
    s = np.zeros(c, dtype=np.float64)
    s2 = np.zeros(c, dtype=np.float64)
    for i in range(0, x.shape[0], block):
        b = x[i : i + block].astype(np.float64) / 255.0
        s += b.sum(axis=(0, 2, 3))
        s2 += (b * b).sum(axis=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / count
    std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
    std = np.where(std < 1e-8, 1.0, std)  # a constant channel: do not divide by zero
    return [float(v) for v in mean], [float(v) for v in std]


def _check_path(arg: str, what: str) -> Path:
    path = Path(arg).expanduser()
    if not path.exists():
        raise DataError(
            f"{what} path {str(path)!r} does not exist (resolved from {str(path.resolve())!r})",
            hint="check the path in the data spec; relative paths are taken from the current directory",
        )
    return path.resolve()


# --------------------------------------------------------------------------------------------
# digits


def _load_digits(*, seed: int, max_train: int | None, max_eval: int | None) -> DataBundle:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data.astype(np.float64) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    idx_train, idx_eval = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y
    )
    idx_train = np.sort(idx_train)[_stratified_indices(y[np.sort(idx_train)], max_train, seed, 1)]
    idx_eval = np.sort(idx_eval)[_stratified_indices(y[np.sort(idx_eval)], max_eval, seed, 2)]
    mean = float(x[idx_train].mean())
    std = float(x[idx_train].std()) or 1.0

    def make(idx: np.ndarray) -> Dataset:
        xs = torch.from_numpy(((x[idx] - mean) / std).astype(np.float32))
        return _tensor_dataset(xs, y[idx])

    return DataBundle(
        spec="digits",
        train=make(idx_train),
        eval=make(idx_eval),
        num_classes=10,
        input_shape=(1, 8, 8),
        classes=[str(i) for i in range(10)],
        augment=None,
        normalization={"mean": [mean], "std": [std], "input_scale": 1.0 / 16.0},
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10


def _load_cifar10(arg: str, *, seed: int, max_train: int | None, max_eval: int | None) -> DataBundle:
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


# --------------------------------------------------------------------------------------------
# image folders (+ decode cache)


@dataclass
class _Split:
    root: Path
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    newest_mtime_ns: int


def _scan_split(split_dir: Path, *, layout: str, classes: list[str] | None = None) -> _Split:
    """List ``split_dir/<class>/<image>`` in sorted order (classes, then file names)."""
    class_dirs = sorted(
        (e for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name
    )
    if not class_dirs:
        raise DataError(f"{str(split_dir)!r} has no class folders", hint=layout)
    found = [e.name for e in class_dirs]
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(
                f"{str(split_dir)!r} has class folders not present in the train split: {', '.join(extra)}",
                hint="the eval split's classes must be a subset of the train split's: " + layout,
            )
    index = {c: i for i, c in enumerate(classes)}
    newest = split_dir.stat().st_mtime_ns
    paths: list[str] = []
    labels: list[int] = []
    for e in class_dirs:
        newest = max(newest, e.stat().st_mtime_ns)
        files = sorted(
            (f for f in os.scandir(e.path) if f.name.lower().endswith(IMAGE_EXTENSIONS) and not f.name.startswith(".")),
            key=lambda f: f.name,
        )
        for f in files:
            newest = max(newest, f.stat().st_mtime_ns)
            paths.append(f.path)
            labels.append(index[e.name])
    if not paths:
        raise DataError(f"{str(split_dir)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})", hint=layout)
    return _Split(split_dir, list(classes), paths, np.asarray(labels, dtype=np.int64), newest)


def default_cache_dir() -> Path:
    """``$EDGEC_CACHE`` or ``~/.cache/edgec``."""
    env = os.environ.get("EDGEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgec"


def _cache_key(split: _Split, mode: str) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps([_CACHE_FORMAT, str(split.root.resolve()), len(split.paths), split.newest_mtime_ns, mode]).encode()
    )
    return h.hexdigest()[:24]


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    from edgec.atomic import atomic_write

    atomic_write(path, lambda fh: np.save(fh, arr))


def _decode_split(
    split: _Split, indices: np.ndarray, mode: str, size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N,C,H,W) images and labels of ``split`` at ``indices``, through the decode cache.

    The whole split is decoded and cached when all of it is asked for; a subset with no cache
    yet decodes only the subset (and writes nothing).
    """
    full = len(indices) == len(split.paths)
    cache = default_cache_dir() / f"{split.root.parent.name}-{split.root.name}-{_cache_key(split, mode)}-x.npy"
    if cache.is_file():
        try:
            arr = np.load(cache, mmap_mode="r")
            if arr.shape[0] == len(split.paths) and arr.dtype == np.uint8 and arr.ndim == 4:
                if size is not None and tuple(arr.shape[2:]) != (size[1], size[0]):
                    raise DataError(
                        f"images under {str(split.root)!r} are {arr.shape[3]}x{arr.shape[2]}, expected {size[0]}x{size[1]}"
                    )
                return np.array(arr[indices]), split.labels[indices]
            log.warning("ignoring decode cache %s: shape %s does not match %d files", cache, arr.shape, len(split.paths))
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable decode cache %s: %s", cache, e)
    paths = [split.paths[i] for i in indices]
    t0 = time.perf_counter()
    x = _decode_images(paths, mode, size)
    log.info("decoded %d images under %s in %.1fs", len(paths), split.root, time.perf_counter() - t0)
    if full:
        try:
            _atomic_save_npy(cache, x)
        except OSError as e:
            log.warning("could not write decode cache %s (%s); the next load decodes again", cache, e)
    return x, split.labels[indices]


def _decode_chunk(task: tuple[list[str], str, tuple[int, int]]) -> tuple[np.ndarray | None, tuple | None]:
    """Decode a list of files to uint8 (n,C,H,W); on a problem return (None, (i, path, reason))."""
    from PIL import Image

    paths, mode, size = task
    c = 1 if mode == "L" else 3
    out = np.empty((len(paths), c, size[1], size[0]), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                if im.size != tuple(size):
                    return None, (i, p, f"is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]} like the first image")
                a = np.asarray(im.convert(mode))
        except OSError as e:
            return None, (i, p, f"cannot be decoded: {e}")
        out[i] = a[None] if c == 1 else a.transpose(2, 0, 1)
    return out, None


def _first_image_info(path: str) -> tuple[str, tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = "L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            return mode, im.size
    except OSError as e:
        raise DataError(f"image {path!r} cannot be decoded: {e}") from e


def _decode_images(
    paths: list[str], mode: str, size: tuple[int, int] | None, *, workers: int | None = None
) -> np.ndarray:
    """Decode ``paths`` with PIL into uint8 (N,C,H,W); a pool of up to 2 processes for many files."""
    if size is None:
        size = _first_image_info(paths[0])[1]
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if len(paths) >= _POOL_MIN_IMAGES else 1
    chunk = _POOL_CHUNK if workers == 1 else max(1, min(_POOL_CHUNK, -(-len(paths) // (workers * 4))))
    tasks = [(paths[i : i + chunk], mode, tuple(size)) for i in range(0, len(paths), chunk)]
    if workers > 1 and len(tasks) > 1:
        import multiprocessing as mp

        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            results = pool.map(_decode_chunk, tasks)
    else:
        results = [_decode_chunk(t) for t in tasks]
    for arr, problem in results:
        if problem is not None:
            _, p, reason = problem
            raise DataError(
                f"image {p!r} {reason}",
                hint="all images must have the same size (resize them beforehand) and be readable",
            )
    return np.concatenate([r[0] for r in results]) if results else np.empty((0,), np.uint8)


def _load_imagefolder(arg: str, *, seed: int, max_train: int | None, max_eval: int | None) -> DataBundle:
    root = _check_path(arg, "imagefolder")
    if not root.is_dir():
        raise DataError(f"imagefolder path {str(root)!r} is a file, not a folder", hint=IMAGEFOLDER_LAYOUT)
    eval_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or eval_dir is None:
        what = "no train/ folder" if not (root / "train").is_dir() else "no test/ or val/ folder"
        raise DataError(f"{str(root)!r} is not an image folder: {what}", hint=IMAGEFOLDER_LAYOUT)
    tr = _scan_split(root / "train", layout=IMAGEFOLDER_LAYOUT)
    ev = _scan_split(eval_dir, classes=tr.classes, layout=IMAGEFOLDER_LAYOUT)
    mode, size = _first_image_info(tr.paths[0])
    xtr, ytr = _decode_split(tr, _stratified_indices(tr.labels, max_train, seed, 1), mode, size)
    xev, yev = _decode_split(ev, _stratified_indices(ev.labels, max_eval, seed, 2), mode, size)
    mean, std = _channel_stats_uint8(xtr)
    return DataBundle(
        spec=f"imagefolder:{root}",
        train=_tensor_dataset(_normalize_uint8(xtr, mean, std), ytr),
        eval=_tensor_dataset(_normalize_uint8(xev, mean, std), yev),
        num_classes=len(tr.classes),
        input_shape=tuple(int(v) for v in xtr.shape[1:]),
        classes=list(tr.classes),
        augment=None,
        normalization={"mean": mean, "std": std, "input_scale": 1.0 / 255.0},
    )


# --------------------------------------------------------------------------------------------
# python:module:factory


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


def _load_python(spec: str, arg: str, *, seed: int, max_train: int | None, max_eval: int | None) -> DataBundle:
    import torch
    from torch.utils.data import Subset

    target, sep, factory_name = arg.rpartition(":")
    if not sep or not target or not factory_name:
        raise DataError(f"bad python data spec {spec!r}", hint="use: " + DATA_KINDS["python"])
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


# --------------------------------------------------------------------------------------------
# calibration subsets, manifests, hold-out splits


def indices_sha256(indices: Sequence[int]) -> str:
    """sha256 of the JSON list of indices (compact separators), as stored in manifests."""
    return hashlib.sha256(json.dumps([int(i) for i in indices], separators=(",", ":")).encode()).hexdigest()


def calibration_subset(dataset: Dataset, n: int, *, seed: int) -> tuple[Subset, dict]:
    """A seeded choice of ``n`` samples (indices sorted) and its manifest.

    The manifest ``{"n", "seed", "indices", "dataset_len", "sha256"}`` lets a later run check it
    uses the same samples (:func:`subset_from_manifest`).
    """
    from torch.utils.data import Subset

    total = len(dataset)  # type: ignore[arg-type]
    if not isinstance(n, int) or n < 1:
        raise DataError(f"calibration size must be a positive integer, got {n!r}")
    if n > total:
        raise DataError(
            f"asked for {n} calibration samples but the dataset has only {total}",
            hint=f"use at most {total} calibration samples, or a larger split",
        )
    rng = np.random.default_rng([int(seed), 0xCA1])
    indices = sorted(int(i) for i in rng.choice(total, size=n, replace=False))
    manifest = {
        "n": n,
        "seed": int(seed),
        "indices": indices,
        "dataset_len": total,
        "sha256": indices_sha256(indices),
    }
    return Subset(dataset, indices), manifest


_MANIFEST_KEYS = ("n", "seed", "indices", "dataset_len", "sha256")


def _validate_manifest(manifest: dict, source: str) -> dict:
    if not isinstance(manifest, dict):
        raise DataError(f"calibration manifest {source} is not a JSON object")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise DataError(f"calibration manifest {source} lacks {', '.join(missing)}")
    if indices_sha256(manifest["indices"]) != manifest["sha256"] or len(manifest["indices"]) != manifest["n"]:
        raise DataError(
            f"calibration manifest {source} is inconsistent: its indices do not match its sha256/n",
            hint="the file was edited or truncated; regenerate it with calibration_subset()",
        )
    return manifest


def save_manifest(manifest: dict, path: Path | str) -> None:
    """Write a manifest as JSON atomically (tmp file + os.replace)."""
    path = Path(path)
    _validate_manifest(manifest, repr(str(path)))
    from edgec.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")


def load_manifest(path: Path | str) -> dict:
    """Read and check a manifest written by :func:`save_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration manifest {str(path)!r} does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read calibration manifest {str(path)!r}: {e}") from e
    return _validate_manifest(manifest, repr(str(path)))


def subset_from_manifest(dataset: Dataset, manifest: dict) -> Subset:
    """The Subset a manifest describes, after checking it fits ``dataset``."""
    from torch.utils.data import Subset

    _validate_manifest(manifest, "")
    total = len(dataset)  # type: ignore[arg-type]
    if manifest["dataset_len"] != total:
        raise DataError(
            f"calibration manifest was made for a dataset of {manifest['dataset_len']} samples, "
            f"this one has {total}",
            hint="use the same data spec and max_train/max_eval as the run that wrote the manifest",
        )
    return Subset(dataset, list(manifest["indices"]))


def holdout_split(dataset: Dataset, fraction: float, *, seed: int) -> tuple[Subset, Subset]:
    """Seeded split into ``(rest, holdout)``; ``holdout`` has ``round(fraction * len)`` samples
    (at least 1, and at least 1 left in ``rest``). Both index lists are sorted."""
    from torch.utils.data import Subset

    total = len(dataset)  # type: ignore[arg-type]
    if not 0.0 < float(fraction) < 1.0:
        raise DataError(f"hold-out fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    if total < 2:
        raise DataError(f"cannot split a dataset of {total} sample(s) into two parts")
    k = min(max(1, round(total * float(fraction))), total - 1)
    perm = np.random.default_rng([int(seed), 0x401D]).permutation(total)
    hold = sorted(int(i) for i in perm[:k])
    rest = sorted(int(i) for i in perm[k:])
    return Subset(dataset, rest), Subset(dataset, hold)


# --------------------------------------------------------------------------------------------
# numpy export (ONNX Runtime evaluation)


def _tensor_source(ds: Any) -> tuple[Any, np.ndarray | None] | None:
    """(TensorDataset, indices or None) when ``ds`` is a TensorDataset or nested Subsets of one."""
    from torch.utils.data import Subset, TensorDataset

    idx: np.ndarray | None = None
    while isinstance(ds, Subset):
        sub = np.asarray(ds.indices, dtype=np.int64)
        idx = sub if idx is None else sub[idx]
        ds = ds.dataset
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds, idx
    return None


def to_numpy(dataset: Dataset, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack the first ``limit`` samples into ``x`` float32 (N,...) and ``y`` int64 (N,)."""
    total = len(dataset)  # type: ignore[arg-type]
    n = total if limit is None else max(0, min(int(limit), total))
    src = _tensor_source(dataset)
    if src is not None:
        tds, idx = src
        sel = np.arange(n) if idx is None else idx[:n]
        x = tds.tensors[0][sel].detach().cpu().numpy().astype(np.float32, copy=False)
        y = tds.tensors[1][sel].detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
        return np.ascontiguousarray(x), y
    xs, ys = [], []
    for i in range(n):
        x, y = dataset[i][:2]
        xs.append(np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float32))
        ys.append(int(y))
    if not xs:
        return np.empty((0,), np.float32), np.empty((0,), np.int64)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)

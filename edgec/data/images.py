"""Image folders: scanning ``<split>/<class>/<image>``, decoding with PIL (a process pool for
many files) through a uint8 decode cache, and the uint8 -> normalised float helpers.

Decoding 60k JPEGs is slow, so image folders are decoded once into uint8 ``.npy`` files under
``$EDGEC_CACHE`` (default ``~/.cache/edgec``), keyed by the absolute path, file count and newest
mtime. With ``max_train``/``max_eval`` and no cache yet, only the selected images are decoded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgec.data.cache import _atomic_save_npy, default_cache_dir
from edgec.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_CACHE_FORMAT = "edgec-imagefolder-v1"
_POOL_MIN_IMAGES = 4000  # below this a process pool costs more than it saves
_POOL_CHUNK = 1000


def _normalize_uint8(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N,C,H,W) -> normalised float32 tensor, in place on one float copy."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    t.div_(255.0)
    t.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    t.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return t


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


def _cache_key(split: _Split, mode: str) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps([_CACHE_FORMAT, str(split.root.resolve()), len(split.paths), split.newest_mtime_ns, mode]).encode()
    )
    return h.hexdigest()[:24]


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

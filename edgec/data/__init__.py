"""Datasets for compression runs: one spec string -> a :class:`DataBundle`.

Spec forms (``load_data(spec)``; ``data_kinds()`` lists them with their help lines)::

    digits                          sklearn 8x8 digits, 1x8x8, 10 classes (tiny; tests and demos)
    cifar10:PATH                    CIFAR-10, pickle batches or ImageFolder (see CIFAR10_LAYOUTS)
    imagefolder:PATH                PATH/train/<class>/<img> + PATH/test|val/<class>/<img>
    python:pkg.module:factory       factory() -> (train_ds, eval_ds) or a DataBundle
    python:path/to/file.py:factory  same, loading the file by path
    speechcommands:PATH | fsdd:PATH | tau2020mobile:PATH   audio -> log-mel (see edgec.data.audio)

The pipeline, one direction: :mod:`~edgec.data.bundle` (the bundle, the kind, shared helpers)
<- :mod:`~edgec.data.images` / :mod:`~edgec.data.audio` (decoding and feature caches, under
:mod:`~edgec.data.cache`) <- one module per kind (:mod:`~edgec.data.digits`,
:mod:`~edgec.data.cifar10`, :mod:`~edgec.data.imagefolder`, :mod:`~edgec.data.python`,
:mod:`~edgec.data.speechcommands`, :mod:`~edgec.data.fsdd`, :mod:`~edgec.data.tau2020`) <- this
package, which registers the kinds and dispatches ``load_data`` through :data:`KIND_REGISTRY`.
Calibration manifests are in :mod:`~edgec.data.manifest`, batch augmentation in
:mod:`~edgec.data.augment`.

torch, PIL and scikit-learn are imported inside the functions that need them (lean imports).
"""
from __future__ import annotations

from edgec.data import cifar10, digits, fsdd, imagefolder, python, speechcommands, tau2020
from edgec.data.augment import RandomCropFlip
from edgec.data.bundle import DataBundle, DataKind, holdout_split, to_numpy
from edgec.data.cache import default_cache_dir
from edgec.data.cifar10 import CIFAR10_CLASSES, CIFAR10_LAYOUTS, CIFAR10_MEAN, CIFAR10_STD
from edgec.data.imagefolder import IMAGEFOLDER_LAYOUT
from edgec.data.python import bundle_from_datasets
from edgec.data.manifest import (
    calibration_subset,
    indices_sha256,
    load_manifest,
    save_manifest,
    subset_from_manifest,
)
from edgec.errors import DataError
from edgec.registry import Registry, did_you_mean

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_LAYOUTS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATA_KINDS",
    "IMAGEFOLDER_LAYOUT",
    "KIND_REGISTRY",
    "bundle_from_datasets",
    "DataBundle",
    "DataKind",
    "RandomCropFlip",
    "calibration_subset",
    "data_kinds",
    "default_cache_dir",
    "holdout_split",
    "indices_sha256",
    "load_data",
    "load_manifest",
    "save_manifest",
    "subset_from_manifest",
    "to_numpy",
]

#: the data kinds in the order help lists them
_KINDS: tuple[DataKind, ...] = (
    digits.KIND, cifar10.KIND, imagefolder.KIND, python.KIND, speechcommands.KIND, fsdd.KIND, tau2020.KIND,
)

#: spec prefix -> :class:`DataKind`
KIND_REGISTRY: Registry[DataKind] = Registry("data kind", DataError)
for _kind in _KINDS:
    KIND_REGISTRY.add(_kind.name, _kind)
del _kind


def data_kinds() -> list[tuple[str, str]]:
    """``(name, help)`` of every data kind, for a CLI to print; help is ``SPEC -- description``."""
    return [(k.name, k.help) for k in _KINDS]


#: spec form -> one-line description (for ``edgec`` help / discovery)
DATA_KINDS: dict[str, str] = dict(data_kinds())


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
    for what, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{what} must be a positive integer or None, got {value!r}")
    spec = spec.strip()
    name, _, arg = spec.partition(":")
    name = name.strip().lower()
    if name not in KIND_REGISTRY:
        raise DataError(
            f"unknown data kind {name!r} in spec {spec!r}; {did_you_mean(name, tuple(DATA_KINDS))}",
            hint="data specs: " + "; ".join(DATA_KINDS.values()),
        )
    kind = KIND_REGISTRY.get(name)
    if kind.takes_arg and not arg:
        raise DataError(f"data spec {spec!r} needs an argument", hint=f"use: {kind.help}")
    return kind.load(spec, arg, seed=seed, max_train=max_train, max_eval=max_eval)

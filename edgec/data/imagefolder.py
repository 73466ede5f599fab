"""``imagefolder:PATH``: PATH/train/<class>/<img> and PATH/test|val/<class>/<img>."""
from __future__ import annotations

from edgec.data.bundle import DataBundle, DataKind, _check_path, _stratified_indices, _tensor_dataset
from edgec.data.images import (
    _channel_stats_uint8,
    _decode_split,
    _first_image_info,
    _normalize_uint8,
    _scan_split,
)
from edgec.errors import DataError

HELP = "imagefolder:PATH -- PATH/train/<class>/<img> and PATH/test|val/<class>/<img>"
IMAGEFOLDER_LAYOUT = (
    "imagefolder:PATH expects PATH/train/<class>/<image> and PATH/test/<class>/<image> "
    "(PATH/val/ is accepted instead of PATH/test/); images are .png/.jpg/.jpeg/.bmp/.webp, "
    "all of the same size"
)


def load_imagefolder(spec: str, arg: str, *, seed: int, max_train: int | None, max_eval: int | None) -> DataBundle:
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


KIND = DataKind("imagefolder", HELP, load_imagefolder)

"""``tau2020mobile:PATH``: the TAU Urban Acoustic Scenes 2020 Mobile (DCASE 2020/2021 Task 1A)
development layout, 10 scenes, per-device groups, as log-mel (see :mod:`edgec.data.audio`).

Options: fold=1, and those of every audio kind (front-end default 44.1 kHz / 10 s / 2048 / 2048 /
1024 / 80 mels -> (1, 80, 431); augmentation default specaugment).

Splits: ``evaluation_setup/fold1_train.csv`` vs ``fold1_evaluate.csv``.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

import numpy as np

from edgec.data.audio import AudioKind, Splits, _check_root, _Clips, _int_option
from edgec.data.bundle import DataKind
from edgec.errors import DataError

__all__ = ["TAU2020_DEVICES", "TAU2020_LAYOUT", "TAU2020_SCENES", "tau2020_device", "tau2020_index"]

log = logging.getLogger(__name__)

HELP = ("tau2020mobile:PATH -- TAU Urban Acoustic Scenes 2020 Mobile layout, 10 scenes, "
        "per-device groups")
TAU2020_DEVICES = ("a", "b", "c", "s1", "s2", "s3", "s4", "s5", "s6")
TAU2020_SCENES = ("airport", "bus", "metro", "metro_station", "park", "public_square", "shopping_mall",
                  "street_pedestrian", "street_traffic", "tram")

TAU2020_LAYOUT = (
    "tau2020mobile:PATH expects the TAU Urban Acoustic Scenes 2020 Mobile development layout: "
    "PATH/meta.csv (tab-separated, header filename, scene_label, identifier, source_label), "
    "PATH/evaluation_setup/fold1_train.csv and PATH/evaluation_setup/fold1_evaluate.csv "
    "(tab-separated, header filename, scene_label), and the clips under PATH/audio/ named "
    "<scene>-<city>-<location>-<segment>-<device>.wav with device a, b, c or s1..s6"
)
_TAU_DEVICE = re.compile(r"-(a|b|c|s[1-9])\.wav$", re.IGNORECASE)


def _read_tsv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist", hint=TAU2020_LAYOUT)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            header = [h.strip() for h in (reader.fieldnames or [])]
            lack = [c for c in required if c not in header]
            if lack:
                raise DataError(f"{str(path)!r} lacks the column(s) {', '.join(lack)} (header: "
                                f"{', '.join(header) or 'empty'}; is it tab-separated?)", hint=TAU2020_LAYOUT)
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {str(path)!r}: {e}", hint=TAU2020_LAYOUT) from e


def tau2020_device(filename: str) -> str:
    """Device of a TAU 2020 Mobile file name (``...-a.wav`` -> ``a``, ``...-s4.wav`` -> ``s4``)."""
    m = _TAU_DEVICE.search(filename)
    if not m:
        raise DataError(f"cannot read the device from {filename!r}: expected a name ending in "
                        f"-<device>.wav with device one of {', '.join(TAU2020_DEVICES)}", hint=TAU2020_LAYOUT)
    return m.group(1).lower()


def tau2020_index(path: str | os.PathLike, *, fold: int = 1) -> tuple[dict[str, _Clips], list[str]]:
    """(``{"train", "eval"}`` clips with groups device/city/identifier, scene class names)."""
    root = _check_root(os.fspath(path), TAU2020_LAYOUT)
    setup = root / "evaluation_setup"
    missing = [str(p.relative_to(root)) for p in (root / "meta.csv", setup / f"fold{fold}_train.csv",
                                                  setup / f"fold{fold}_evaluate.csv", root / "audio") if not p.exists()]
    if missing:
        raise DataError(f"{str(root)!r} is not a TAU Urban Acoustic Scenes 2020 Mobile folder: missing "
                        f"{', '.join(missing)}", hint=TAU2020_LAYOUT)
    meta = {r["filename"]: r for r in _read_tsv(root / "meta.csv", ("filename", "scene_label"))}
    train_rows = _read_tsv(setup / f"fold{fold}_train.csv", ("filename", "scene_label"))
    eval_rows = _read_tsv(setup / f"fold{fold}_evaluate.csv", ("filename", "scene_label"))
    if not train_rows or not eval_rows:
        raise DataError(f"fold{fold}_{'train' if not train_rows else 'evaluate'}.csv lists no files", hint=TAU2020_LAYOUT)
    classes = sorted({r["scene_label"] for r in train_rows})
    extra = sorted({r["scene_label"] for r in eval_rows} - set(classes))
    if extra:
        raise DataError(f"fold{fold}_evaluate.csv has scene labels absent from fold{fold}_train.csv: {', '.join(extra)}")
    unknown = [c for c in classes if c not in TAU2020_SCENES]
    if unknown:
        log.warning("tau2020mobile: scene labels %s are not among the 10 TAU 2020 scenes", unknown)
    index = {c: i for i, c in enumerate(classes)}

    def clips(rows: list[dict[str, str]], which: str) -> _Clips:
        paths, devices, ident = [], [], []
        absent = []
        for r in rows:
            p = root / r["filename"]
            if not p.is_file():
                absent.append(r["filename"])
            paths.append(str(p))
            devices.append(tau2020_device(r["filename"]))
            m = meta.get(r["filename"])
            if m is not None and m.get("scene_label") and m["scene_label"] != r["scene_label"]:
                raise DataError(f"{r['filename']!r}: scene {r['scene_label']!r} in fold{fold}_{which}.csv but "
                                f"{m['scene_label']!r} in meta.csv")
            ident.append((m or {}).get("identifier") or "-".join(Path(r["filename"]).stem.split("-")[1:3]))
        if absent:
            raise DataError(f"{len(absent)} file(s) listed in fold{fold}_{which}.csv are missing, e.g. "
                            f"{str(root / absent[0])!r}", hint=TAU2020_LAYOUT)
        ident_a = np.asarray(ident, dtype=str)
        return _Clips(paths, np.asarray([index[r["scene_label"]] for r in rows], dtype=np.int64),
                      {"device": np.asarray(devices, dtype=str), "identifier": ident_a,
                       "city": np.asarray([s.split("-")[0] for s in ident], dtype=str)})

    return {"train": clips(train_rows, "train"), "eval": clips(eval_rows, "evaluate")}, classes


def _splits(path: str, options: dict[str, str]) -> Splits:
    fold = _int_option(options, "fold", 1, 1, 99)
    splits, classes = tau2020_index(path, fold=fold)
    return Splits(splits["train"], splits["eval"], "eval", classes)


TAU2020 = AudioKind("tau2020mobile", HELP, options=frozenset({"fold"}),
                    frontend={"sample_rate": 44100, "clip_seconds": 10.0, "n_fft": 2048, "win_length": 2048,
                              "hop_length": 1024, "n_mels": 80},
                    augment=("specaugment",), splits=_splits)
KIND = DataKind("tau2020mobile", HELP, TAU2020.load)

"""``fsdd:PATH``: the Free Spoken Digit Dataset, ``<digit>_<speaker>_<index>.wav``, 8 kHz ->
16 kHz, as log-mel (see :mod:`edgec.data.audio`).

Options: train_speakers=a,b,... and/or test_speakers=c,d (default: the official split), and those
of every audio kind.

Splits: the official split (recordings 0-4 of every digit and speaker = eval, 5-49 = train) or a
speaker split (``train_speakers=george,jackson,lucas,nicolas`` -> the other speakers are eval).
"""
from __future__ import annotations

import os
import re

import numpy as np

from edgec.data.audio import AudioKind, Splits, _check_root, _Clips
from edgec.data.bundle import DataKind
from edgec.errors import DataError
from edgec.registry import did_you_mean

__all__ = ["FSDD_LAYOUT", "fsdd_index"]

HELP = ("fsdd:PATH[?train_speakers=a,b,c,d] -- Free Spoken Digit Dataset (8 kHz -> 16 kHz), official "
        "or speaker split; log-mel (1,40,101)")
FSDD_LAYOUT = (
    "fsdd:PATH expects the Free Spoken Digit Dataset recordings: PATH/<digit>_<speaker>_<index>.wav "
    "(or PATH/recordings/...), e.g. 3_theo_12.wav; mono, any sample rate (8 kHz in the original)"
)
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z0-9-]+)_(\d+)\.wav$", re.IGNORECASE)


def _speaker_list(options: dict, key: str, known: list[str]) -> list[str] | None:
    raw = options.get(key)
    if raw is None:
        return None
    names = [s.strip() for s in raw.split(",") if s.strip()]
    if not names:
        raise DataError(f"option {key} is empty; give comma-separated speakers, e.g. {key}={','.join(known[:2])}")
    bad = [s for s in names if s not in known]
    if bad:
        raise DataError(f"{key}: unknown speaker(s) {', '.join(bad)}; {did_you_mean(bad[0], known)}")
    return names


def fsdd_index(path: str | os.PathLike, *, train_speakers: list[str] | None = None,
               test_speakers: list[str] | None = None) -> dict[str, _Clips]:
    """``{"train", "eval"}`` clips of FSDD (labels = digits, ``groups["speaker"]``, ``groups["index"]``).

    No speakers given: the official split (index 0-4 -> eval). ``train_speakers``: the other
    speakers are eval (unless ``test_speakers`` names them). ``test_speakers`` alone: the others
    train.
    """
    root = _check_root(os.fspath(path), FSDD_LAYOUT)
    if (root / "recordings").is_dir():
        root = root / "recordings"
    rows = []
    for f in sorted(root.iterdir()):
        m = _FSDD_NAME.match(f.name)
        if m and f.is_file():
            rows.append((str(f), int(m.group(1)), m.group(2), int(m.group(3))))
    if not rows:
        sample = sorted(p.name for p in root.iterdir())[:5]
        raise DataError(f"{str(root)!r} holds no <digit>_<speaker>_<index>.wav files "
                        f"(found: {', '.join(sample) or 'nothing'})", hint=FSDD_LAYOUT)
    paths = [r[0] for r in rows]
    labels = np.asarray([r[1] for r in rows], dtype=np.int64)
    speakers = np.asarray([r[2] for r in rows], dtype=str)
    idx = np.asarray([r[3] for r in rows], dtype=np.int64)
    known = sorted(set(speakers.tolist()))
    all_clips = _Clips(paths, labels, {"speaker": speakers, "index": idx.astype(str)})
    if train_speakers is None and test_speakers is None:
        ev = idx < 5
        tr = ~ev
    else:
        overlap = set(train_speakers or ()) & set(test_speakers or ())
        if overlap:
            raise DataError(f"speaker(s) {', '.join(sorted(overlap))} are in both train_speakers and test_speakers")
        tr_set = set(train_speakers) if train_speakers is not None else set(known) - set(test_speakers)
        ev_set = set(test_speakers) if test_speakers is not None else set(known) - tr_set
        tr, ev = np.isin(speakers, sorted(tr_set)), np.isin(speakers, sorted(ev_set))
        if not tr.any() or not ev.any():
            raise DataError(f"the speaker split leaves {'no training' if not tr.any() else 'no eval'} speakers "
                            f"(speakers here: {', '.join(known)})")
    return {"train": all_clips.take(np.flatnonzero(tr)), "eval": all_clips.take(np.flatnonzero(ev))}


def _splits(path: str, options: dict[str, str]) -> Splits:
    probe = fsdd_index(path)  # speakers present, for validating the options
    known = sorted(set(probe["train"].groups["speaker"].tolist()) | set(probe["eval"].groups["speaker"].tolist()))
    trs, tes = _speaker_list(options, "train_speakers", known), _speaker_list(options, "test_speakers", known)
    splits = probe if trs is None and tes is None else fsdd_index(path, train_speakers=trs, test_speakers=tes)
    return Splits(splits["train"], splits["eval"], "eval", [str(d) for d in range(10)])


FSDD = AudioKind("fsdd", HELP, options=frozenset({"train_speakers", "test_speakers"}), frontend={},
                 augment=("shift", "noise"), splits=_splits)
KIND = DataKind("fsdd", HELP, FSDD.load)

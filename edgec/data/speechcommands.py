"""``speechcommands:PATH``: Speech Commands, a folder per label, 12 classes (10 words +
``_silence_`` + ``_unknown_``), 16 kHz, 1 s clips, as log-mel (see :mod:`edgec.data.audio`).

Options: eval=test|val (default test), val_percent=10, test_percent=10, and those of every audio kind.

Splits: ``validation_list.txt`` / ``testing_list.txt`` when present (full dataset); otherwise
speaker-disjoint by a stable hash of the speaker id (the part before ``_nohash_``, without a word
prefix): TensorFlow's ``which_set`` rule on a salted hash, sha1("edgec-split:" + speaker) mod 2^27
as a percentage, < val_percent -> val, < val+test -> test, else train (80/10/10 of the speakers by
default; unsalted, the rule would put every speaker of the canonical test folder into "test",
since that is how TensorFlow chose them). ``_silence_`` clips without a speaker hash by their file
name.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from edgec.data.audio import AudioKind, Splits, _check_root, _Clips, _int_option
from edgec.data.bundle import DataKind
from edgec.errors import DataError

__all__ = ["SPEECHCOMMANDS_CLASSES", "SPEECHCOMMANDS_LAYOUT", "SPEECHCOMMANDS_WORDS", "speechcommands_index",
           "speechcommands_speaker"]

log = logging.getLogger(__name__)

HELP = ("speechcommands:PATH[?eval=test|val] -- Speech Commands folder per label, 12 classes, "
        "speaker-disjoint split; log-mel (1,40,101)")
SPEECHCOMMANDS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SPEECHCOMMANDS_CLASSES = (*SPEECHCOMMANDS_WORDS, "_silence_", "_unknown_")

SPEECHCOMMANDS_LAYOUT = (
    "speechcommands:PATH expects one folder per label holding .wav or .flac clips at 16 kHz: "
    "PATH/<label>/<speaker>_nohash_<n>.wav, labels yes, no, up, down, left, right, on, off, stop, go "
    "plus either _silence_/ and _unknown_/ folders (the 12-class test-set layout; unknown files may "
    "carry their word as a prefix, <word>_<speaker>_nohash_<n>) or other word folders (the full "
    "dataset: they become _unknown_; _silence_ clips are cut from _background_noise_/*.wav); "
    "optional PATH/validation_list.txt and PATH/testing_list.txt fix the split"
)
_MAX_WAVS_PER_CLASS = 2**27 - 1  # TensorFlow speech_commands input_data.which_set
_SPLIT_SALT = "edgec-split:"


def _audio_files(folder: Path) -> list[Path]:
    from edgec.runtime.audio import AUDIO_EXTENSIONS

    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS)


def speechcommands_speaker(name: str) -> str | None:
    """Speaker id of ``[<word>_]<speaker>_nohash_<n>.<ext>``; None without ``_nohash_``."""
    stem = Path(name).stem
    if "_nohash_" not in stem:
        return None
    return stem.split("_nohash_")[0].rsplit("_", 1)[-1]


def _which_set(key: str, val_percent: int, test_percent: int) -> str:
    """Stable split of ``key`` (the speaker id): TensorFlow's ``which_set`` rule on a *salted* hash.

    sha1("edgec-split:" + key) mod 2^27 as a percentage: < val_percent -> val, < val + test ->
    test, else train. The salt matters: TensorFlow's unsalted rule picked the speakers of the
    canonical test set, so on that folder it sends every speaker to "test".
    """
    h = int(hashlib.sha1((_SPLIT_SALT + key).encode("utf-8")).hexdigest(), 16)
    pct = (h % (_MAX_WAVS_PER_CLASS + 1)) * (100.0 / _MAX_WAVS_PER_CLASS)
    if pct < val_percent:
        return "val"
    if pct < val_percent + test_percent:
        return "test"
    return "train"


def _read_list(path: Path) -> set[str]:
    try:
        return {ln.strip().replace("\\", "/") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()}
    except OSError as e:
        raise DataError(f"cannot read split list {str(path)!r}: {e}") from e


def speechcommands_index(path: str | os.PathLike, *, val_percent: int = 10, test_percent: int = 10,
                         silence_seed: int = 0) -> dict[str, _Clips]:
    """The clips of each split ``{"train", "val", "test"}`` (labels index SPEECHCOMMANDS_CLASSES,
    ``groups["speaker"]``); no audio is decoded except the lengths of background-noise files."""
    root = _check_root(os.fspath(path), SPEECHCOMMANDS_LAYOUT)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = [p.name for p in folders]
    words = [n for n in names if n in SPEECHCOMMANDS_WORDS]
    if not words:
        raise DataError(
            f"{str(root)!r} is not a Speech Commands folder: none of the label folders "
            f"{', '.join(SPEECHCOMMANDS_WORDS)} (found: {', '.join(names[:10]) or 'no folders'})",
            hint=SPEECHCOMMANDS_LAYOUT)
    missing = [w for w in SPEECHCOMMANDS_WORDS if w not in words]
    if missing:
        log.warning("speechcommands %s lacks the word folders %s; those classes stay empty", root, missing)
    val_list = _read_list(root / "validation_list.txt") if (root / "validation_list.txt").is_file() else None
    test_list = _read_list(root / "testing_list.txt") if (root / "testing_list.txt").is_file() else None
    index = {c: i for i, c in enumerate(SPEECHCOMMANDS_CLASSES)}
    per_split: dict[str, dict[str, list]] = {s: {"paths": [], "labels": [], "speaker": []} for s in ("train", "val", "test")}
    for folder in folders:
        if folder.name == "_background_noise_":
            continue
        label = folder.name if folder.name in index else ("_unknown_" if not folder.name.startswith("_") else None)
        if label is None:
            log.warning("speechcommands: ignoring folder %s (not a label)", folder)
            continue
        for f in _audio_files(folder):
            speaker = speechcommands_speaker(f.name)
            group = speaker if speaker is not None else f"{folder.name}/{f.stem}"
            rel = f"{folder.name}/{f.name}"
            if val_list is not None and rel in val_list:
                split = "val"
            elif test_list is not None and rel in test_list:
                split = "test"
            elif val_list is not None or test_list is not None:
                split = "train" if speaker is not None else _which_set(group, val_percent, test_percent)
            else:
                split = _which_set(group, val_percent, test_percent)
            d = per_split[split]
            d["paths"].append(str(f))
            d["labels"].append(index[label])
            d["speaker"].append(group)
    out = {s: _Clips(paths=d["paths"], labels=np.asarray(d["labels"], dtype=np.int64),
                     groups={"speaker": np.asarray(d["speaker"], dtype=str)}) for s, d in per_split.items()}
    if "_silence_" not in names:
        noise = _audio_files(root / "_background_noise_") if (root / "_background_noise_").is_dir() else []
        if noise:
            _add_synthetic_silence(out, noise, index["_silence_"], silence_seed)
        else:
            log.warning("speechcommands %s has no _silence_/ and no _background_noise_/ folder; "
                        "the _silence_ class stays empty", root)
    if sum(len(c) for c in out.values()) == 0:
        raise DataError(f"{str(root)!r} holds no .wav/.flac clips in its label folders", hint=SPEECHCOMMANDS_LAYOUT)
    return out


def _add_synthetic_silence(splits: dict[str, _Clips], noise: list[Path], label: int, seed: int) -> None:
    """Full-dataset layout: _silence_ clips = 1 s crops of _background_noise_ files at a random
    gain U(0, 1) (as in TensorFlow's reference), as many per split as an average word class has."""
    import soundfile as sf

    lengths = []
    for p in noise:
        try:
            info = sf.info(str(p))
        except Exception as e:  # soundfile's LibsndfileError
            raise DataError(f"cannot read background noise file {str(p)!r}: {e}") from e
        lengths.append((int(info.frames), int(info.samplerate)))
    for k, split in enumerate(("train", "val", "test")):
        clips = splits[split]
        words = clips.labels[clips.labels < len(SPEECHCOMMANDS_WORDS)]
        n = int(round(len(words) / len(SPEECHCOMMANDS_WORDS))) if len(words) else 0
        if n == 0:
            continue
        rng = np.random.default_rng([seed, k, 0x511])
        paths, crops, groups = [], [], []
        for i in range(n):
            j = int(rng.integers(len(noise)))
            frames, sr = lengths[j]
            offset = int(rng.integers(0, max(1, frames - sr + 1)))
            paths.append(str(noise[j]))
            crops.append((offset, float(rng.uniform(0.0, 1.0))))
            groups.append(f"_silence_/{noise[j].stem}@{offset}")
        extra = _Clips(paths=paths, labels=np.full(n, label, dtype=np.int64),
                       groups={"speaker": np.asarray(groups, dtype=str)}, crops=crops)
        splits[split] = _Clips.concat([clips, extra])


def _splits(path: str, options: dict[str, str]) -> Splits:
    which = options.get("eval", "test")
    if which not in ("test", "val"):
        raise DataError(f"option eval={which!r}: use eval=test or eval=val")
    val_pct = _int_option(options, "val_percent", 10, 0, 100)
    test_pct = _int_option(options, "test_percent", 10, 0, 100)
    if val_pct + test_pct >= 100:
        raise DataError(f"val_percent + test_percent = {val_pct + test_pct} leaves no training data")
    splits = speechcommands_index(path, val_percent=val_pct, test_percent=test_pct)
    return Splits(splits["train"], splits[which], which, list(SPEECHCOMMANDS_CLASSES))


SPEECHCOMMANDS = AudioKind("speechcommands", HELP, options=frozenset({"eval", "val_percent", "test_percent"}),
                           frontend={}, augment=("shift", "noise"), splits=_splits,
                           noise_class="_silence_")
KIND = DataKind("speechcommands", HELP, SPEECHCOMMANDS.load)

"""Audio data specs -> :class:`edgec.data.DataBundle` of log-mel features.

Spec forms (through ``edgec.data.load_data``; options follow the path as ``?key=value&key=value``)::

    speechcommands:PATH    Speech Commands, folder per label, 12 classes (10 words + _silence_ +
                           _unknown_), 16 kHz, 1 s clips
    fsdd:PATH              Free Spoken Digit Dataset, <digit>_<speaker>_<index>.wav, 8 kHz -> 16 kHz
    tau2020mobile:PATH     TAU Urban Acoustic Scenes 2020 Mobile (DCASE 2020/2021 Task 1A) layout

Every sample is ``(x: float32 (1, n_mels, frames), y: int64)``: the log-mel of
:mod:`edgec.runtime.audio` (the exact numpy code the device runner runs), standardised with one
scalar ``x = (logmel - mean) / std`` whose mean/std come from the training features.
``bundle.normalization`` = ``{"mean": [m], "std": [s], "features": "logmel", "frontend":
LogMelConfig.to_dict()}`` -- everything an export needs to write into the ONNX metadata
(``edgec.export.metadata.write_model_metadata``) so ``python -m edgec.runtime model.onnx --input clip.wav``
reproduces the preprocessing. ``bundle.groups`` holds per-sample metadata of the *eval* split
(numpy string arrays aligned with ``bundle.eval``): ``file`` (path relative to the data root),
``speaker`` (speechcommands, fsdd) or ``device``, ``city``, ``identifier`` (tau2020mobile), and
``speaker_seen`` / ``device_seen`` ("seen" / "unseen": whether the training clips include it).

Options (all kinds):
    front end:  sample_rate, clip_seconds, n_fft, win_length, hop_length, n_mels, f_min, f_max
                (defaults: BC-ResNet's 16 kHz / 1 s / 512 / 480 / 160 / 40 mels; tau2020mobile:
                44.1 kHz / 10 s / 2048 / 2048 / 1024 / 80 mels -> (1, 80, 431), a [choice])
    augment:    default | none | '+'-joined names from shift, noise, specaugment, device
                (default: speechcommands and fsdd shift+noise, tau2020mobile specaugment)
    standardize: 1 (default) | 0 (raw natural-log mel, mean 0 / std 1)
speechcommands: eval=test|val (default test), val_percent=10, test_percent=10
fsdd:           train_speakers=a,b,... and/or test_speakers=c,d (default: the official split)
tau2020mobile:  fold=1

Splits:
- speechcommands: ``validation_list.txt`` / ``testing_list.txt`` when present (full dataset);
  otherwise speaker-disjoint by a stable hash of the speaker id (the part before ``_nohash_``,
  without a word prefix): TensorFlow's ``which_set`` rule on a salted hash, sha1("edgec-split:" +
  speaker) mod 2^27 as a percentage, < val_percent -> val, < val+test -> test, else train
  (80/10/10 of the speakers by default; unsalted, the rule would put every speaker of the
  canonical test folder into "test", since that is how TensorFlow chose them).
  ``_silence_`` clips without a speaker hash by their file name.
- fsdd: the official split (recordings 0-4 of every digit and speaker = eval, 5-49 = train) or a
  speaker split (``train_speakers=george,jackson,lucas,nicolas`` -> the other speakers are eval).
- tau2020mobile: ``evaluation_setup/fold1_train.csv`` vs ``fold1_evaluate.csv``.

Augmentation (``bundle.augment``, see :mod:`edgec.audio`): shift = TimeShift of +-0.1 s;
noise = NoiseMix at p=0.8, SNR 5-25 dB, with real background noise (the training ``_silence_``
clips) for speechcommands and generated white/pink/brown noise otherwise; specaugment =
SpecAugment(2 x F/8 bands, 2 x T/10 frames); device = DeviceSimulation over 6 simulated devices,
training on devices 0-2 (3-5 held out as unseen for ``simulate_device_split``).

Features are computed once per split and cached as float32 ``.npy`` under
``edgec.data.default_cache_dir()`` keyed by the file list (paths, sizes, mtimes) and the front-end
config; with ``max_train``/``max_eval`` and no cache yet, only the selected clips are decoded.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgec.data import DATA_KINDS
from edgec.errors import DataError
from edgec.registry import did_you_mean
from edgec.runtime.audio import AUDIO_EXTENSIONS, AudioError, LogMelConfig

if TYPE_CHECKING:  # pragma: no cover
    from edgec.data import DataBundle

__all__ = [
    "AUDIO_DATA_KINDS",
    "FSDD_LAYOUT",
    "SPEECHCOMMANDS_CLASSES",
    "SPEECHCOMMANDS_LAYOUT",
    "SPEECHCOMMANDS_WORDS",
    "TAU2020_DEVICES",
    "TAU2020_LAYOUT",
    "TAU2020_SCENES",
    "fsdd_index",
    "load_audio_data",
    "parse_audio_spec",
    "speechcommands_index",
    "speechcommands_speaker",
    "tau2020_device",
    "tau2020_index",
]

log = logging.getLogger(__name__)

SPEECHCOMMANDS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SPEECHCOMMANDS_CLASSES = (*SPEECHCOMMANDS_WORDS, "_silence_", "_unknown_")
TAU2020_DEVICES = ("a", "b", "c", "s1", "s2", "s3", "s4", "s5", "s6")
TAU2020_SCENES = ("airport", "bus", "metro", "metro_station", "park", "public_square", "shopping_mall",
                  "street_pedestrian", "street_traffic", "tram")

#: the audio spec forms (descriptions live in edgec.data.DATA_KINDS, one source for help texts)
AUDIO_DATA_KINDS: dict[str, str] = {k: DATA_KINDS[k] for k in ("speechcommands", "fsdd", "tau2020mobile")}

SPEECHCOMMANDS_LAYOUT = (
    "speechcommands:PATH expects one folder per label holding .wav or .flac clips at 16 kHz: "
    "PATH/<label>/<speaker>_nohash_<n>.wav, labels yes, no, up, down, left, right, on, off, stop, go "
    "plus either _silence_/ and _unknown_/ folders (the 12-class test-set layout; unknown files may "
    "carry their word as a prefix, <word>_<speaker>_nohash_<n>) or other word folders (the full "
    "dataset: they become _unknown_; _silence_ clips are cut from _background_noise_/*.wav); "
    "optional PATH/validation_list.txt and PATH/testing_list.txt fix the split"
)
FSDD_LAYOUT = (
    "fsdd:PATH expects the Free Spoken Digit Dataset recordings: PATH/<digit>_<speaker>_<index>.wav "
    "(or PATH/recordings/...), e.g. 3_theo_12.wav; mono, any sample rate (8 kHz in the original)"
)
TAU2020_LAYOUT = (
    "tau2020mobile:PATH expects the TAU Urban Acoustic Scenes 2020 Mobile development layout: "
    "PATH/meta.csv (tab-separated, header filename, scene_label, identifier, source_label), "
    "PATH/evaluation_setup/fold1_train.csv and PATH/evaluation_setup/fold1_evaluate.csv "
    "(tab-separated, header filename, scene_label), and the clips under PATH/audio/ named "
    "<scene>-<city>-<location>-<segment>-<device>.wav with device a, b, c or s1..s6"
)

_FRONTEND_KEYS = {"sample_rate": int, "clip_seconds": float, "n_fft": int, "win_length": int,
                  "hop_length": int, "n_mels": int, "f_min": float, "f_max": float}
_KIND_KEYS = {
    "speechcommands": {"eval", "val_percent", "test_percent"},
    "fsdd": {"train_speakers", "test_speakers"},
    "tau2020mobile": {"fold"},
}
_COMMON_KEYS = {"augment", "standardize"}
_AUGMENT_NAMES = ("shift", "noise", "specaugment", "device")
_DEFAULT_AUGMENT = {"speechcommands": ("shift", "noise"), "fsdd": ("shift", "noise"), "tau2020mobile": ("specaugment",)}
_DEFAULT_FRONTEND = {
    "speechcommands": LogMelConfig(),
    "fsdd": LogMelConfig(),
    "tau2020mobile": LogMelConfig(sample_rate=44100, clip_seconds=10.0, n_fft=2048, win_length=2048,
                                  hop_length=1024, n_mels=80),
}
_CACHE_FORMAT = "edgec-audio-logmel-v1"
_MAX_WAVS_PER_CLASS = 2**27 - 1  # TensorFlow speech_commands input_data.which_set
_SPLIT_SALT = "edgec-split:"
_NOISE_BANK = 64  # at most this many real background clips in the NoiseMix bank
_CHUNK = 256  # clips per log-mel batch


# --------------------------------------------------------------------------------------- specs
def parse_audio_spec(kind: str, arg: str) -> tuple[str, dict[str, str]]:
    """``PATH?key=value&key=value`` -> (PATH, options), unknown keys rejected with the known ones."""
    path, _, query = arg.partition("?")
    options: dict[str, str] = {}
    known = sorted(_FRONTEND_KEYS.keys() | _COMMON_KEYS | _KIND_KEYS[kind])
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise DataError(f"bad option {part!r} in {kind}:{arg}", hint=f"write options as {kind}:PATH?key=value&key=value")
        if key not in known:
            raise DataError(f"unknown {kind} option {key!r}; {did_you_mean(key, known)}",
                            hint=AUDIO_DATA_KINDS[kind])
        if key in options:
            raise DataError(f"option {key!r} given twice in {kind}:{arg}")
        options[key] = value.strip()
    if not path.strip():
        raise DataError(f"{kind} spec needs a path", hint=AUDIO_DATA_KINDS[kind])
    return path.strip(), options


def _frontend(kind: str, options: dict[str, str]) -> LogMelConfig:
    base = _DEFAULT_FRONTEND[kind].to_dict()
    for key, typ in _FRONTEND_KEYS.items():
        if key in options:
            try:
                base[key] = typ(options[key])
            except ValueError as e:
                raise DataError(f"option {key}={options[key]!r} is not a valid {typ.__name__}") from e
    try:
        return LogMelConfig.from_dict(base)
    except AudioError as e:
        raise DataError(f"bad front-end option: {e}") from e


def _int_option(options: dict, key: str, default: int, low: int, high: int) -> int:
    raw = options.get(key)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError as e:
        raise DataError(f"option {key}={raw!r} must be an integer") from e
    if not low <= v <= high:
        raise DataError(f"option {key}={v} must be between {low} and {high}")
    return v


def _check_root(arg: str, layout: str) -> Path:
    root = Path(arg).expanduser()
    if not root.exists():
        raise DataError(f"path {str(root)!r} does not exist (resolved from {str(root.resolve())!r})", hint=layout)
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is a file, not a folder", hint=layout)
    return root.resolve()


# ------------------------------------------------------------------------------------ clip lists
@dataclass
class _Clips:
    """Clips of one split: file paths, labels, per-sample metadata, optional crops.

    ``crops[i] = (offset, gain)`` cuts ``clip_seconds`` from ``paths[i]`` at sample ``offset``
    (at the file's own rate) and scales it (synthetic silence from long background-noise files).
    """

    paths: list[str]
    labels: np.ndarray
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    crops: list[tuple[int, float] | None] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, idx: np.ndarray) -> _Clips:
        idx = np.asarray(idx, dtype=np.int64)
        return _Clips(
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            groups={k: v[idx] for k, v in self.groups.items()},
            crops=None if self.crops is None else [self.crops[i] for i in idx],
        )

    @staticmethod
    def concat(parts: list[_Clips]) -> _Clips:
        keys = set.intersection(*(set(p.groups) for p in parts)) if parts else set()
        crops = None
        if any(p.crops is not None for p in parts):
            crops = [c for p in parts for c in (p.crops if p.crops is not None else [None] * len(p))]
        return _Clips(
            paths=[x for p in parts for x in p.paths],
            labels=np.concatenate([p.labels for p in parts]) if parts else np.empty(0, np.int64),
            groups={k: np.concatenate([p.groups[k] for p in parts]) for k in sorted(keys)},
            crops=crops,
        )


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS)


# ------------------------------------------------------------------------------- speech commands
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


# ------------------------------------------------------------------------------------------ fsdd
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


# ----------------------------------------------------------------------------------- TAU 2020
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


# -------------------------------------------------------------------------------- features
def _decode_clip(path: str, crop: tuple[int, float] | None, cfg: LogMelConfig) -> np.ndarray:
    from edgec.runtime.audio import fix_length, read_audio, resample

    try:
        if crop is None:
            wave, sr = read_audio(path)
        else:
            import soundfile as sf

            info = sf.info(path)
            n = int(round(cfg.clip_seconds * info.samplerate))
            data, sr = sf.read(path, start=crop[0], frames=n, dtype="float32", always_2d=True)
            wave = data.mean(axis=1) * np.float32(crop[1])
        return fix_length(resample(wave, sr, cfg.sample_rate), cfg.clip_samples)
    except AudioError as e:
        raise DataError(str(e), hint="every listed clip must be a readable audio file") from e
    except Exception as e:  # soundfile's LibsndfileError on a cropped read
        raise DataError(f"cannot read audio file {path!r}: {e}") from e


def _compute_features(clips: _Clips, cfg: LogMelConfig) -> np.ndarray:
    from edgec.runtime.audio import log_mel, mel_filterbank

    fb = mel_filterbank(cfg)
    out = np.empty((len(clips), *cfg.shape), dtype=np.float32)
    crops = clips.crops or [None] * len(clips)
    # clips per batch: at most _CHUNK, and ~16M STFT samples (128 MB of float64 frames) at once
    chunk = max(1, min(_CHUNK, 2**24 // (cfg.n_frames * cfg.n_fft)))
    for start in range(0, len(clips), chunk):
        stop = min(start + chunk, len(clips))
        waves = np.stack([_decode_clip(clips.paths[i], crops[i], cfg) for i in range(start, stop)])
        out[start:stop] = log_mel(waves, cfg, fbank=fb)
    return out


def _features_key(clips: _Clips, cfg: LogMelConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_CACHE_FORMAT, cfg.to_dict()]).encode())
    crops = clips.crops or [None] * len(clips)
    for p, c in zip(clips.paths, crops):
        st = os.stat(p)
        h.update(json.dumps([p, st.st_size, st.st_mtime_ns, c]).encode())
    return h.hexdigest()[:24]


def _split_features(clips: _Clips, indices: np.ndarray, cfg: LogMelConfig, tag: str) -> np.ndarray:
    """Raw log-mel (len(indices), 1, F, T) of ``clips[indices]`` through the feature cache: the
    whole split is computed and cached when all of it is asked for; a subset with no cache yet is
    computed alone and nothing is written."""
    from edgec.data import _atomic_save_npy, default_cache_dir

    cache = default_cache_dir() / f"audio-{tag}-{_features_key(clips, cfg)}-x.npy"
    if cache.is_file():
        try:
            arr = np.load(cache, mmap_mode="r")
            if arr.shape == (len(clips), *cfg.shape) and arr.dtype == np.float32:
                return np.array(arr[indices])
            log.warning("ignoring feature cache %s: shape %s does not match %d clips", cache, arr.shape, len(clips))
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable feature cache %s: %s", cache, e)
    full = len(indices) == len(clips)
    t0 = time.perf_counter()
    x = _compute_features(clips.take(indices), cfg)
    log.info("computed log-mel of %d clips (%s) in %.1fs", len(indices), tag, time.perf_counter() - t0)
    if full:
        try:
            _atomic_save_npy(cache, x)
        except OSError as e:
            log.warning("could not write feature cache %s (%s); the next load computes again", cache, e)
    return x


# ------------------------------------------------------------------------------------- bundle
def _augment_names(kind: str, options: dict[str, str]) -> tuple[str, ...]:
    raw = options.get("augment", "default").strip().lower()
    if raw == "none":
        return ()
    names = _DEFAULT_AUGMENT[kind] if raw == "default" else tuple(n.strip() for n in raw.split("+") if n.strip())
    bad = [n for n in names if n not in _AUGMENT_NAMES]
    if bad or not names:
        raise DataError(f"unknown augmentation {bad[0] if bad else raw!r}; use default, none or a '+'-joined "
                        f"list of {', '.join(_AUGMENT_NAMES)}")
    return names


def _augment(names: tuple[str, ...], cfg: LogMelConfig, mean: float, std: float,
             noise_bank: np.ndarray | None, seed: int):
    from edgec.audio import (Compose, DeviceSimulation, NoiseMix, SpecAugment, TimeShift,
                             generated_noise_bank)

    if not names:
        return None
    augs = []
    for name in names:
        if name == "shift":
            augs.append(TimeShift(max_frames=max(1, int(round(0.1 * cfg.sample_rate / cfg.hop_length)))))
        elif name == "noise":
            bank = noise_bank if noise_bank is not None and len(noise_bank) else generated_noise_bank(cfg, seed=seed)
            augs.append(NoiseMix(bank, p=0.8, snr_db=(5.0, 25.0), mean=mean, std=std, log_offset=cfg.log_offset))
        elif name == "specaugment":
            augs.append(SpecAugment(freq_masks=2, freq_width=max(1, cfg.n_mels // 8), time_masks=2,
                                    time_width=max(1, cfg.n_frames // 10)))
        else:
            augs.append(DeviceSimulation(cfg.n_mels, n_devices=6, devices=[0, 1, 2], p=0.8, seed=0, std=std))
    return augs[0] if len(augs) == 1 else Compose(augs)


def load_audio_data(kind: str, arg: str, *, seed: int = 0, max_train: int | None = None,
                    max_eval: int | None = None) -> DataBundle:
    """``edgec.data.load_data`` for ``speechcommands``, ``fsdd`` and ``tau2020mobile`` specs."""
    import torch

    from edgec.data import DataBundle, _stratified_indices, _tensor_dataset

    if kind not in AUDIO_DATA_KINDS:
        raise DataError(f"unknown audio data kind {kind!r}; {did_you_mean(kind, tuple(AUDIO_DATA_KINDS))}")
    path, options = parse_audio_spec(kind, arg)  # every option is checked before any file is read
    cfg = _frontend(kind, options)
    augment_names = _augment_names(kind, options)
    standardize = options.get("standardize", "1")
    if standardize not in ("0", "1"):
        raise DataError(f"option standardize={standardize!r}: use 1 or 0")
    if kind == "speechcommands":
        which = options.get("eval", "test")
        if which not in ("test", "val"):
            raise DataError(f"option eval={which!r}: use eval=test or eval=val")
        val_pct = _int_option(options, "val_percent", 10, 0, 100)
        test_pct = _int_option(options, "test_percent", 10, 0, 100)
        if val_pct + test_pct >= 100:
            raise DataError(f"val_percent + test_percent = {val_pct + test_pct} leaves no training data")
        splits = speechcommands_index(path, val_percent=val_pct, test_percent=test_pct)
        train, evald, classes = splits["train"], splits[which], list(SPEECHCOMMANDS_CLASSES)
    elif kind == "fsdd":
        probe = fsdd_index(path)  # speakers present, for validating the options
        known = sorted(set(probe["train"].groups["speaker"].tolist()) | set(probe["eval"].groups["speaker"].tolist()))
        trs, tes = _speaker_list(options, "train_speakers", known), _speaker_list(options, "test_speakers", known)
        splits = probe if trs is None and tes is None else fsdd_index(path, train_speakers=trs, test_speakers=tes)
        train, evald, classes, which = splits["train"], splits["eval"], [str(d) for d in range(10)], "eval"
    else:
        fold = _int_option(options, "fold", 1, 1, 99)
        splits, classes = tau2020_index(path, fold=fold)
        train, evald, which = splits["train"], splits["eval"], "eval"
    for name, clips in (("train", train), (which, evald)):
        if len(clips) == 0:
            raise DataError(f"{kind}:{path}: the {name} split is empty", hint=AUDIO_DATA_KINDS[kind])
    root_tag = f"{kind}-{Path(path).name or 'root'}"
    itr = _stratified_indices(train.labels, max_train, seed, 1)
    iev = _stratified_indices(evald.labels, max_eval, seed, 2)
    xtr = _split_features(train, itr, cfg, f"{root_tag}-train")
    xev = _split_features(evald, iev, cfg, f"{root_tag}-{which}")
    ytr, yev = train.labels[itr], evald.labels[iev]
    if standardize == "1":
        mean = float(xtr.mean(dtype=np.float64))
        std = float(xtr.std(dtype=np.float64)) or 1.0
    else:
        mean, std = 0.0, 1.0

    noise_bank = None
    if kind == "speechcommands":
        sil = np.flatnonzero(ytr == SPEECHCOMMANDS_CLASSES.index("_silence_"))
        if len(sil):
            pick = np.sort(np.random.default_rng([seed, 0x5E1]).choice(sil, size=min(_NOISE_BANK, len(sil)), replace=False))
            noise_bank = xtr[pick]
    augment = _augment(augment_names, cfg, mean, std, noise_bank, seed)

    def dataset(x: np.ndarray, y: np.ndarray):
        t = torch.from_numpy(x)
        if standardize == "1":
            t.sub_(mean).div_(std)
        return _tensor_dataset(t, y)

    query = "&".join(f"{k}={v}" for k, v in sorted(options.items()))
    return DataBundle(
        spec=f"{kind}:{Path(path).expanduser().resolve()}" + (f"?{query}" if query else ""),
        train=dataset(xtr, ytr),
        eval=dataset(xev, yev),
        num_classes=len(classes),
        input_shape=cfg.shape,
        classes=classes,
        augment=augment,
        normalization={"mean": [mean], "std": [std], "features": "logmel", "frontend": cfg.to_dict()},
        groups={**{k: v[iev] for k, v in evald.groups.items()}, **_seen_groups(train, itr, evald, iev),
                "file": _file_names(evald.take(iev), path)},
    )


def _seen_groups(train: _Clips, itr: np.ndarray, evald: _Clips, iev: np.ndarray) -> dict[str, np.ndarray]:
    """``device_seen`` / ``speaker_seen``: "seen" when the eval sample's device (speaker) occurs among
    the training clips used, else "unseen" (TAU 2020: devices s4-s6 appear only in the eval fold)."""
    out = {}
    for key in ("device", "speaker"):
        if key in train.groups and key in evald.groups:
            seen = np.isin(evald.groups[key][iev], np.unique(train.groups[key][itr]))
            out[f"{key}_seen"] = np.where(seen, "seen", "unseen").astype(str)
    return out


def _file_names(clips: _Clips, path: str) -> np.ndarray:
    """Paths relative to the data root (``@offset`` appended for a crop of a longer file)."""
    root = Path(path).expanduser().resolve()
    crops = clips.crops or [None] * len(clips)
    return np.asarray([os.path.relpath(p, root) + ("" if c is None else f"@{c[0]}")
                       for p, c in zip(clips.paths, crops)], dtype=str)

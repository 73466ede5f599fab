"""What the audio data kinds share: ``PATH?key=value`` options, the log-mel front end, clip
lists, the feature cache, augmentation, and the bundle built from the splits of one kind.

Spec forms (options follow the path as ``?key=value&key=value``): ``speechcommands:PATH``
(:mod:`edgec.data.speechcommands`), ``fsdd:PATH`` (:mod:`edgec.data.fsdd`), ``tau2020mobile:PATH``
(:mod:`edgec.data.tau2020`).

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

Options (all kinds; each kind adds its own):
    front end:  sample_rate, clip_seconds, n_fft, win_length, hop_length, n_mels, f_min, f_max
                (defaults: BC-ResNet's 16 kHz / 1 s / 512 / 480 / 160 / 40 mels; tau2020mobile:
                44.1 kHz / 10 s / 2048 / 2048 / 1024 / 80 mels -> (1, 80, 431), a [choice])
    augment:    default | none | '+'-joined names from shift, noise, specaugment, device
                (default: speechcommands and fsdd shift+noise, tau2020mobile specaugment)
    standardize: 1 (default) | 0 (raw natural-log mel, mean 0 / std 1)

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

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from edgec.data.bundle import DataBundle, _stratified_indices, _tensor_dataset
from edgec.data.cache import _atomic_save_npy, default_cache_dir
from edgec.errors import DataError
from edgec.registry import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from edgec.runtime.audio import LogMelConfig

__all__ = ["AudioKind", "load_audio", "parse_audio_spec"]

log = logging.getLogger(__name__)

_FRONTEND_KEYS = {"sample_rate": int, "clip_seconds": float, "n_fft": int, "win_length": int,
                  "hop_length": int, "n_mels": int, "f_min": float, "f_max": float}
_COMMON_KEYS = {"augment", "standardize"}
_AUGMENT_NAMES = ("shift", "noise", "specaugment", "device")
_CACHE_FORMAT = "edgec-audio-logmel-v1"
_NOISE_BANK = 64  # at most this many real background clips in the NoiseMix bank
_CHUNK = 256  # clips per log-mel batch


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


class Splits(NamedTuple):
    """The clips a kind's index gives: train and eval, the eval split's name, the class names."""

    train: _Clips
    eval: _Clips
    which: str
    classes: list[str]


@dataclass(frozen=True)
class AudioKind:
    """One audio data kind: its options and defaults, and how it finds the clips of its splits.

    ``frontend``: the ``LogMelConfig`` fields whose defaults the kind overrides. ``splits(path,
    options)`` validates the kind's own options and indexes the folder (no audio decoded).
    ``noise_class``: the training clips of that class (if any) are the real background noise of
    the ``noise`` augmentation.
    """

    name: str
    help: str
    options: frozenset[str]
    frontend: dict[str, Any]
    augment: tuple[str, ...]
    splits: Callable[[str, dict[str, str]], Splits]
    noise_class: str | None = None

    def load(self, spec: str, arg: str, *, seed: int, max_train: int | None, max_eval: int | None) -> DataBundle:
        return load_audio(self, arg, seed=seed, max_train=max_train, max_eval=max_eval)


# --------------------------------------------------------------------------------------- specs
def parse_audio_spec(kind: AudioKind, arg: str) -> tuple[str, dict[str, str]]:
    """``PATH?key=value&key=value`` -> (PATH, options), unknown keys rejected with the known ones."""
    path, _, query = arg.partition("?")
    options: dict[str, str] = {}
    known = sorted(_FRONTEND_KEYS.keys() | _COMMON_KEYS | kind.options)
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise DataError(f"bad option {part!r} in {kind.name}:{arg}",
                            hint=f"write options as {kind.name}:PATH?key=value&key=value")
        if key not in known:
            raise DataError(f"unknown {kind.name} option {key!r}; {did_you_mean(key, known)}", hint=kind.help)
        if key in options:
            raise DataError(f"option {key!r} given twice in {kind.name}:{arg}")
        options[key] = value.strip()
    if not path.strip():
        raise DataError(f"{kind.name} spec needs a path", hint=kind.help)
    return path.strip(), options


def _frontend(kind: AudioKind, options: dict[str, str]) -> LogMelConfig:
    from edgec.runtime.audio import AudioError, LogMelConfig

    base = LogMelConfig(**kind.frontend).to_dict()
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


# -------------------------------------------------------------------------------- features
def _decode_clip(path: str, crop: tuple[int, float] | None, cfg: LogMelConfig) -> np.ndarray:
    from edgec.runtime.audio import AudioError, fix_length, read_audio, resample

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
def _augment_names(kind: AudioKind, options: dict[str, str]) -> tuple[str, ...]:
    raw = options.get("augment", "default").strip().lower()
    if raw == "none":
        return ()
    names = kind.augment if raw == "default" else tuple(n.strip() for n in raw.split("+") if n.strip())
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


def load_audio(kind: AudioKind, arg: str, *, seed: int = 0, max_train: int | None = None,
               max_eval: int | None = None) -> DataBundle:
    """``edgec.data.load_data`` for an audio kind: ``arg`` is ``PATH[?key=value&...]``."""
    import torch

    path, options = parse_audio_spec(kind, arg)  # every option is checked before any file is read
    cfg = _frontend(kind, options)
    augment_names = _augment_names(kind, options)
    standardize = options.get("standardize", "1")
    if standardize not in ("0", "1"):
        raise DataError(f"option standardize={standardize!r}: use 1 or 0")
    train, evald, which, classes = kind.splits(path, options)
    for name, clips in (("train", train), (which, evald)):
        if len(clips) == 0:
            raise DataError(f"{kind.name}:{path}: the {name} split is empty", hint=kind.help)
    root_tag = f"{kind.name}-{Path(path).name or 'root'}"
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
    if kind.noise_class is not None:
        sil = np.flatnonzero(ytr == classes.index(kind.noise_class))
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
        spec=f"{kind.name}:{Path(path).expanduser().resolve()}" + (f"?{query}" if query else ""),
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

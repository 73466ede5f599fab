"""Audio front end for the device runner: file -> mono waveform -> log-mel, in numpy only.

This module imports **numpy and the standard library only** at load time (never torch, never
other ``edgec`` modules), like the rest of ``edgec.runtime``. Reading FLAC (and non-PCM WAV)
uses ``soundfile`` and resampling uses ``scipy.signal.resample_poly``; both are imported inside
the functions that need them. A 16-bit PCM ``.wav`` already at the model's rate needs neither
(the stdlib ``wave`` module reads it when soundfile is absent).

The front end (defaults = BC-ResNet's, docs/methods.md, BC-ResNet)::

    16 kHz mono, clip padded/cropped to 1 s
    STFT: n_fft 512, periodic Hann window of 480 samples zero-padded (centred) to 512, hop 160,
          center=True with reflect padding of n_fft // 2 on both sides  -> 1 + L // hop frames
    power spectrum |X|^2 -> 40 triangular mel filters, HTK mel scale (mel = 2595 log10(1 + f/700)),
          f_min 0 .. f_max sr/2, no area normalisation (each triangle peaks at 1 on the Hz axis;
          torchaudio's ``melscale_fbanks(norm=None, mel_scale="htk")``)
    log(mel + 1e-6)  (natural log)                       -> (1, 40, 101) for 1 s at 16 kHz

Pad/crop to the clip length: a shorter clip gets zeros appended at the end; a longer clip keeps
its centre ``clip_samples`` samples.

The numbers a runner needs travel inside the exported ONNX file as ``metadata_props`` (see
``META_*`` below and ``edgec.export.metadata.write_model_metadata``): the front-end config, the feature
standardisation ``x = (logmel - mean) / std`` and the class names.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = [
    "AUDIO_EXTENSIONS",
    "META_CLASSES",
    "META_FRONTEND",
    "META_NORMALIZATION",
    "AudioError",
    "LogMelConfig",
    "features_from_file",
    "fix_length",
    "hz_to_mel",
    "load_clip",
    "log_mel",
    "mel_filterbank",
    "mel_to_hz",
    "read_audio",
    "resample",
    "standardize",
    "stft_window",
]

#: ONNX ``metadata_props`` keys (values are JSON strings)
META_FRONTEND = "edgec.frontend"  # LogMelConfig.to_dict()
META_NORMALIZATION = "edgec.normalization"  # {"mean": [m], "std": [s]} applied to the log-mel
META_CLASSES = "edgec.classes"  # ["yes", "no", ...] in logit order

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif")


class AudioError(ValueError):
    """A problem with an audio file or a front-end setting; the message says how to fix it."""


@dataclass(frozen=True)
class LogMelConfig:
    """Log-mel front end settings (defaults: BC-ResNet, 16 kHz, (1, 40, 101) per 1 s clip)."""

    sample_rate: int = 16000
    clip_seconds: float = 1.0
    n_fft: int = 512
    win_length: int = 480
    hop_length: int = 160
    n_mels: int = 40
    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate / 2
    log_offset: float = 1e-6
    center: bool = True
    mel_scale: str = "htk"

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise AudioError(f"LogMelConfig.{name} must be a positive integer, got {v!r}")
        if self.win_length > self.n_fft:
            raise AudioError(f"win_length ({self.win_length}) must be <= n_fft ({self.n_fft})")
        if not (isinstance(self.clip_seconds, (int, float)) and self.clip_seconds > 0):
            raise AudioError(f"clip_seconds must be > 0, got {self.clip_seconds!r}")
        if not self.log_offset > 0:
            raise AudioError(f"log_offset must be > 0, got {self.log_offset!r}")
        if self.mel_scale != "htk":
            raise AudioError(f"mel_scale {self.mel_scale!r} is not supported; use 'htk'")
        top = self.sample_rate / 2 if self.f_max is None else self.f_max
        if not 0 <= self.f_min < top <= self.sample_rate / 2:
            raise AudioError(
                f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={self.f_min}, "
                f"f_max={top}, sample_rate={self.sample_rate}"
            )
        if self.center and self.clip_samples <= self.n_fft // 2:
            raise AudioError("clip too short for reflect padding: clip_samples must exceed n_fft // 2")

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def n_frames(self) -> int:
        """Frames of one clip: 1 + L // hop with center padding, else 1 + (L - n_fft) // hop."""
        if self.center:
            return 1 + self.clip_samples // self.hop_length
        return 1 + (self.clip_samples - self.n_fft) // self.hop_length

    @property
    def shape(self) -> tuple[int, int, int]:
        """Feature shape of one clip: (1, n_mels, n_frames)."""
        return (1, self.n_mels, self.n_frames)

    @property
    def fmax(self) -> float:
        return float(self.sample_rate / 2 if self.f_max is None else self.f_max)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> LogMelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AudioError(
                f"unknown front-end setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**d)


# ----------------------------------------------------------------------------------- filterbank
def hz_to_mel(f):
    """HTK mel scale: 2595 * log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(cfg: LogMelConfig = LogMelConfig()) -> np.ndarray:
    """Triangular mel filters, float64 (n_mels, n_fft // 2 + 1), HTK scale, no normalisation.

    ``n_mels + 2`` points equally spaced in mel between f_min and f_max; filter m rises linearly
    (in Hz) from point m to point m+1 and falls to point m+2. Between the first and the last
    filter centre the filters sum to 1 at every frequency bin (a partition of unity).
    """
    freqs = np.linspace(0.0, cfg.sample_rate / 2, cfg.n_freqs)
    pts = mel_to_hz(np.linspace(hz_to_mel(cfg.f_min), hz_to_mel(cfg.fmax), cfg.n_mels + 2))
    lower, centre, upper = pts[:-2, None], pts[1:-1, None], pts[2:, None]
    up = (freqs[None, :] - lower) / (centre - lower)
    down = (upper - freqs[None, :]) / (upper - centre)
    return np.maximum(0.0, np.minimum(up, down))


def stft_window(cfg: LogMelConfig = LogMelConfig()) -> np.ndarray:
    """Periodic Hann window of ``win_length`` samples, zero-padded centred to ``n_fft`` (float64).

    Same as ``torch.hann_window(win_length)`` placed the way ``torch.stft`` places it.
    """
    n = np.arange(cfg.win_length)
    w = 0.5 - 0.5 * np.cos(2.0 * math.pi * n / cfg.win_length)
    left = (cfg.n_fft - cfg.win_length) // 2
    out = np.zeros(cfg.n_fft)
    out[left : left + cfg.win_length] = w
    return out


# ------------------------------------------------------------------------------------- features
def log_mel(wave: np.ndarray, cfg: LogMelConfig = LogMelConfig(), *, fbank: np.ndarray | None = None) -> np.ndarray:
    """Log-mel of a waveform: (L,) -> float32 (1, n_mels, T); (N, L) -> (N, 1, n_mels, T).

    Computed in float64 and returned as float32. ``fbank`` lets a caller pass a precomputed
    :func:`mel_filterbank` (it must match ``cfg``).
    """
    x = np.asarray(wave, dtype=np.float64)
    single = x.ndim == 1
    if single:
        x = x[None]
    if x.ndim != 2:
        raise AudioError(f"log_mel expects a waveform (L,) or a batch (N, L), got shape {x.shape}")
    if cfg.center:
        p = cfg.n_fft // 2
        if x.shape[1] <= p:
            raise AudioError(f"waveform of {x.shape[1]} samples is too short for n_fft {cfg.n_fft}")
        x = np.pad(x, ((0, 0), (p, p)), mode="reflect")
    if x.shape[1] < cfg.n_fft:
        raise AudioError(f"waveform of {x.shape[1]} samples is shorter than n_fft {cfg.n_fft}")
    n_frames = 1 + (x.shape[1] - cfg.n_fft) // cfg.hop_length
    frames = np.lib.stride_tricks.sliding_window_view(x, cfg.n_fft, axis=1)[:, :: cfg.hop_length][:, :n_frames]
    spec = np.fft.rfft(frames * stft_window(cfg), axis=-1)  # (N, T, n_freqs)
    power = spec.real**2 + spec.imag**2
    fb = mel_filterbank(cfg) if fbank is None else fbank
    mel = np.einsum("ntk,mk->nmt", power, fb)
    out = np.log(mel + cfg.log_offset).astype(np.float32)[:, None]
    return out[0] if single else out


def standardize(feats: np.ndarray, normalization: dict | None) -> np.ndarray:
    """``(feats - mean) / std`` with the scalar (or per-channel) ``mean``/``std`` lists, if any."""
    if not normalization or "mean" not in normalization:
        return feats
    mean = np.asarray(normalization["mean"], dtype=np.float32)
    std = np.asarray(normalization.get("std", [1.0]), dtype=np.float32)
    if mean.size > 1:  # per channel: channel axis is -3
        mean, std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
    return ((feats - mean) / std).astype(np.float32)


# ------------------------------------------------------------------------------------------ I/O
def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Mono float32 waveform in [-1, 1] and its sample rate (channels averaged).

    soundfile reads WAV/FLAC/OGG/AIFF; without soundfile only PCM ``.wav`` files are readable
    (stdlib ``wave``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"audio file {path!r} does not exist")
    try:
        import soundfile as sf
    except ImportError:
        sf = None
    if sf is not None:
        try:
            data, sr = sf.read(path, dtype="float32", always_2d=True)
        except Exception as e:  # soundfile raises its own LibsndfileError / RuntimeError
            raise AudioError(f"cannot read audio file {path!r}: {e}") from e
        return np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)), int(sr)
    if not path.lower().endswith(".wav"):
        raise AudioError(f"reading {path!r} needs the soundfile package (pip install soundfile); "
                         "without it only PCM .wav files can be read")
    return _read_wav_stdlib(path)


def _read_wav_stdlib(path: str) -> tuple[np.ndarray, int]:
    import wave

    try:
        with wave.open(path, "rb") as w:
            sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise AudioError(f"cannot read {path!r} as PCM wav ({e}); install soundfile for other formats") from e
    if width == 1:
        a = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        a = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 4:
        a = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise AudioError(f"{path!r}: {8 * width}-bit wav needs the soundfile package (pip install soundfile)")
    return np.ascontiguousarray(a.reshape(-1, ch).mean(axis=1, dtype=np.float32)), int(sr)


def resample(wave: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling (``scipy.signal.resample_poly``, Kaiser window) to ``sr_out``."""
    if sr_in == sr_out:
        return np.asarray(wave, dtype=np.float32)
    if sr_in < 1 or sr_out < 1:
        raise AudioError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    try:
        from scipy.signal import resample_poly
    except ImportError as e:
        raise AudioError(
            f"resampling {sr_in} Hz -> {sr_out} Hz needs scipy (pip install scipy), "
            f"or give audio already at {sr_out} Hz"
        ) from e
    g = math.gcd(int(sr_in), int(sr_out))
    return resample_poly(np.asarray(wave, dtype=np.float64), sr_out // g, sr_in // g).astype(np.float32)


def fix_length(wave: np.ndarray, n: int) -> np.ndarray:
    """Zeros appended up to ``n`` samples; a longer clip keeps its centre ``n`` samples."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.shape[-1] == n:
        return wave
    if wave.shape[-1] < n:
        pad = [(0, 0)] * (wave.ndim - 1) + [(0, n - wave.shape[-1])]
        return np.pad(wave, pad)
    start = (wave.shape[-1] - n) // 2
    return wave[..., start : start + n]


def load_clip(path: str | os.PathLike, cfg: LogMelConfig = LogMelConfig()) -> np.ndarray:
    """Read, downmix, resample to ``cfg.sample_rate`` and pad/crop to ``cfg.clip_samples``."""
    wave, sr = read_audio(path)
    return fix_length(resample(wave, sr, cfg.sample_rate), cfg.clip_samples)


def features_from_file(
    path: str | os.PathLike, cfg: LogMelConfig = LogMelConfig(), normalization: dict | None = None
) -> np.ndarray:
    """The model input for one audio file: float32 (1, n_mels, n_frames), standardised."""
    return standardize(log_mel(load_clip(path, cfg), cfg), normalization)

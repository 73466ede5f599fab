"""Audio on the host: batched torch log-mel and batch-level augmentations.

The numpy front end the device runner uses lives in :mod:`edgec.runtime.audio` (numpy only);
:class:`LogMel` here is its batched ``torch.stft`` twin and uses the *same* mel filterbank matrix
(built once in numpy: HTK mel scale, no area normalisation), so features computed on a GPU during
training match what a device computes (tested on real audio, max abs diff in the log domain).

Augmentations work on a batch of model inputs ``x: float (N, 1, F, T)`` -- log-mel features
standardised as ``x = (logmel - mean) / std`` (``mean``/``std`` from ``bundle.normalization``;
``mean=0, std=1`` means raw natural-log mel power) -- and draw all randomness from the
``torch.Generator`` they are given, so the same generator state gives the same output. They are
picklable classes (like :class:`edgec.data.RandomCropFlip`)::

    TimeShift        shift in time by up to +-max_frames (0.1 s = 10 frames at hop 10 ms); the
                     frames shifted in are filled with the clip's minimum ("low fill", ~silence)
    NoiseMix         add background noise in the mel *power* domain at a random SNR (dB, total
                     mel power of the clip over that of the noise); the noise bank is log-mel
                     clips: real background noise (Speech Commands ``_silence_`` clips) or
                     :func:`generated_noise_bank` (white / pink / brown Gaussian noise)
    SpecAugment      frequency and time masks filled with the clip's mean
    DeviceSimulation smooth, seeded per-device microphone responses (gain in dB per mel band)
                     added as a log-gain; :func:`simulate_device_split` builds a seen/unseen-device
                     test set from real audio with it
    Compose          applies a list of them in order
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from edgec.runtime.audio import (
    LogMelConfig,
    log_mel,
    mel_filterbank,
)

__all__ = [
    "Compose",
    "DeviceSimulation",
    "LogMel",
    "NoiseMix",
    "SpecAugment",
    "TimeShift",
    "device_responses",
    "generated_noise_bank",
    "log_mel_torch",
    "simulate_device_split",
]

_DB_TO_LOG_POWER = math.log(10.0) / 10.0  # a power gain of 1 dB is this much in natural-log mel


# ------------------------------------------------------------------------------------ front end
class LogMel(nn.Module):
    """Batched log-mel with ``torch.stft``: wave (N, L), (N, 1, L) or (L,) -> (N, 1, n_mels, T).

    Same definition as :func:`edgec.runtime.audio.log_mel` (periodic Hann window, center=True with
    reflect padding, power spectrum, the numpy-built HTK filterbank, ``log(mel + log_offset)``),
    computed in the input's float dtype (float32 normally).
    """

    def __init__(self, cfg: LogMelConfig = LogMelConfig()):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("fbank", torch.from_numpy(mel_filterbank(cfg)), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 3 and wave.shape[1] == 1:
            wave = wave[:, 0]
        elif wave.dim() == 1:
            wave = wave[None]
        if wave.dim() != 2:
            raise ValueError(f"LogMel expects (N, L), (N, 1, L) or (L,), got shape {tuple(wave.shape)}")
        dtype = wave.dtype if wave.is_floating_point() else torch.float32
        wave = wave.to(dtype)
        c = self.cfg
        spec = torch.stft(wave, n_fft=c.n_fft, hop_length=c.hop_length, win_length=c.win_length,
                          window=self.window.to(dtype), center=c.center, pad_mode="reflect",
                          return_complex=True)  # (N, n_freqs, T)
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(self.fbank.to(dtype), power)  # (n_mels, n_freqs) @ (N, n_freqs, T)
        return torch.log(mel + c.log_offset)[:, None]


def log_mel_torch(wave: torch.Tensor, cfg: LogMelConfig = LogMelConfig()) -> torch.Tensor:
    """Functional form of :class:`LogMel` (builds the module each call)."""
    return LogMel(cfg).to(wave.device)(wave)


# ------------------------------------------------------------------------------- augmentations
def _check_batch(x: torch.Tensor, who: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{who} expects a batch (N, C, F, T), got shape {tuple(x.shape)}")


def _gdev(generator: torch.Generator) -> torch.device:
    return generator.device


class TimeShift:
    """Shift each clip in time by a uniform integer in [-max_frames, max_frames].

    Frames shifted in are filled with the clip's minimum value (``fill="min"``, the low end of the
    log-mel range, i.e. close to silence) or with 0 (``fill="zero"``, the dataset mean when the
    features are standardised). 0.1 s at a 10 ms hop = 10 frames.
    """

    def __init__(self, max_frames: int = 10, fill: str = "min"):
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 0:
            raise ValueError(f"max_frames must be an integer >= 0, got {max_frames!r}")
        if fill not in ("min", "zero"):
            raise ValueError(f"fill must be 'min' or 'zero', got {fill!r}")
        self.max_frames = max_frames
        self.fill = fill

    def __repr__(self) -> str:
        return f"TimeShift(max_frames={self.max_frames}, fill={self.fill!r})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_batch(x, "TimeShift")
        n, c, f, t = x.shape
        m = self.max_frames
        shift = torch.randint(-m, m + 1, (n,), generator=generator, device=_gdev(generator)).to(x.device)
        src = torch.arange(t, device=x.device)[None, :] - shift[:, None]  # out[:, j] = x[:, j - s]
        valid = (src >= 0) & (src < t)
        moved = x.gather(3, src.clamp(0, t - 1)[:, None, None, :].expand(n, c, f, t))
        fill = x.amin(dim=(1, 2, 3), keepdim=True) if self.fill == "min" else torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(valid[:, None, None, :], moved, fill)


class NoiseMix:
    """Mix background noise into a fraction ``p`` of the clips, in the mel power domain.

    ``noise`` holds K raw log-mel noise clips (K, F, T) or (K, 1, F, T) (natural log of mel power
    + ``log_offset``, as the front end computes them, *not* standardised). For a chosen clip:
    ``P = exp(x * std + mean) - log_offset`` (its mel power), a random noise clip ``N`` rolled in
    time by a random offset, an SNR drawn uniformly from ``snr_db`` and
    ``P' = P + g N`` with ``g = sum(P) / (sum(N) 10^(snr/10))``; the result goes back to the log
    domain and the same standardisation. Noise clips with (near) zero power are dropped.
    """

    def __init__(self, noise: np.ndarray, *, p: float = 0.8, snr_db: tuple[float, float] = (5.0, 25.0),
                 mean: float = 0.0, std: float = 1.0, log_offset: float = 1e-6):
        bank = np.asarray(noise, dtype=np.float64)
        if bank.ndim == 4 and bank.shape[1] == 1:
            bank = bank[:, 0]
        if bank.ndim != 3 or bank.shape[0] == 0:
            raise ValueError(f"noise must be log-mel clips (K, F, T) or (K, 1, F, T), got shape {bank.shape}")
        power = np.maximum(np.exp(bank) - log_offset, 0.0)
        totals = power.sum(axis=(1, 2))
        # silent: mean power at the log floor (log(0 + offset) round-trips to ~1e-22, not 0)
        keep = (totals / (bank.shape[1] * bank.shape[2]) > 1e-3 * log_offset) & (totals > 1e-6 * totals.max())
        if not keep.any():
            raise ValueError("every noise clip is silent (zero mel power); give real noise or generated_noise_bank()")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        lo, hi = (float(v) for v in snr_db)
        if lo > hi:
            raise ValueError(f"snr_db must be (low, high) with low <= high, got {snr_db!r}")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        self.noise_power = power[keep].astype(np.float32)
        self.p, self.snr_db = float(p), (lo, hi)
        self.mean, self.std, self.log_offset = float(mean), float(std), float(log_offset)

    def __repr__(self) -> str:
        return (f"NoiseMix({self.noise_power.shape[0]} noise clips, p={self.p}, snr_db={self.snr_db}, "
                f"mean={self.mean:.4g}, std={self.std:.4g})")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_batch(x, "NoiseMix")
        n, c, f, t = x.shape
        bank = torch.from_numpy(self.noise_power).to(x.device)
        if bank.shape[1:] != (f, t):
            raise ValueError(f"noise clips are {tuple(bank.shape[1:])} (F, T), the batch is {(f, t)}")
        gd = _gdev(generator)
        chosen = (torch.rand(n, generator=generator, device=gd) < self.p).to(x.device)
        k = torch.randint(0, bank.shape[0], (n,), generator=generator, device=gd).to(x.device)
        roll = torch.randint(0, t, (n,), generator=generator, device=gd).to(x.device)
        snr = (self.snr_db[0] + (self.snr_db[1] - self.snr_db[0])
               * torch.rand(n, generator=generator, device=gd, dtype=torch.float64)).to(x.device)
        idx = (torch.arange(t, device=x.device)[None, :] + roll[:, None]) % t  # (n, t)
        noise = bank[k].to(torch.float64).gather(2, idx[:, None, :].expand(n, f, t))[:, None]  # (n,1,F,T)
        xd = x.to(torch.float64)
        power = (torch.exp(xd * self.std + self.mean) - self.log_offset).clamp_min(0.0)
        gain = power.sum(dim=(1, 2, 3)) / (noise.sum(dim=(1, 2, 3)) * torch.pow(10.0, snr / 10.0))
        mixed = power + gain.view(n, 1, 1, 1) * noise
        out = ((torch.log(mixed + self.log_offset) - self.mean) / self.std).to(x.dtype)
        return torch.where(chosen.view(n, 1, 1, 1), out, x)


class SpecAugment:
    """``freq_masks`` frequency masks of width U{0..freq_width} and ``time_masks`` time masks of
    width U{0..time_width}, at uniform positions, filled with the clip's mean value."""

    def __init__(self, freq_masks: int = 2, freq_width: int = 5, time_masks: int = 2, time_width: int = 10):
        for name, v in (("freq_masks", freq_masks), ("freq_width", freq_width),
                        ("time_masks", time_masks), ("time_width", time_width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width

    def __repr__(self) -> str:
        return (f"SpecAugment(freq_masks={self.freq_masks}, freq_width={self.freq_width}, "
                f"time_masks={self.time_masks}, time_width={self.time_width})")

    @staticmethod
    def _masks(n: int, size: int, count: int, width: int, generator: torch.Generator, device) -> torch.Tensor:
        gd = _gdev(generator)
        mask = torch.zeros(n, size, dtype=torch.bool, device=device)
        ar = torch.arange(size, device=device)[None, :]
        for _ in range(count):
            w = torch.randint(0, min(width, size) + 1, (n,), generator=generator, device=gd).to(device)
            start = (torch.rand(n, generator=generator, device=gd).to(device) * (size - w + 1)).floor().long()
            mask |= (ar >= start[:, None]) & (ar < (start + w)[:, None])
        return mask

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_batch(x, "SpecAugment")
        n, c, f, t = x.shape
        fm = self._masks(n, f, self.freq_masks, self.freq_width, generator, x.device)
        tm = self._masks(n, t, self.time_masks, self.time_width, generator, x.device)
        mask = fm[:, None, :, None] | tm[:, None, None, :]
        return torch.where(mask, x.mean(dim=(1, 2, 3), keepdim=True), x)


def device_responses(n_devices: int, n_mels: int, *, seed: int = 0, sigma_db: float = 3.0, n_terms: int = 6,
                     rolloff_db: float = 10.0, max_db: float = 15.0) -> np.ndarray:
    """Smooth random microphone responses, gain in dB per mel band: float64 (n_devices, n_mels).

    Device d (its own seeded stream ``default_rng([seed, d])``, so adding devices does not change
    the earlier ones): ``sum_{k=1..n_terms} a_k cos(pi k (m + 0.5) / M)`` with
    ``a_k ~ N(0, (sigma_db / k)^2)`` (smooth ripple, coarser terms larger), minus a low-end and a
    high-end roll-off of random depth U(0, rolloff_db) dB that fades quadratically over a random
    10-30% of the bands at each end (small-microphone bass and treble loss), then shifted to zero
    mean over the bands (an overall level change says nothing about the device) and clipped to
    +-max_db.
    """
    if n_devices < 1 or n_mels < 1:
        raise ValueError(f"need n_devices >= 1 and n_mels >= 1, got {n_devices}, {n_mels}")
    m = (np.arange(n_mels) + 0.5) / n_mels
    out = np.empty((n_devices, n_mels))
    for d in range(n_devices):
        rng = np.random.default_rng([int(seed), d, 0xDE1])
        k = np.arange(1, n_terms + 1)
        a = rng.normal(0.0, sigma_db / k)
        g = (a[:, None] * np.cos(math.pi * k[:, None] * m[None, :])).sum(axis=0)
        lo_w, hi_w = rng.uniform(0.1, 0.3, size=2)
        lo_db, hi_db = rng.uniform(0.0, rolloff_db, size=2)
        g -= lo_db * np.clip(1.0 - m / lo_w, 0.0, None) ** 2
        g -= hi_db * np.clip(1.0 - (1.0 - m) / hi_w, 0.0, None) ** 2
        out[d] = np.clip(g - g.mean(), -max_db, max_db)
    return out


class DeviceSimulation:
    """Simulated recording devices: a per-device gain curve over mel bands, added in log-mel.

    ``gains_db`` is :func:`device_responses` ``(n_devices, n_mels)``; device d turns features
    ``x`` into ``x + gains_db[d] * ln(10)/10 / std`` (a power gain of g dB is ``g ln(10)/10`` in
    natural-log mel; ``std`` is the feature standardisation, 1 for raw log-mel). This is exact for
    a response constant within each mel band.

    As an augmentation, a fraction ``p`` of the clips each go through one device drawn uniformly
    from ``devices`` (default: all) -- keep some devices out to test on them as unseen.
    """

    def __init__(self, n_mels: int, n_devices: int = 6, *, devices: Sequence[int] | None = None, p: float = 1.0,
                 seed: int = 0, sigma_db: float = 3.0, n_terms: int = 6, rolloff_db: float = 10.0,
                 max_db: float = 15.0, std: float = 1.0):
        self.gains_db = device_responses(n_devices, n_mels, seed=seed, sigma_db=sigma_db, n_terms=n_terms,
                                         rolloff_db=rolloff_db, max_db=max_db)
        self.devices = list(range(n_devices)) if devices is None else [int(d) for d in devices]
        bad = [d for d in self.devices if not 0 <= d < n_devices]
        if bad or not self.devices:
            raise ValueError(f"devices must be a non-empty subset of 0..{n_devices - 1}, got {devices!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        self.p, self.seed, self.std = float(p), int(seed), float(std)

    @property
    def n_devices(self) -> int:
        return self.gains_db.shape[0]

    def __repr__(self) -> str:
        return (f"DeviceSimulation({self.n_devices} devices, sampling {self.devices}, p={self.p}, "
                f"seed={self.seed}, std={self.std:.4g})")

    def log_gains(self) -> np.ndarray:
        """(n_devices, n_mels) shifts in feature units."""
        return self.gains_db * (_DB_TO_LOG_POWER / self.std)

    def apply(self, x, device_ids):
        """``x`` (N, C, F, T) (numpy or torch) through device ``device_ids[i]`` each (-1: untouched)."""
        ids = np.asarray(device_ids if not torch.is_tensor(device_ids) else device_ids.cpu().numpy(), dtype=np.int64)
        if ids.shape != (x.shape[0],):
            raise ValueError(f"device_ids must have shape ({x.shape[0]},), got {ids.shape}")
        if ids.max(initial=-1) >= self.n_devices or ids.min(initial=0) < -1:
            raise ValueError(f"device ids must be in -1..{self.n_devices - 1}")
        if x.shape[2] != self.gains_db.shape[1]:
            raise ValueError(f"x has {x.shape[2]} mel bands, the devices were made for {self.gains_db.shape[1]}")
        table = np.concatenate([self.log_gains(), np.zeros((1, self.gains_db.shape[1]))])  # row -1: identity
        shift = table[ids][:, None, :, None]
        if torch.is_tensor(x):
            return x + torch.from_numpy(shift).to(device=x.device, dtype=x.dtype)
        return (np.asarray(x) + shift).astype(np.asarray(x).dtype, copy=False)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_batch(x, "DeviceSimulation")
        n = x.shape[0]
        gd = _gdev(generator)
        chosen = torch.rand(n, generator=generator, device=gd) < self.p
        pick = torch.randint(0, len(self.devices), (n,), generator=generator, device=gd)
        ids = torch.tensor(self.devices, dtype=torch.long)[pick.cpu()]
        ids = torch.where(chosen.cpu(), ids, torch.full_like(ids, -1))
        return self.apply(x, ids)


def simulate_device_split(x: np.ndarray, sim: DeviceSimulation, devices: Sequence[int], *,
                          seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A device-shift test set from real features ``x`` (N, C, F, T): ``(x_shifted, device_ids)``.

    ``seed=None``: every clip through every device in ``devices``, device-major (len(devices) * N
    rows; repeat the labels with ``np.tile(y, len(devices))``) -- accuracy per device on the same
    clips. With a ``seed``: each clip through one device, a seeded balanced assignment (N rows).
    Seen vs unseen: train with ``DeviceSimulation(..., devices=seen)`` and pass ``seen + unseen``.
    """
    x = np.asarray(x)
    devices = [int(d) for d in devices]
    if not devices:
        raise ValueError("devices is empty")
    if seed is None:
        ids = np.repeat(np.asarray(devices, dtype=np.int64), x.shape[0])
        return sim.apply(np.tile(x, (len(devices), 1, 1, 1)), ids), ids
    rng = np.random.default_rng([int(seed), 0xDE5])
    ids = np.asarray(devices, dtype=np.int64)[rng.permutation(np.arange(x.shape[0]) % len(devices))]
    return sim.apply(x, ids), ids


class Compose:
    """Apply augmentations in order with the same generator."""

    def __init__(self, augments: Sequence):
        self.augments = list(augments)
        for a in self.augments:
            if not callable(a):
                raise TypeError(f"{a!r} is not callable")

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(a) for a in self.augments) + "])"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for a in self.augments:
            x = a(x, generator)
        return x


def generated_noise_bank(cfg: LogMelConfig = LogMelConfig(), n: int = 12, *, seed: int = 0,
                         colors: Sequence[str] = ("white", "pink", "brown")) -> np.ndarray:
    """Raw log-mel (n, 1, F, T) of generated Gaussian noise clips, colours cycled.

    white: flat spectrum; pink: power ~ 1/f; brown: power ~ 1/f^2 (shaped in the FFT domain,
    DC removed), each scaled to an RMS of 0.1 and put through the numpy front end.
    """
    slopes = {"white": 0.0, "pink": 1.0, "brown": 2.0}
    unknown = [c for c in colors if c not in slopes]
    if unknown or not colors:
        raise ValueError(f"unknown noise colour(s) {unknown}; use {sorted(slopes)}")
    rng = np.random.default_rng([int(seed), 0x0015E])
    L = cfg.clip_samples
    f = np.fft.rfftfreq(L, d=1.0 / cfg.sample_rate)
    waves = np.empty((n, L))
    for i in range(n):
        spec = np.fft.rfft(rng.standard_normal(L))
        shape = np.zeros_like(f)
        shape[1:] = f[1:] ** (-slopes[colors[i % len(colors)]] / 2.0)
        w = np.fft.irfft(spec * shape, n=L)
        waves[i] = 0.1 * w / (np.sqrt(np.mean(w**2)) + 1e-12)
    return log_mel(waves, cfg)


# ---------------------------------------------------------------------------------- ONNX metadata

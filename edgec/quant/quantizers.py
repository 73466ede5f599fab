"""Uniform fake quantizers with a straight-through estimator.

Two families share one interface (``scale()``, ``qmin``/``qmax``, ``zero_point``, ``calibrating``):

* :class:`LSQQuantizer` -- trainable step size (Esser et al. 2020, "Learned Step Size
  Quantization"): q = clip(round(x/s), Qn, Qp)*s with the gradient of s scaled by 1/sqrt(N*Qp).
* :class:`RangeQuantizer` -- scale from observed ranges: ``ema`` (running min/max with momentum,
  updated every training forward), ``minmax`` (running extremes) or ``percentile``.

Both are symmetric (zero point 0 in the signed sense); an unsigned quantizer covers [0, Qp*s].
Per-channel along axis 0 (weights) or per-tensor (activations).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def round_ste(x: Tensor) -> Tensor:
    """round() forward, identity backward."""
    return (x.round() - x).detach() + x


def grad_scale(x: Tensor, g: float) -> Tensor:
    """x forward, gradient multiplied by g backward."""
    return (x - x * g).detach() + x * g


def fake_quant(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """clip(round(x/s), qmin, qmax)*s with STE inside the range and zero gradient outside.

    Without autograd the exact expression is used: the STE form (r - x) + x is not bitwise r in
    floating point, and the exported model computes the exact one.
    """
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
        return torch.round(torch.clamp(x / scale, qmin, qmax)) * scale
    return round_ste(torch.clamp(x / scale, qmin, qmax)) * scale


class Quantizer(nn.Module):
    """Common state: integer range, granularity and a calibration switch."""

    def __init__(self, *, qmin: int, qmax: int, per_channel: bool, channels: int = 1):
        super().__init__()
        if qmax <= qmin:
            raise ValueError(f"empty quantization range [{qmin}, {qmax}]")
        self.qmin, self.qmax = int(qmin), int(qmax)
        self.per_channel = per_channel
        self.channels = channels if per_channel else 1
        self.calibrating = False
        self.enabled = True

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        if self.per_channel:
            return t.view(-1, *([1] * (x.dim() - 1)))
        return t.reshape(())

    def _reduce_absmax(self, x: Tensor) -> Tensor:
        if self.per_channel:
            return x.detach().abs().flatten(1).amax(1)
        return x.detach().abs().amax().reshape(1)

    def scale(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:  # pragma: no cover - abstract
        """Forget what was observed: the next :meth:`observe` initialises the scale afresh."""
        raise NotImplementedError

    def observe(self, x: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        return self.quantize(x)

    def quantize(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"range=[{self.qmin},{self.qmax}], per_channel={self.per_channel}"


class LSQQuantizer(Quantizer):
    """Learned step size. Initialised from data on the first forward (or by calibration).

    ``init``: ``"lsq"`` = the paper's 2*mean|x|/sqrt(Qp); ``"minmax"`` = max|x|/Qp over the
    calibration batches (no clipping at the start: much closer to the optimum at 6-8 bits, where the
    paper's rule gives a step several times too coarse); ``"auto"`` = minmax from 6 bits up, else lsq.
    """

    def __init__(self, *, qmin: int, qmax: int, per_channel: bool, channels: int = 1, init: str = "auto"):
        super().__init__(qmin=qmin, qmax=qmax, per_channel=per_channel, channels=channels)
        if init == "auto":
            init = "minmax" if qmax >= 31 else "lsq"
        if init not in ("lsq", "minmax"):
            raise ValueError(f"unknown LSQ init {init!r}")
        self.init = init
        self.step = nn.Parameter(torch.ones(self.channels))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _init_value(self, x: Tensor) -> Tensor:
        x = x.detach()
        if self.per_channel:
            mean_abs = x.abs().flatten(1).mean(1)
        else:
            mean_abs = x.abs().mean().reshape(1)
        return (2 * mean_abs / math.sqrt(self.qmax)).clamp_min(1e-8)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        if self.init == "minmax":
            new = (self._reduce_absmax(x) / self.qmax).clamp_min(1e-8).to(self.step)
            if bool(self.initialized):
                new = torch.maximum(self.step.detach().abs(), new)
        else:
            new = self._init_value(x).to(self.step)
        self.step.copy_(new)
        self.initialized.fill_(True)

    @torch.no_grad()
    def reset(self) -> None:
        self.initialized.fill_(False)

    @torch.no_grad()
    def init_from_range(self, absmax: Tensor) -> None:
        self.step.copy_((absmax / self.qmax).clamp_min(1e-8).reshape(self.channels))
        self.initialized.fill_(True)

    def scale(self) -> Tensor:
        return self.step.detach().abs().clamp_min(1e-8)

    def quantize(self, x: Tensor) -> Tensor:
        if not bool(self.initialized):
            self.observe(x)
        s = self.step.abs().clamp_min(1e-8)
        if torch.is_grad_enabled() and s.requires_grad:
            s = grad_scale(s, 1.0 / math.sqrt(x.numel() / self.channels * self.qmax))
        return fake_quant(x, self._view(s, x), self.qmin, self.qmax)


class RangeQuantizer(Quantizer):
    """Scale from observed ranges: ``ema`` | ``minmax`` | ``percentile``."""

    def __init__(self, *, qmin: int, qmax: int, per_channel: bool, channels: int = 1,
                 method: str = "ema", momentum: float = 0.1, percentile: float = 99.99):
        super().__init__(qmin=qmin, qmax=qmax, per_channel=per_channel, channels=channels)
        if method not in ("ema", "minmax", "percentile"):
            raise ValueError(f"unknown range method {method!r}")
        self.method = method
        self.momentum = momentum
        self.percentile = percentile
        self.register_buffer("absmax", torch.zeros(self.channels))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        if self.method == "percentile" and not self.per_channel:
            flat = x.detach().abs().flatten().float()
            if flat.numel() > 1_000_000:
                flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
            cur = torch.quantile(flat, self.percentile / 100.0).reshape(1)
        else:
            cur = self._reduce_absmax(x)
        cur = cur.to(self.absmax)
        n = int(self.batches)
        if n == 0:
            self.absmax.copy_(cur)
        elif self.method == "minmax":
            self.absmax.copy_(torch.maximum(self.absmax, cur))
        elif self.method == "percentile":
            self.absmax.mul_(n / (n + 1)).add_(cur / (n + 1))  # running mean of per-batch percentiles
        else:
            self.absmax.mul_(1 - self.momentum).add_(self.momentum * cur)
        self.batches += 1

    @torch.no_grad()
    def reset(self) -> None:
        self.absmax.zero_()
        self.batches.zero_()

    def scale(self) -> Tensor:
        return (self.absmax / self.qmax).clamp_min(1e-8)

    def quantize(self, x: Tensor) -> Tensor:
        if self.training and self.per_channel and self.method == "minmax":
            with torch.no_grad():  # weights during QAT: the range follows the current weights
                self.absmax.copy_(self._reduce_absmax(x))
        elif self.training and self.method == "ema" or int(self.batches) == 0:
            self.observe(x)
        return fake_quant(x, self._view(self.scale(), x), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", method={self.method}"


def make_quantizer(kind: str, *, qmin: int, qmax: int, per_channel: bool, channels: int = 1,
                   percentile: float = 99.99, lsq_init: str = "auto") -> Quantizer:
    if kind == "lsq":
        return LSQQuantizer(qmin=qmin, qmax=qmax, per_channel=per_channel, channels=channels, init=lsq_init)
    return RangeQuantizer(qmin=qmin, qmax=qmax, per_channel=per_channel, channels=channels,
                          method=kind, percentile=percentile)


def sqnr_db(x: Tensor, xq: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (x - xq).pow(2).mean().clamp_min(1e-20)
    return float(10 * torch.log10(x.pow(2).mean() / noise))

"""Uniform fake quantizers with a straight-through estimator.

Two families share one interface (``scale()``, ``qmin``/``qmax``, ``zero_point``, ``calibrating``):

* :class:`LSQQuantizer` -- trainable step size (Esser et al. 2020, "Learned Step Size
  Quantization"): q = clip(round(x/s), Qn, Qp)*s with the gradient of s scaled by 1/sqrt(N*Qp).
* :class:`RangeQuantizer` -- scale from observed ranges: ``ema`` (running min/max with momentum,
  updated every training forward), ``minmax`` (running extremes) or ``percentile``.

The integer range [qmin, qmax] is relative to the zero point: q = clip(round(x/s), qmin, qmax)*s is
the affine quantizer with zero point z when [qmin, qmax] = [-z, L-1-z] (what QuantizeLinear computes:
round first, then add z). Weights are symmetric (z = 0, range [-Qp, Qp]); activations get their
range and zero point from calibration statistics (:class:`edgec.quant.modules.ActQuant` decides them
through the target profile). Per-channel along axis 0 (weights) or per-tensor (activations).

A per-tensor :class:`RangeQuantizer` records min and max (``lo``/``hi``) besides ``absmax``; with
``symmetric = False`` its scale covers [lo, hi] on the current integer range:
s = max(hi/qmax, lo/qmin), which for a range chosen from the same statistics is (hi - lo)/(L - 1).
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
        self.symmetric = True  # activation quantizers on an asymmetric target set this False

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

    @torch.no_grad()
    def init_step(self, step: Tensor) -> None:
        self.step.copy_(step.detach().reshape(self.channels).clamp_min(1e-8).to(self.step))
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
        if not per_channel:  # activations: signed extremes for asymmetric grids
            self.register_buffer("lo", torch.zeros(1))
            self.register_buffer("hi", torch.zeros(1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # runs saved before lo/hi existed: derive them from absmax (what the symmetric grid covered)
        if not self.per_channel and prefix + "absmax" in state_dict and prefix + "lo" not in state_dict:
            state_dict[prefix + "lo"] = -state_dict[prefix + "absmax"].clone()
            state_dict[prefix + "hi"] = state_dict[prefix + "absmax"].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _update(self, buf: Tensor, cur: Tensor, n: int, pick) -> None:
        cur = cur.to(buf)
        if n == 0:
            buf.copy_(cur)
        elif self.method == "minmax":
            buf.copy_(pick(buf, cur))
        elif self.method == "percentile":
            buf.mul_(n / (n + 1)).add_(cur / (n + 1))  # running mean of per-batch percentiles
        else:
            buf.mul_(1 - self.momentum).add_(self.momentum * cur)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        lo = hi = None
        if self.method == "percentile" and not self.per_channel:
            flat = x.detach().flatten().float()
            if flat.numel() > 1_000_000:
                flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
            cur = torch.quantile(flat.abs(), self.percentile / 100.0).reshape(1)
            p = torch.tensor([1 - self.percentile / 100.0, self.percentile / 100.0])
            lo, hi = torch.quantile(flat, p).reshape(2, 1)
        else:
            cur = self._reduce_absmax(x)
            if not self.per_channel:
                lo, hi = x.detach().amin().reshape(1), x.detach().amax().reshape(1)
        n = int(self.batches)
        self._update(self.absmax, cur, n, torch.maximum)
        if lo is not None:
            self._update(self.lo, lo, n, torch.minimum)
            self._update(self.hi, hi, n, torch.maximum)
        self.batches += 1

    @torch.no_grad()
    def reset(self) -> None:
        self.absmax.zero_()
        self.batches.zero_()
        if not self.per_channel:
            self.lo.zero_()
            self.hi.zero_()

    def scale(self) -> Tensor:
        if self.symmetric or self.per_channel:
            return (self.absmax / self.qmax).clamp_min(1e-8)
        return range_scale(self.lo.clamp_max(0), self.hi.clamp_min(0), self.qmin, self.qmax)

    def quantize(self, x: Tensor) -> Tensor:
        if self.training and self.per_channel and self.method == "minmax":
            with torch.no_grad():  # weights during QAT: the range follows the current weights
                self.absmax.copy_(self._reduce_absmax(x))
        elif self.training and self.method == "ema" or int(self.batches) == 0:
            self.observe(x)
        return fake_quant(x, self._view(self.scale(), x), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", method={self.method}"


def range_scale(lo: Tensor, hi: Tensor, qmin: int, qmax: int) -> Tensor:
    """The smallest step whose grid [qmin*s, qmax*s] covers [lo, hi] (lo <= 0 <= hi)."""
    s = torch.zeros_like(hi)
    if qmax > 0:
        s = torch.maximum(s, hi / qmax)
    if qmin < 0:
        s = torch.maximum(s, lo / qmin)
    return s.clamp_min(1e-8)


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

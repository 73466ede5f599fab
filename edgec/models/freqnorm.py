"""Frequency-wise normalizations for spectrogram models (docs/methods.md, BC-ResNet).

Inputs are log-mel feature maps laid out ``(N, C, F, T)``: batch, channels, frequency bins, frames.

* ``SubSpectralNorm`` (SSN, Chang et al. 2021): the F bins are split into ``S`` contiguous sub-bands
  and every (channel, sub-band) pair gets its own BatchNorm statistics and affine:
  ``(N, C, F, T) -> (N, C*S, F/S, T) -> BatchNorm2d(C*S) -> (N, C, F, T)``.
* ``IFN`` (instance frequency-wise normalization): per instance ``n`` and bin ``f``, mean and
  variance over ``(C, T)``, no affine. Written out explicitly: ``nn.InstanceNorm2d`` normalizes
  per *channel* over ``(F, T)``, which is a different statistic.
* ``ResNorm`` (Residual Normalization, Kim et al. DCASE2021): ``lam * x + IFN(x)``.
* ``RFN`` (Relaxed IFN, Kim et al. Interspeech 2022): ``lam * N(x) + (1 - lam) * IFN(x)`` with
  ``N`` a layer norm over ``(C, F, T)`` (no affine, like IFN) or a BatchNorm2d over channels.

Everything is written for torch.fx (our quantization pass) and the TorchScript ONNX exporter:
no data-dependent Python control flow in a traced graph (the eager-mode shape checks are skipped
when the input is an fx proxy), reshapes via ``unflatten``/``flatten`` so no sizes are read.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from edgec.errors import ModelError

__all__ = ["IFN", "RFN", "ResNorm", "SubSpectralNorm", "build_freq_norm", "ifn", "layer_norm_cft"]

_NORMS = ("resnorm", "rfn", "none")
_RFN_BASES = ("layer", "batch")


def _check_4d(x: Tensor, who: str) -> None:
    if isinstance(x, Tensor) and x.dim() != 4:
        raise ModelError(f"{who} expects a (N, C, F, T) tensor, got shape {tuple(x.shape)}",
                         hint="feed log-mel features as (batch, channels, mel bins, frames), e.g. (B, 1, 40, 101)")


def _mean(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    # One axis at a time, innermost first: the same value (equal-sized groups), but ONNX Runtime's
    # ReduceMean over several strided axes accumulates in a plain float32 loop, ~10x further from
    # the exact mean than PyTorch; that error flips int8 roundings downstream and costs parity.
    for d in sorted(dims, reverse=True):
        x = x.mean(dim=d, keepdim=True)
    return x


def ifn(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Instance frequency-wise normalization: zero mean, unit variance over (C, T) per (n, f)."""
    d = x - _mean(x, (1, 3))
    var = _mean(d * d, (1, 3))  # biased variance, as in every normalization layer
    return d * torch.rsqrt(var + eps)


def layer_norm_cft(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Layer norm without affine over (C, F, T) per instance."""
    d = x - _mean(x, (1, 2, 3))
    var = _mean(d * d, (1, 2, 3))
    return d * torch.rsqrt(var + eps)


def _check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ModelError(f"eps must be a positive number, got {eps!r}", hint="the usual value is 1e-5")


def _check_lam(lam: float, *, unit: bool) -> None:
    ok = isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam >= 0 and (not unit or lam <= 1)
    if not ok:
        rng = "in [0, 1]" if unit else ">= 0"
        raise ModelError(f"lam must be a number {rng}, got {lam!r}", hint="the paper's value is 0.1")


class SubSpectralNorm(nn.Module):
    """BatchNorm with separate statistics and affine per (channel, frequency sub-band).

    The ``F`` bins of the input must be divisible by ``sub_bands``; sub-band ``j`` holds bins
    ``[j*F/S, (j+1)*F/S)``.
    """

    def __init__(self, channels: int, sub_bands: int = 5, *, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        for key, v in (("channels", channels), ("sub_bands", sub_bands)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ModelError(f"SubSpectralNorm {key} must be a positive integer, got {v!r}")
        self.channels = channels
        self.sub_bands = sub_bands
        self.bn = nn.BatchNorm2d(channels * sub_bands, eps=eps, momentum=momentum)

    def forward(self, x: Tensor) -> Tensor:
        _check_4d(x, "SubSpectralNorm")
        if isinstance(x, Tensor):  # eager mode only; an fx proxy has no concrete shape
            if x.shape[1] != self.channels:
                raise ModelError(f"SubSpectralNorm({self.channels}) got {x.shape[1]} channels",
                                 hint="build it with the channel count of the layer that feeds it")
            if x.shape[2] % self.sub_bands:
                raise ModelError(
                    f"SubSpectralNorm with {self.sub_bands} sub-bands got {x.shape[2]} frequency bins, "
                    f"which is not divisible by {self.sub_bands}",
                    hint=f"use a number of mel bins that stays divisible by {self.sub_bands} after every "
                         "frequency stride/pooling of the model (e.g. 40 or 80 mels), or change sub_bands")
        # (N, C, F, T) -> (N, C, S, F/S, T) -> (N, C*S, F/S, T): channel-major, as BatchNorm2d(C*S) sees it
        y = self.bn(x.unflatten(2, (self.sub_bands, -1)).flatten(1, 2))
        return y.unflatten(1, (self.channels, self.sub_bands)).flatten(2, 3)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, sub_bands={self.sub_bands}"


class IFN(nn.Module):
    """Instance frequency-wise normalization (no parameters)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        _check_eps(eps)
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        _check_4d(x, "IFN")
        return ifn(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class ResNorm(nn.Module):
    """Residual normalization: ``lam * x + IFN(x)`` (no parameters; ``lam`` is a constant)."""

    def __init__(self, lam: float = 0.1, eps: float = 1e-5):
        super().__init__()
        _check_lam(lam, unit=False)
        _check_eps(eps)
        self.lam = float(lam)
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        _check_4d(x, "ResNorm")
        return self.lam * x + ifn(x, self.eps)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, eps={self.eps}"


class RFN(nn.Module):
    """Relaxed instance frequency-wise normalization: ``lam * N(x) + (1 - lam) * IFN(x)``.

    ``base="layer"``: N is a layer norm over (C, F, T) without affine (parameter-free, like IFN).
    ``base="batch"``: N is ``BatchNorm2d(channels)`` (with affine; needs ``channels``).
    """

    def __init__(self, channels: int | None = None, lam: float = 0.5, base: str = "layer", eps: float = 1e-5):
        super().__init__()
        _check_lam(lam, unit=True)
        _check_eps(eps)
        if base not in _RFN_BASES:
            raise ModelError(f"unknown RFN base norm {base!r}", hint=f"choose one of {', '.join(_RFN_BASES)}")
        if base == "batch" and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ModelError(f"RFN(base='batch') needs the channel count, got channels={channels!r}",
                             hint="pass channels=<number of input channels>, or use base='layer'")
        self.lam = float(lam)
        self.eps = float(eps)
        self.base = base
        self.channels = channels
        self.bn = nn.BatchNorm2d(channels, eps=eps) if base == "batch" else None

    def forward(self, x: Tensor) -> Tensor:
        _check_4d(x, "RFN")
        n = self.bn(x) if self.bn is not None else layer_norm_cft(x, self.eps)
        return self.lam * n + (1.0 - self.lam) * ifn(x, self.eps)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, base={self.base!r}, eps={self.eps}"


def build_freq_norm(norm: str, channels: int, *, lam: float | None = None, rfn_base: str = "layer") -> nn.Module:
    """The normalization named ``norm`` (``resnorm`` | ``rfn`` | ``none``) for ``channels`` channels.

    ``lam`` defaults to 0.1 for ResNorm and 0.5 for RFN.
    """
    if norm == "resnorm":
        return ResNorm(0.1 if lam is None else lam)
    if norm == "rfn":
        return RFN(channels, 0.5 if lam is None else lam, base=rfn_base)
    if norm == "none":
        return nn.Identity()
    raise ModelError(f"unknown frequency normalization {norm!r}", hint=f"choose one of {', '.join(_NORMS)}")

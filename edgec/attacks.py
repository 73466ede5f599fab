"""Adversarial attacks (FGSM, PGD under L-inf and L2) and PGD adversarial training.

Models see *normalised* inputs ``x = (pixel - mean) / std`` (per channel, ``pixel`` in [0, 1];
see :class:`edgec.data.DataBundle.normalization`), while the threat model is stated in *pixel*
space: ``eps = 8/255`` means 8/255 of the pixel range, and an adversarial image must stay a valid
image (every pixel in [0, 1]). :class:`InputSpace` holds that mapping. The attacks optimise a
perturbation ``d`` in pixel space and feed ``to_model(clamp(to_pixel(x) + d, 0, 1))`` to the
model, so the eps-ball, the step size and the L2 norm are all pixel-space quantities whatever the
per-channel std is (in normalised units the L-inf radius of channel c is ``eps / std_c``, see
:meth:`InputSpace.eps_model`).

During an attack the model is put in eval mode (BatchNorm uses and keeps its running stats) and
restored afterwards module by module; gradients are taken with ``torch.autograd.grad`` w.r.t. the
perturbation only, so no parameter's ``.grad`` is touched. Random starts draw from ``generator``
(a CPU ``torch.Generator``) or, when it is None, from torch's global CPU RNG (which the training
engine checkpoints, so adversarial training resumes exactly).

Untargeted by default (maximise the loss of the true label); ``targeted=True`` minimises the loss
of the given labels instead.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgec.errors import InputError

__all__ = ["InputSpace", "Attack", "fgsm", "pgd", "attack_batch", "robust_accuracy", "adversarial_loss"]

Norm = Literal["linf", "l2"]
_TINY = 1e-12


@dataclass(frozen=True)
class InputSpace:
    """Map between the model's normalised inputs and pixel space ``[pixel_min, pixel_max]``.

    ``x = (pixel - mean) / std`` per channel (channel axis 1 of an (N, C, ...) batch).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_min: float = 0.0
    pixel_max: float = 1.0

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise InputError(f"InputSpace: mean {self.mean} and std {self.std} need the same, non-zero length")
        if any(s <= 0 for s in self.std):
            raise InputError(f"InputSpace: std must be > 0 (got {self.std})")
        if not self.pixel_max > self.pixel_min:
            raise InputError("InputSpace: pixel_max must be > pixel_min")

    @classmethod
    def from_normalization(cls, norm: dict) -> InputSpace:
        """From a DataBundle ``normalization`` dict (``mean``/``std`` on the [0, 1] pixel scale)."""
        if not norm or "mean" not in norm or "std" not in norm:
            raise InputError("the data has no `normalization` (mean/std), so pixel-space eps cannot be mapped",
                             hint="give the DataBundle a normalization dict, or use InputSpace.identity(channels)")
        return cls(tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"]))

    @classmethod
    def from_bundle(cls, bundle: Any) -> InputSpace:
        return cls.from_normalization(bundle.normalization)

    @classmethod
    def identity(cls, channels: int = 1) -> InputSpace:
        """Inputs already in pixel space [0, 1]."""
        return cls((0.0,) * channels, (1.0,) * channels)

    def _view(self, values: Sequence[float], like: Tensor) -> Tensor:
        if like.ndim >= 2 and like.shape[1] != len(values) and len(values) != 1:
            raise InputError(f"input has {like.shape[1]} channels but the InputSpace has {len(values)}")
        shape = [1] * like.ndim
        if like.ndim >= 2:
            shape[1] = len(values)
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)

    def to_pixel(self, x: Tensor) -> Tensor:
        return x * self._view(self.std, x) + self._view(self.mean, x)

    def to_model(self, p: Tensor) -> Tensor:
        return (p - self._view(self.mean, p)) / self._view(self.std, p)

    def lower(self, like: Tensor) -> Tensor:
        """Smallest valid normalised value per channel, shaped to broadcast against ``like``."""
        return (self.pixel_min - self._view(self.mean, like)) / self._view(self.std, like)

    def upper(self, like: Tensor) -> Tensor:
        return (self.pixel_max - self._view(self.mean, like)) / self._view(self.std, like)

    def eps_model(self, eps: float, like: Tensor) -> Tensor:
        """A pixel-space L-inf radius in normalised units, per channel: ``eps / std_c``."""
        return eps / self._view(self.std, like)

    def pixel_delta(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """The perturbation ``x_adv - x`` measured in pixel space."""
        return (x_adv - x) * self._view(self.std, x)


@dataclass(frozen=True)
class Attack:
    """An attack configuration; ``attack(model, x, y)`` returns the adversarial batch.

    ``step`` defaults to ``eps / 4`` for PGD (2/255 at eps 8/255, Madry et al.); FGSM uses one step
    of size ``eps`` with no random start.
    """

    kind: Literal["pgd", "fgsm"] = "pgd"
    norm: Norm = "linf"
    eps: float = 8 / 255
    step: float | None = None
    steps: int = 10
    random_start: bool = True
    targeted: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ("pgd", "fgsm"):
            problems.append(f"attack must be 'pgd' or 'fgsm' (got {self.kind!r})")
        if self.norm not in ("linf", "l2"):
            problems.append(f"norm must be 'linf' or 'l2' (got {self.norm!r})")
        if not self.eps >= 0:
            problems.append(f"eps must be >= 0 (got {self.eps!r})")
        if self.step is not None and not self.step > 0:
            problems.append(f"step must be > 0 (got {self.step!r})")
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps!r})")
        if problems:
            raise InputError("invalid attack: " + "; ".join(problems))

    @classmethod
    def from_config(cls, cfg: Any) -> Attack:
        """From a recipe ``adversarial:`` block (fields attack, norm, eps, step, steps, random_start)."""
        return cls(kind=cfg.attack, norm=cfg.norm, eps=cfg.eps, step=cfg.step, steps=cfg.steps,
                   random_start=cfg.random_start)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, space: InputSpace, *,
                 generator: torch.Generator | None = None) -> Tensor:
        if self.kind == "fgsm":
            return fgsm(model, x, y, space=space, eps=self.eps, norm=self.norm, targeted=self.targeted)
        return pgd(model, x, y, space=space, eps=self.eps, step=self.step if self.step is not None else self.eps / 4,
                   steps=self.steps, norm=self.norm, random_start=self.random_start, generator=generator,
                   targeted=self.targeted)


# ----------------------------------------------------------------------------------------------
# the attacks


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *([1] * (t.ndim - 1)))


def _random_start(p: Tensor, eps: float, norm: Norm, generator: torch.Generator | None) -> Tensor:
    # drawn on the CPU so the same seed gives the same batch on any device
    if norm == "linf":
        d = (torch.rand(p.shape, generator=generator, dtype=torch.float32) * 2 - 1) * eps
    else:  # uniform radius in [0, eps] along a uniformly random direction
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        r = torch.rand((p.shape[0],), generator=generator, dtype=torch.float32).view(-1, *([1] * (p.ndim - 1)))
        d = d / _per_sample_norm(d) * r * eps
    return d.to(device=p.device, dtype=p.dtype)


def _project(d: Tensor, p: Tensor, eps: float, norm: Norm) -> Tensor:
    """Into the eps-ball around 0, then so that ``p + d`` is a valid image."""
    if norm == "linf":
        d = d.clamp(-eps, eps)
    else:
        d = d * (eps / _per_sample_norm(d)).clamp(max=1.0)
    return (p + d).clamp(0.0, 1.0) - p


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, space: InputSpace, eps: float, step: float, steps: int,
        norm: Norm = "linf", random_start: bool = True, generator: torch.Generator | None = None,
        targeted: bool = False, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Projected gradient descent (Madry et al. 2018) on normalised inputs ``x``; eps/step in pixel units.

    Returns the adversarial batch in the model's normalised space (detached). For ``norm="linf"``
    the ascent step is ``step * sign(grad)``; for ``"l2"`` it is ``step * grad / ||grad||_2``.
    """
    if norm not in ("linf", "l2"):
        raise InputError(f"norm must be 'linf' or 'l2' (got {norm!r})")
    if steps < 1:
        raise InputError(f"steps must be >= 1 (got {steps})")
    loss_fn = loss_fn or F.cross_entropy
    net = _unwrap(model)
    modes = _module_modes(net)
    net.eval()
    x = x.detach()
    y = y.detach()
    sign = -1.0 if targeted else 1.0
    try:
        # scale (float32 through the attack, whatever autocast is on)
        p = space.to_pixel(x.float()).clamp(space.pixel_min, space.pixel_max)
        if space.pixel_min != 0.0 or space.pixel_max != 1.0:  # work on [0, 1]
            lo, hi = space.pixel_min, space.pixel_max
            p01 = (p - lo) / (hi - lo)
            eps, step = eps / (hi - lo), step / (hi - lo)
        else:
            lo, hi, p01 = 0.0, 1.0, p
        if random_start and eps > 0:
            d = _project(_random_start(p01, eps, norm, generator), p01, eps, norm)
        else:
            d = torch.zeros_like(p01)
        for _ in range(steps):
            d.requires_grad_(True)
            with torch.enable_grad():
                logits = net(space.to_model((p01 + d) * (hi - lo) + lo).to(x.dtype))
                loss = loss_fn(logits.float(), y)
                (g,) = torch.autograd.grad(loss, d)
            d = d.detach()
            if norm == "linf":
                d = d + sign * step * g.sign()
            else:
                d = d + sign * step * g / _per_sample_norm(g)
            d = _project(d, p01, eps, norm)
        return space.to_model((p01 + d) * (hi - lo) + lo).to(x.dtype).detach()
    finally:
        for m, mode in modes:
            m.training = mode


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, space: InputSpace, eps: float, norm: Norm = "linf",
         targeted: bool = False, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015); with ``norm="l2"`` the fast gradient method
    ``eps * grad / ||grad||_2``. One step of size eps from the clean input, then clipped to valid pixels."""
    return pgd(model, x, y, space=space, eps=eps, step=eps, steps=1, norm=norm, random_start=False,
               targeted=targeted, loss_fn=loss_fn)


# ----------------------------------------------------------------------------------------------
# evaluation and training


def attack_batch(attack: Attack | None, model: nn.Module, x: Tensor, y: Tensor, space: InputSpace, *,
                 generator: torch.Generator | None = None) -> Tensor:
    """``x`` itself when ``attack`` is None (clean), else the adversarial batch."""
    return x if attack is None else attack(model, x, y, space, generator=generator)


def robust_accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], attack: Attack | None,
                    space: InputSpace, *, device: str | torch.device = "cpu", seed: int = 0) -> float:
    """Top-1 accuracy on the adversarial examples of ``attack`` (clean accuracy when None).

    The model is evaluated in eval mode and its train/eval modes are restored afterwards.
    """
    g = torch.Generator().manual_seed(seed)
    net = _unwrap(model)
    modes = _module_modes(net)
    correct = total = 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            xa = attack_batch(attack, net, x, y, space, generator=g)
            net.eval()
            with torch.no_grad():
                correct += int((net(xa).argmax(-1) == y).sum())
            total += len(y)
    finally:
        for m, mode in modes:
            m.training = mode
    return correct / max(total, 1)


def adversarial_loss(loss_fn: Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor | None]],
                     attack: Attack, space: InputSpace, *, ratio: float = 1.0,
                     generator: torch.Generator | None = None):
    """Wrap a training ``loss_fn(m, x, y) -> (loss, logits)`` into PGD adversarial training.

    ``ratio`` = weight of the adversarial loss: ``(1 - ratio) * loss(x) + ratio * loss(x_adv)``
    (1.0 = pure PGD-AT, Madry et al.; 0.5 = Goodfellow et al.'s mixed objective). The attack runs
    on the model in eval mode (BatchNorm statistics untouched) and the training forward pass(es)
    then run in the model's own mode. The returned logits are those of the adversarial batch, so
    the engine's ``train_acc`` is the accuracy under attack.
    """
    if not 0.0 <= ratio <= 1.0:
        raise InputError(f"adversarial ratio must be in [0, 1] (got {ratio})")

    def wrapped(m: nn.Module, x: Tensor, y: Tensor):
        if ratio == 0.0:
            return loss_fn(m, x, y)
        x_adv = attack(m, x, y, space, generator=generator)
        adv, z_adv = loss_fn(m, x_adv, y)
        if ratio == 1.0:
            return adv, z_adv
        clean, _ = loss_fn(m, x, y)
        return (1.0 - ratio) * clean + ratio * adv, z_adv

    return wrapped

"""Batch-level train augmentation for image data (applied by the training engine)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["RandomCropFlip"]


class RandomCropFlip:
    """Random crop (with ``padding`` pixels of zeros around) + random horizontal flip, batched.

    Works on an already normalised float batch (N,C,H,W), so the zero padding is zero in the
    normalised space (the dataset mean colour). All randomness comes from ``generator``: the same
    generator state gives the same output. A picklable class rather than a closure, so it can be
    sent to worker processes.
    """

    def __init__(self, padding: int = 4, flip: bool = True):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = int(padding)
        self.flip = bool(flip)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        if x.dim() != 4:
            raise ValueError(f"RandomCropFlip expects a batch (N,C,H,W), got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        p = self.padding
        gdev = generator.device
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=gdev).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=gdev).to(x.device)
        flip = torch.rand(n, generator=generator, device=gdev).to(x.device) < 0.5
        if not self.flip:
            flip = torch.zeros_like(flip)
        padded = F.pad(x, (p, p, p, p)) if p else x
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)
        rows = oy[:, None] + ar_h  # (N, H)
        cols = torch.where(flip[:, None], ox[:, None] + (w - 1 - ar_w), ox[:, None] + ar_w)  # (N, W)
        out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * p))
        return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))

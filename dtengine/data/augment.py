"""Horizontal flips, the paper's only augmentation: one mask per batch, applied alike to images and label maps.

Who draws the mask decides its randomness: the `Distiller` keys it by sample (`runtime.device.SampleKeys`), the
evaluation and interpreter loops draw it from their own seeded generators, and teacher training from torch's.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_flip_mask(
    count: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None, p: float = 0.5
) -> Tensor:
    """(count,) bool: which samples to flip, each with probability p."""
    return torch.rand(count, generator=generator, device=device) < p


def flip_where(mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Flip left-right (last dim) the samples of each (B, ..., W) tensor where `mask` (B,) is True."""
    flipped = []
    for tensor in tensors:
        where = mask.to(tensor.device).view(-1, *[1] * (tensor.dim() - 1))
        flipped.append(torch.where(where, tensor.flip(-1), tensor))
    return tuple(flipped)

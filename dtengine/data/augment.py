"""Batch augmentation on the training device (the paper uses horizontal flips only).

Applied to the whole batch after loading, with the global torch RNG, so checkpoints that save RNG states
reproduce it exactly on resume.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_hflip(images: Tensor, p: float = 0.5) -> Tensor:
    """Flip each image of (B, C, H, W) left-right with probability p."""
    flip = torch.rand(images.shape[0], device=images.device) < p  # (B,)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)

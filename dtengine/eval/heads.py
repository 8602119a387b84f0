"""The one segmentation head shape used by every protocol: a 1x1 conv per level, upsampled and summed.

For a 1x1 conv W on channel-concatenated, bilinearly upsampled levels, W . up(concat(f_l)) = sum_l up(W_l . f_l)
because bilinear upsampling is linear and acts on each channel alike. Applying each W_l at the level's own
resolution and upsampling the K-channel logits gives the same probe without ever materialising the upsampled
features (1,024 channels x 64 x 64 per image for a ResNet-18).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LevelwiseLinearHead(nn.Module):
    """Multi-level features -> per-pixel class logits; linear in the features unless `norm` is set.

    Args:
        channels: C_l of each level.
        num_classes: K.
        norm: put a BatchNorm2d before each level's conv (the trainable head of fine-tuning and of the supervised
            control, where raw feature scales differ between models); off for the frozen probe, whose cached
            features are standardised instead.
    """

    def __init__(self, channels: Sequence[int], num_classes: int, norm: bool = False):
        super().__init__()
        self.norms = nn.ModuleList([nn.BatchNorm2d(c) if norm else nn.Identity() for c in channels])
        self.convs = nn.ModuleList([nn.Conv2d(c, num_classes, 1, bias=False) for c in channels])
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, features: Sequence[Tensor], out_size: Sequence[int], grid: int = 0) -> Tensor:
        """Args: features [(B, C_l, H_l, W_l)]; out_size (H, W); grid: logits formed on a grid x grid (0 = out_size)
        and then upsampled to out_size. Returns: logits (B, K, H, W)."""
        size = tuple(out_size) if grid <= 0 else (grid, grid)
        logits = self.bias.view(1, -1, 1, 1)
        for norm, conv, feature in zip(self.norms, self.convs, features):
            level = conv(norm(feature.float()))  # (B, K, H_l, W_l)
            logits = logits + F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        if size != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits

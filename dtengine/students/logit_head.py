"""Logit head for label distillation: class logits from the regressor's PPM + FPN decoder (UPerNet-style).

It reads the FPN's finest output, which already carries the pyramid pooling of the last stage through the
top-down path, so the PPM head and the feature regressor share one decoder: a head on the last stage alone would
predict labels at stride 32 (2 x 2 logits for a 64 px image), far coarser than the interpreter's soft labels.
"""

from __future__ import annotations

from torch import Tensor, nn

from dtengine.students.regressor import ConvBNReLU


class LogitHead(nn.Module):
    """(B, channels, H, W) FPN map -> (B, num_classes, H, W) logits: 3x3 ConvBNReLU, then a 1x1 classifier."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fuse = ConvBNReLU(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.fuse(x))

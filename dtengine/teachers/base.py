"""What every teacher returns: the images the student should see and the teacher's multi-scale features.

A diffusion teacher returns the real images it encoded; a GAN teacher would return the images it generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


@dataclass(frozen=True)
class TeacherLevel:
    """One feature level the teacher exposes."""

    block: int  # decoder block index it is read from
    stride: int  # input pixels per feature pixel
    channels: int


class TeacherOutput(NamedTuple):
    images: Tensor  # (B, 3, H, W) in [0, 1]: the student's input
    features: list[Tensor]  # one (B, C_l, H / s_l, W / s_l) map per level

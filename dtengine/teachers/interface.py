"""What every teacher is: a frozen module mapping images (+ per-sample noise) to the images the student sees and
the teacher's multi-scale features.

A diffusion teacher returns the real images it encoded; a GAN teacher would return the images it generated.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from torch import Tensor

from dtengine.levels import TeacherLevel


class TeacherOutput(NamedTuple):
    images: Tensor  # (B, 3, H, W) in [0, 1]: the student's input
    features: list[Tensor]  # one (B, C_l, H / s_l, W / s_l) map per level


class Teacher(Protocol):
    """The interface the `Distiller` relies on."""

    levels: list[TeacherLevel]
    """The features it returns, in order: block, stride, channels."""

    def __call__(self, images: Tensor, noise: Tensor | None = None) -> TeacherOutput:
        """images (B, 3, H, W) in [0, 1]; noise (B, 3, H, W) standard normal, drawn by the caller (None: drawn
        here from torch's global generator)."""
        ...

"""The feature-level type that teachers describe and students are built to predict.

A neutral module (it imports nothing of dtengine), so students never import teachers to learn what a level is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherLevel:
    """One feature level a teacher exposes."""

    block: int  # the teacher block it is read from (a diffusion U-Net's decoder block index)
    stride: int  # input pixels per feature pixel
    channels: int


def describe_levels(levels: list[TeacherLevel] | tuple[TeacherLevel, ...]) -> list[list[int]]:
    """[[block, stride, channels], ...]: how checkpoints and saved interpreters record the levels they fit."""
    return [[level.block, level.stride, level.channels] for level in levels]

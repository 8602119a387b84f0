"""One entry point for every teacher kind, and what a configured teacher costs and gives (`teacher-info`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from dtengine.levels import TeacherLevel
from dtengine.teachers.adm import build_adm_teacher
from dtengine.teachers.config import TeacherConfig
from dtengine.teachers.diffusion import build_diffusion_teacher
from dtengine.teachers.gan import build_gan_teacher
from dtengine.teachers.latent import build_latent_teacher
from dtengine.teachers.noising import NoisingTeacher

BUILDERS = {
    "unet": build_diffusion_teacher,
    "adm": build_adm_teacher,
    "latent_unet": build_latent_teacher,
    "dit": build_latent_teacher,
    "gan": build_gan_teacher,
}


def build_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu", load_weights: bool = True) -> NoisingTeacher:
    """The frozen teacher `cfg` describes, of any `teacher.kind`, on `device`.

    Calling it on a batch of clean images (B, 3, H, W) in [0, 1] noises them and returns (images, features);
    `teacher.features(x_t, t)` is the bare network pass on already-noised images.

    Args:
        load_weights: False builds the architecture only (no checkpoint is read), e.g. on the meta device.
    """
    return BUILDERS[cfg.kind](cfg, device, load_weights=load_weights)


@dataclass
class TeacherInfo:
    kind: str
    path: str
    parameters: int
    flops_per_image: int
    """Multiply-adds x 2 of one pass up to the last tapped block (and a latent teacher's VAE encoding)."""
    image_size: int
    levels: list[TeacherLevel]

    def lines(self) -> list[str]:
        source = "random weights" if self.path == "" else self.path
        head = (
            f"teacher: {self.kind} ({source}), {self.parameters / 1e6:.1f} M parameters, "
            f"{_with_unit(self.flops_per_image)} per {self.image_size} px image (one pass to the last tap)"
        )
        rows = [
            f"  level {i}: block {level.block}, stride {level.stride}, {level.channels} channels, "
            f"{self.image_size // level.stride}x{self.image_size // level.stride} px"
            for i, level in enumerate(self.levels)
        ]
        return [head, *rows]


def _with_unit(flops: float) -> str:
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.0f} FLOPs"


def describe_teacher(cfg: TeacherConfig, image_size: int) -> TeacherInfo:
    """Levels, parameters and FLOPs of the configured teacher, from its architecture alone: it is built on the
    meta device (no weights read, no memory used) and one pass is counted with torch's FLOP counter.

    Raises:
        ConfigError: `image_size` does not divide by the teacher's total stride.
    """
    with torch.device("meta"):
        teacher = build_teacher(cfg, "meta", load_weights=False)
        teacher.check_image_size(image_size)
        inputs = teacher.cost_inputs(image_size)  # a latent teacher's VAE encoding counts too
        with FlopCounterMode(display=False) as counter:
            teacher.features(*inputs)
    parameters = sum(p.numel() for p in teacher.parameters())  # a latent teacher's VAE included
    path = "" if cfg.weights == "untrained" else cfg.path
    return TeacherInfo(cfg.kind, path, parameters, counter.get_total_flops(), image_size, teacher.levels)

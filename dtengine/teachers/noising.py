"""What the diffusion teachers share: noise clean images to step t, then one frozen network pass that returns
the tapped features, at the teacher's precision.

A subclass provides the network pass (`features`), its total stride and its levels; the rest lives here once.
"""

from __future__ import annotations

import abc
import dataclasses

import torch
from torch import Tensor, nn

from dtengine.levels import TeacherLevel
from dtengine.runtime.device import resolve_precision
from dtengine.runtime.errors import ConfigError, TeacherError
from dtengine.teachers.interface import TeacherOutput

BACKBONE_STRIDES = (4, 8, 16, 32)


def state_dict_mismatch(model: nn.Module, state: dict[str, Tensor]) -> tuple[str, list[str]]:
    """What keeps `state` from loading strictly into `model`: ("" when nothing, else one line naming up to three
    keys per problem; the unexpected keys)."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & state.keys())
        if state[key].shape != expected[key].shape
    ]
    problems = [
        f"{len(found)} {what} (e.g. {', '.join(found[:3])})"
        for what, found in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
        if found
    ]
    return "; ".join(problems), unexpected


class NoisingTeacher(nn.Module, abc.ABC):
    """A frozen diffusion network `unet` read at step `cfg.timestep` of `scheduler`'s forward process.

    Args:
        unet: the network; frozen and kept in eval mode here.
        scheduler: a `diffusers.DDPMScheduler` giving the forward-noising schedule.
        cfg: the teacher config (`TeacherConfig`): step, blocks, precision.
    """

    levels: list[TeacherLevel]

    def __init__(self, unet: nn.Module, scheduler: object, cfg):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.cfg = cfg
        self.train(False)
        steps = scheduler.config.num_train_timesteps if scheduler is not None else None  # None: a GAN
        if steps is not None and not 0 <= cfg.timestep < steps:
            raise TeacherError(f"teacher.timestep {cfg.timestep} out of range for a {steps}-step schedule")

    def resolve_blocks(self, every_level: list[TeacherLevel], count: int, what: str) -> list[int]:
        """`teacher.blocks`, checked against the `count` blocks the network has, or, when unset, the default taps:
        the last block at each stride a backbone has (`BACKBONE_STRIDES`) among `every_level`. `self.cfg` is
        updated to hold them."""
        blocks = self.cfg.blocks
        if blocks is None:
            last = {level.stride: level.block for level in every_level if level.stride in BACKBONE_STRIDES}
            blocks = sorted(last.values())
            if not blocks:
                raise TeacherError(
                    f"no {what} of this teacher has a backbone stride {BACKBONE_STRIDES}; set teacher.blocks"
                )
        bad = [b for b in blocks if not 0 <= b < count]
        if bad:
            raise TeacherError(
                f"teacher.blocks {bad} out of range: this teacher has {count} {what}s (valid: 0..{count - 1})"
            )
        self.cfg = dataclasses.replace(self.cfg, blocks=list(blocks))
        return self.cfg.blocks

    @property
    @abc.abstractmethod
    def total_stride(self) -> int:
        """How much the network downsamples: image sides must be multiples of it for the skips to line up."""

    @abc.abstractmethod
    def features(self, x_t: Tensor, timesteps: Tensor) -> list[Tensor]:
        """One network pass on already-noised images x_t (B, 3, H, W) at steps (B,), with no noise of its own;
        returns the tapped features (what a check against the original implementation compares)."""

    def cost_inputs(self, image_size: int) -> tuple[Tensor, Tensor]:
        """The inputs of `features` for one image, as `teacher-info` counts its FLOPs (on the meta device)."""
        pixels = torch.empty(1, 3, image_size, image_size)
        return self.encode(pixels), torch.full((1,), self.cfg.timestep, dtype=torch.long)

    def encode(self, pixels: Tensor) -> Tensor:
        """Images in [-1, 1] -> what the network diffuses: the pixels themselves here, a latent in latent teachers."""
        return pixels

    def noise_for(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The caller's image-shaped noise for x0 (latent teachers reshape it to the latent's shape)."""
        return noise

    def check_image_size(self, image_size: int, key: str = "data.image_size") -> None:
        """Raises: ConfigError when `image_size` does not divide by `total_stride`."""
        stride = self.total_stride
        if image_size % stride:
            lower, upper = max(stride, image_size - image_size % stride), image_size - image_size % stride + stride
            raise ConfigError(
                f"{key} {image_size} is not a multiple of the teacher's total stride {stride} (its U-Net halves the "
                f"image {stride.bit_length() - 1} times); use e.g. {lower} or {upper}"
            )

    def train(self, mode: bool = True) -> NoisingTeacher:
        # A frozen teacher stays in eval mode even when a parent module is switched to training.
        return super().train(False)

    @property
    def compute_dtype(self) -> torch.dtype:
        return resolve_precision(self.cfg.precision, next(self.unet.parameters()).device)

    @torch.no_grad()
    def forward(self, images: Tensor, noise: Tensor | None = None) -> TeacherOutput:
        """Noise-encode `images` at step t and read the requested features.

        Fresh noise for every call is the paper's stochastic DDPM encoding (it beats DDIM inversion). The caller
        normally draws it (the `Distiller` keys it by sample); without it, it comes from torch's global generator.

        Args:
            images: clean images in [0, 1], (B, 3, H, W).
            noise: standard-normal noise of the images' shape, or None.
        Returns:
            TeacherOutput(images, features): the same images (what the student sees) and one map per level,
            features[i] of shape (B, levels[i].channels, H / levels[i].stride, W / levels[i].stride).
        """
        pixels = images.float() * 2 - 1  # diffusion models are trained on [-1, 1]
        timesteps = torch.full((pixels.shape[0],), self.cfg.timestep, device=pixels.device, dtype=torch.long)
        dtype = self.compute_dtype
        with torch.autocast(device_type=pixels.device.type, dtype=dtype, enabled=dtype != torch.float32):
            x0 = self.encode(pixels)
            noise = torch.randn_like(x0) if noise is None else self.noise_for(x0, noise.float())
            noisy = self.scheduler.add_noise(x0, noise.to(x0.dtype), timesteps)
            features = self.features(noisy, timesteps)
        return TeacherOutput(images=images, features=features)

"""The teacher section of a run config: which generative model, which of its blocks, at which step t."""

from __future__ import annotations

from dataclasses import dataclass, field

from dtengine.runtime.device import PRECISIONS
from dtengine.runtime.errors import ConfigError
from dtengine.teachers.adm import ADMConfig

TEACHER_KINDS = ("unet", "adm")
FEATURE_POINTS = ("before_upsample", "after_upsample")
WEIGHTS = ("trained", "untrained")
ATTENTION_IMPLEMENTATIONS = ("dtengine", "diffusers")


@dataclass
class TeacherConfig:
    """The generative teacher whose features the student learns to predict."""

    kind: str = "unet"
    """"unet": a diffusers `UNet2DModel` folder; "adm": a guided-diffusion checkpoint (the paper's teacher)."""
    path: str = "builtin"
    """unet: a local diffusers directory, either a pipeline folder with `unet/` (and optionally `scheduler/`) or a
    bare `UNet2DModel` folder; "builtin" is the small DDPM shipped with dtengine, trained on the built-in shapes.
    adm: the checkpoint file (e.g. 256x256_diffusion_uncond.pt)."""
    timestep: int = 50
    """Diffusion step t the real image is noised to before the single U-Net pass (paper: 150 ImageNet, 50 LSUN)."""
    blocks: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Decoder blocks to read, 0-based from the deepest. unet: indices of diffusers' `up_blocks`; adm: indices of
    guided-diffusion's `output_blocks` (num_res_blocks + 1 of them per resolution)."""
    feature_point: str = "before_upsample"
    """Read a block's output before its upsampler (at the block's own resolution) or after it."""
    precision: str = "auto"
    """"auto": bf16 on a CUDA device that supports it, fp32 elsewhere; or force "fp32" / "bf16"."""
    weights: str = "trained"
    """"trained": the weights in `path`. "untrained": the same architecture with its library's random
    initialisation (seeded by `untrained_seed`; adm needs no checkpoint then): the control run that shows
    whether the teacher's training is what the student learns from."""
    untrained_seed: int = 0
    attention: str = "dtengine"
    """Self-attention implementation: "dtengine" routes it through `dtengine.ops.attention` (Triton on CUDA,
    SDPA otherwise; DTENGINE_ATTENTION_BACKEND forces one), "diffusers" keeps diffusers' default processor
    (unet only: an adm teacher always runs dtengine's)."""
    adm: ADMConfig = field(default_factory=ADMConfig)
    """kind=adm: guided-diffusion's model flags, or a preset of them."""

    def __post_init__(self) -> None:
        if self.kind not in TEACHER_KINDS:
            raise ConfigError(f"teacher.kind must be one of {TEACHER_KINDS}, got {self.kind!r}")
        if self.kind == "adm" and self.attention != "dtengine":
            raise ConfigError("teacher.attention=diffusers applies to kind=unet only; an adm teacher runs dtengine's")
        if self.feature_point not in FEATURE_POINTS:
            raise ConfigError(f"teacher.feature_point must be one of {FEATURE_POINTS}, got {self.feature_point!r}")
        if self.weights not in WEIGHTS:
            raise ConfigError(f"teacher.weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"teacher.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"teacher.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
        if not self.blocks:
            raise ConfigError("teacher.blocks is empty; list at least one decoder block index, e.g. [0, 1, 2]")
        if sorted(set(self.blocks)) != list(self.blocks):
            raise ConfigError(f"teacher.blocks must be strictly increasing, got {list(self.blocks)}")

"""The teacher section of a run config: which generative model, which of its blocks, at which step t."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dtengine.runtime.device import PRECISIONS
from dtengine.runtime.errors import ConfigError
from dtengine.teachers.adm import ADMConfig

TEACHER_KINDS = ("unet", "adm", "latent_unet", "dit", "gan")
FEATURE_POINTS = ("before_upsample", "after_upsample")
WEIGHTS = ("trained", "untrained")
ATTENTION_IMPLEMENTATIONS = ("dtengine", "diffusers")


@dataclass
class LatentUNetConfig:
    """kind=latent_unet: how the U-Net is conditioned."""

    prompt_embedding: str = "auto"
    """"auto": the empty prompt's text embedding, read from `<path>/empty_prompt_embedding.safetensors`, or
    computed once from the folder's `text_encoder/` + `tokenizer/` (needs `transformers`) and stored there (or in
    dtengine's cache when the folder is read-only). "zeros": an all-zero embedding; only on request, since it
    is not what the U-Net was trained with and silently degrades its features. Or a path to a safetensors file
    holding `embedding` (1, tokens, cross_attention_dim)."""


@dataclass
class DiTConfig:
    """kind=dit: how the transformer is conditioned."""

    class_label: int = -1
    """Class label given to every image; -1 = the null (unconditional) class DiT was trained with."""


@dataclass
class GANConfig:
    """kind=gan: which generator, and which of its modules are read."""

    generator: str = "dtengine.teachers.gan:TinyGenerator"
    """The generator class as `module:Class`; it takes z (B, z_dim), returns images in [-1, 1] and has `z_dim`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of the generator class."""
    taps: list[str] = field(default_factory=list)
    """Names of the generator's submodules whose outputs are the features (empty: the class's `feature_taps`);
    `teacher.blocks` index this list."""


@dataclass
class TeacherConfig:
    """The generative teacher whose features the student learns to predict."""

    kind: str = "unet"
    """"unet": a diffusers `UNet2DModel` folder; "adm": a guided-diffusion checkpoint (the paper's teacher);
    "latent_unet": a Stable-Diffusion-style pipeline folder (vae/, unet/); "dit": a DiT pipeline folder (vae/,
    transformer/); "gan": a generator (`teacher.gan.*`) whose own images the student trains on (no dataset)."""
    path: str = "builtin"
    """unet: a local diffusers directory, either a pipeline folder with `unet/` (and optionally `scheduler/`) or a
    bare `UNet2DModel` folder; "builtin" is the small DDPM shipped with dtengine, trained on the built-in shapes.
    adm: the checkpoint file (e.g. 256x256_diffusion_uncond.pt). latent_unet / dit: the pipeline folder. gan: the
    generator's weights (safetensors)."""
    timestep: int = 50
    """Diffusion step t the real image is noised to before the single U-Net pass (paper: 150 ImageNet, 50 LSUN)."""
    blocks: list[int] | None = None
    """Decoder blocks to read, 0-based from the deepest. unet: indices of diffusers' `up_blocks`; adm: indices of
    guided-diffusion's `output_blocks` (num_res_blocks + 1 of them per resolution); latent_unet: `up_blocks`;
    dit: transformer blocks (0 = the first; every one at the same stride). Unset: the kind's default taps, the
    last block at each stride a backbone has (4, 8, 16, 32; for dit four blocks spread over the depth)."""
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
    (diffusers kinds: an adm teacher always runs dtengine's)."""
    adm: ADMConfig = field(default_factory=ADMConfig)
    """kind=adm: guided-diffusion's model flags, or a preset of them."""
    latent_unet: LatentUNetConfig = field(default_factory=LatentUNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    gan: GANConfig = field(default_factory=GANConfig)

    def __post_init__(self) -> None:
        if self.kind not in TEACHER_KINDS:
            raise ConfigError(f"teacher.kind must be one of {TEACHER_KINDS}, got {self.kind!r}")
        if self.kind == "adm" and self.attention != "dtengine":
            raise ConfigError("teacher.attention=diffusers applies to diffusers models; an adm teacher runs dtengine's")
        if self.feature_point not in FEATURE_POINTS:
            raise ConfigError(f"teacher.feature_point must be one of {FEATURE_POINTS}, got {self.feature_point!r}")
        if self.weights not in WEIGHTS:
            raise ConfigError(f"teacher.weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"teacher.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"teacher.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
        if self.blocks is None:
            return
        if not self.blocks:
            raise ConfigError("teacher.blocks is empty; list at least one decoder block index, e.g. [0, 1, 2]")
        if sorted(set(self.blocks)) != list(self.blocks):
            raise ConfigError(f"teacher.blocks must be strictly increasing, got {list(self.blocks)}")

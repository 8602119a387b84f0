"""Diffusion teacher: noise-encode real images at step t, run one U-Net pass, return decoder features.

The feature path is an explicit re-statement of `diffusers.UNet2DModel.forward` that stops after the last
requested up (decoder) block: the remaining decoder blocks and the output head are never run, and no hooks
sit in the hot path (hooks and `torch.compile` mix badly). Tests check it against a hooked full forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dtengine.levels import TeacherLevel
from dtengine.runtime.device import PRECISIONS, resolve_precision, seeded
from dtengine.runtime.errors import ConfigError, TeacherError
from dtengine.teachers.attention_processor import ATTENTION_IMPLEMENTATIONS, use_dtengine_attention
from dtengine.teachers.interface import TeacherOutput

FEATURE_POINTS = ("before_upsample", "after_upsample")
WEIGHTS = ("trained", "untrained")
BUILTIN_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "teacher-shapes64"
SUPPORTED_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")


@dataclass
class TeacherConfig:
    """The generative teacher whose features the student learns to predict."""

    path: str = "builtin"
    """Local diffusers directory: a pipeline folder with `unet/` (and optionally `scheduler/`), or a bare
    `UNet2DModel` folder. "builtin" is the small DDPM shipped with dtengine, trained on the built-in shapes."""
    timestep: int = 50
    """Diffusion step t the real image is noised to before the single U-Net pass (paper: 150 ImageNet, 50 LSUN)."""
    blocks: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Indices of the U-Net up blocks to read, 0 = the deepest (lowest resolution) decoder block."""
    feature_point: str = "before_upsample"
    """Read a block's output before its upsampler (at the block's own resolution) or after it."""
    precision: str = "auto"
    """"auto": bf16 on a CUDA device that supports it, fp32 elsewhere; or force "fp32" / "bf16"."""
    weights: str = "trained"
    """"trained": the weights in `path`. "untrained": the same architecture with diffusers' random initialisation
    (seeded by `untrained_seed`): the control run that shows whether the teacher's training is what the student
    learns from."""
    untrained_seed: int = 0
    attention: str = "dtengine"
    """Self-attention implementation: "dtengine" routes it through `dtengine.ops.attention` (Triton on CUDA,
    SDPA otherwise; DTENGINE_ATTENTION_BACKEND forces one), "diffusers" keeps diffusers' default processor."""

    def __post_init__(self) -> None:
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


def resolve_teacher_path(path: str) -> Path:
    return BUILTIN_TEACHER if path == "builtin" else Path(path).expanduser()


def load_diffusion_components(path: str) -> tuple[nn.Module, object]:
    """Load (UNet2DModel, DDPMScheduler) from a local folder, offline; errors name the folder and the fix."""
    from diffusers import DDPMScheduler, UNet2DModel

    root = resolve_teacher_path(path)
    if not root.is_dir():
        raise TeacherError(
            f"teacher directory '{root}' does not exist; set teacher.path to a local diffusers folder "
            "(e.g. one written by `dtengine train-teacher --out DIR`)"
        )
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    config_file = unet_dir / "config.json"
    if not config_file.is_file():
        raise TeacherError(
            f"teacher directory '{root}' is not a diffusers model (no config.json or unet/config.json); "
            "point teacher.path at a folder saved with `save_pretrained`"
        )
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, OSError) as err:
        raise TeacherError(f"teacher config '{config_file}' is unreadable ({err}); re-save the teacher") from err
    if class_name != "UNet2DModel":
        raise TeacherError(
            f"teacher '{root}' holds a {class_name or 'non-diffusers model'}, but only diffusers UNet2DModel "
            "(pixel-space DDPM) teachers are supported so far"
        )
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TeacherError(f"cannot load teacher weights from '{unet_dir}': {first_line}") from err
    scheduler_dir = root / "scheduler"
    if (scheduler_dir / "scheduler_config.json").is_file():
        scheduler = DDPMScheduler.from_pretrained(scheduler_dir, local_files_only=True)
    else:  # the DDPM default: 1000 steps, linear betas, as in the paper's ADM teachers
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    return unet, scheduler


class DiffusionTeacher(nn.Module):
    """Frozen diffusers `UNet2DModel` that maps clean images to multi-scale decoder features.

    Args:
        unet: a `diffusers.UNet2DModel` (unconditional, up blocks of type UpBlock2D / AttnUpBlock2D).
        scheduler: a `diffusers.DDPMScheduler` giving the forward-noising schedule.
        cfg: which blocks to read, at which step and precision.
    """

    def __init__(self, unet: nn.Module, scheduler: object, cfg: TeacherConfig):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.cfg = cfg
        self._check(unet, scheduler, cfg)
        if cfg.attention == "dtengine":
            use_dtengine_attention(self.unet)
        self.levels = self._describe_levels()
        self.last_block = max(cfg.blocks)
        self.train(False)

    @staticmethod
    def _check(unet: nn.Module, scheduler: object, cfg: TeacherConfig) -> None:
        n_up = len(unet.up_blocks)
        bad = [b for b in cfg.blocks if not 0 <= b < n_up]
        if bad:
            raise TeacherError(
                f"teacher.blocks {bad} out of range: this U-Net has {n_up} up blocks (valid: 0..{n_up - 1})"
            )
        for index, block in enumerate(unet.up_blocks[: max(cfg.blocks) + 1]):
            kind = type(block).__name__
            if kind not in SUPPORTED_UP_BLOCKS:
                raise TeacherError(f"teacher up block {index} is a {kind}; supported: {SUPPORTED_UP_BLOCKS}")
        if any(hasattr(block, "skip_conv") for block in unet.down_blocks):
            raise TeacherError("U-Nets with skip down blocks (SkipDownBlock2D) are not supported as teachers")
        if unet.class_embedding is not None:
            raise TeacherError("class-conditional U-Nets are not supported as teachers yet; use an unconditional one")
        steps = scheduler.config.num_train_timesteps
        if not 0 <= cfg.timestep < steps:
            raise TeacherError(f"teacher.timestep {cfg.timestep} out of range for a {steps}-step schedule")

    @property
    def total_stride(self) -> int:
        """How much the U-Net downsamples: image sides must be multiples of it for the skips to line up."""
        return 2 ** sum(block.downsamplers is not None for block in self.unet.down_blocks)

    def check_image_size(self, image_size: int, key: str = "data.image_size") -> None:
        """Raises: ConfigError when `image_size` does not divide by `total_stride`."""
        stride = self.total_stride
        if image_size % stride:
            lower, upper = max(stride, image_size - image_size % stride), image_size - image_size % stride + stride
            raise ConfigError(
                f"{key} {image_size} is not a multiple of the teacher's total stride {stride} (its U-Net halves the "
                f"image {stride.bit_length() - 1} times); use e.g. {lower} or {upper}"
            )

    def _describe_levels(self) -> list[TeacherLevel]:
        # Strides follow from the sampler counts alone, so a big teacher needs no dry run to describe itself.
        n_down = self.total_stride.bit_length() - 1
        levels, ups_before = [], 0
        for index, block in enumerate(self.unet.up_blocks):
            has_up = block.upsamplers is not None
            stride = 2 ** (n_down - ups_before)
            if self.cfg.feature_point == "after_upsample" and has_up:
                stride //= 2
            if index in self.cfg.blocks:
                levels.append(TeacherLevel(block=index, stride=stride, channels=block.resnets[-1].out_channels))
            ups_before += has_up
        return levels

    def train(self, mode: bool = True) -> DiffusionTeacher:
        # A frozen teacher stays in eval mode even when a parent module is switched to training.
        return super().train(False)

    @property
    def compute_dtype(self) -> torch.dtype:
        return resolve_precision(self.cfg.precision, next(self.unet.parameters()).device)

    @torch.no_grad()
    def forward(self, images: Tensor, noise: Tensor | None = None) -> TeacherOutput:
        """Noise-encode `images` at step t and read the requested decoder features.

        Fresh noise for every call is the paper's stochastic DDPM encoding (it beats DDIM inversion). The caller
        normally draws it (the `Distiller` keys it by sample); without it, it comes from torch's global generator.

        Args:
            images: clean images in [0, 1], (B, 3, H, W).
            noise: standard-normal noise of the images' shape, or None.
        Returns:
            TeacherOutput(images, features): the same images (what the student sees) and one map per level,
            features[i] of shape (B, levels[i].channels, H / levels[i].stride, W / levels[i].stride).
        """
        x0 = images.float() * 2 - 1  # DDPMs are trained on [-1, 1]
        timesteps = torch.full((x0.shape[0],), self.cfg.timestep, device=x0.device, dtype=torch.long)
        noise = torch.randn_like(x0) if noise is None else noise
        noisy = self.scheduler.add_noise(x0, noise.to(x0.dtype), timesteps)
        dtype = self.compute_dtype
        with torch.autocast(device_type=x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
            features = self.decoder_features(noisy, timesteps)
        return TeacherOutput(images=images, features=features)

    def decoder_features(self, sample: Tensor, timesteps: Tensor) -> list[Tensor]:
        """`UNet2DModel.forward` up to the last requested up block; returns that block set's features."""
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        t_emb = unet.time_proj(timesteps).to(dtype=unet.dtype)
        emb = unet.time_embedding(t_emb)

        sample = unet.conv_in(sample)
        skips: tuple[Tensor, ...] = (sample,)
        for down_block in unet.down_blocks:
            sample, res_samples = down_block(hidden_states=sample, temb=emb)
            skips += res_samples
        if unet.mid_block is not None:
            sample = unet.mid_block(sample, emb)

        wanted = set(self.cfg.blocks)
        features = []
        for index, up_block in enumerate(unet.up_blocks[: self.last_block + 1]):
            n_res = len(up_block.resnets)
            res_samples, skips = skips[-n_res:], skips[:-n_res]
            before, sample = _up_block_forward(up_block, sample, res_samples, emb)
            if index in wanted:
                features.append(before if self.cfg.feature_point == "before_upsample" else sample)
        return features


def _up_block_forward(block: nn.Module, hidden: Tensor, res_samples: tuple[Tensor, ...], temb: Tensor):
    """Run an UpBlock2D / AttnUpBlock2D, returning (output before upsampling, output after upsampling)."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for resnet, attn in zip(block.resnets, attentions):
        hidden = torch.cat([hidden, res_samples[-1]], dim=1)
        res_samples = res_samples[:-1]
        hidden = resnet(hidden, temb)
        if attn is not None:
            hidden = attn(hidden)
    before = hidden
    for upsampler in block.upsamplers or []:
        if getattr(block, "upsample_type", "conv") == "resnet":
            hidden = upsampler(hidden, temb=temb)
        else:
            hidden = upsampler(hidden)
    return before, hidden


def build_diffusion_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> DiffusionTeacher:
    """The frozen teacher `cfg` describes, on `device`."""
    unet, scheduler = load_diffusion_components(cfg.path)
    if cfg.weights == "untrained":
        unet = untrained_copy(unet, cfg.untrained_seed)
    return DiffusionTeacher(unet, scheduler, cfg).to(device)


def untrained_copy(unet: nn.Module, seed: int) -> nn.Module:
    """A freshly initialised `UNet2DModel` of `unet`'s architecture, drawn under `torch.manual_seed(seed)`."""
    with seeded(seed):
        return type(unet).from_config(unet.config)

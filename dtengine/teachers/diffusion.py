"""The diffusers teacher (kind "unet"): noise-encode real images at step t, one U-Net pass, decoder features.

The feature path is an explicit re-statement of `diffusers.UNet2DModel.forward` that stops after the last
requested up (decoder) block: the remaining decoder blocks and the output head are never run, and no hooks
sit in the hot path (hooks and `torch.compile` mix badly). Tests check it against a hooked full forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from dtengine.levels import TeacherLevel
from dtengine.runtime.device import seeded
from dtengine.runtime.errors import TeacherError
from dtengine.teachers.attention_processor import use_dtengine_attention
from dtengine.teachers.config import TeacherConfig
from dtengine.teachers.noising import NoisingTeacher

BUILTIN_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "teacher-shapes64"
SUPPORTED_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")


def resolve_teacher_path(path: str) -> Path:
    return BUILTIN_TEACHER if path == "builtin" else Path(path).expanduser()


def load_diffusion_components(path: str, load_weights: bool = True) -> tuple[nn.Module, object]:
    """Load (UNet2DModel, DDPMScheduler) from a local folder, offline; errors name the folder and the fix.

    load_weights=False builds the U-Net from its config.json alone (randomly initialised; on the meta device it
    costs nothing), for describing a teacher without reading its weights."""
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
        if not load_weights:
            unet = UNet2DModel.from_config(UNet2DModel.load_config(unet_dir))
        else:
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


class DiffusionTeacher(NoisingTeacher):
    """Frozen diffusers `UNet2DModel` that maps clean images to multi-scale decoder features.

    Args:
        unet: a `diffusers.UNet2DModel` (unconditional, up blocks of type UpBlock2D / AttnUpBlock2D).
        scheduler: a `diffusers.DDPMScheduler` giving the forward-noising schedule.
        cfg: which blocks to read, at which step and precision.
    """

    def __init__(self, unet: nn.Module, scheduler: object, cfg: TeacherConfig):
        super().__init__(unet, scheduler, cfg)
        count = len(unet.up_blocks)
        blocks = self.resolve_blocks(unet_levels(unet, range(count), cfg.feature_point), count, "up block")
        self._check(unet, self.cfg)
        if cfg.attention == "dtengine":
            use_dtengine_attention(self.unet)
        self.levels = unet_levels(unet, blocks, cfg.feature_point)

    @staticmethod
    def _check(unet: nn.Module, cfg: TeacherConfig) -> None:
        for index, block in enumerate(unet.up_blocks[: max(cfg.blocks) + 1]):
            kind = type(block).__name__
            if kind not in SUPPORTED_UP_BLOCKS:
                raise TeacherError(f"teacher up block {index} is a {kind}; supported: {SUPPORTED_UP_BLOCKS}")
        if any(hasattr(block, "skip_conv") for block in unet.down_blocks):
            raise TeacherError("U-Nets with skip down blocks (SkipDownBlock2D) are not supported as teachers")
        if unet.class_embedding is not None:
            raise TeacherError("class-conditional U-Nets are not supported as teachers yet; use an unconditional one")

    @property
    def total_stride(self) -> int:
        return 2 ** sum(block.downsamplers is not None for block in self.unet.down_blocks)

    def features(self, x_t: Tensor, timesteps: Tensor) -> list[Tensor]:
        """`UNet2DModel.forward` up to the last requested up block; returns that block set's features."""
        unet, sample = self.unet, x_t
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

        return decoder_taps(unet, sample, skips, emb, self.cfg.blocks, self.cfg.feature_point)


def unet_levels(unet: nn.Module, blocks, feature_point: str, base_stride: int = 1) -> list[TeacherLevel]:
    """The levels of a diffusers U-Net's up blocks `blocks`; `base_stride` is how much the U-Net's input is
    already downsampled (a latent U-Net's VAE). Strides follow from the sampler counts alone, so a big teacher
    needs no dry run to describe itself."""
    n_down = sum(block.downsamplers is not None for block in unet.down_blocks)
    levels, ups_before = [], 0
    for index, block in enumerate(unet.up_blocks):
        has_up = block.upsamplers is not None
        stride = base_stride * 2 ** (n_down - ups_before)
        if feature_point == "after_upsample" and has_up:
            stride //= 2
        if index in blocks:
            levels.append(TeacherLevel(block=index, stride=stride, channels=block.resnets[-1].out_channels))
        ups_before += has_up
    return levels


def decoder_taps(unet, sample: Tensor, skips: tuple[Tensor, ...], temb: Tensor, blocks, feature_point: str,
                 context: Tensor | None = None) -> list[Tensor]:  # fmt: skip
    """The up-block half of a diffusers U-Net forward, up to the last of `blocks`; returns their features.

    Args:
        sample, skips: the mid block's output and the down path's skip tensors.
        context: the cross-attention states of a conditional U-Net (None for `UNet2DModel`).
    """
    wanted, features = set(blocks), []
    for index, block in enumerate(unet.up_blocks[: max(blocks) + 1]):
        n_res = len(block.resnets)
        res_samples, skips = skips[-n_res:], skips[:-n_res]
        before, sample = up_block_forward(block, sample, res_samples, temb, context)
        if index in wanted:
            features.append(before if feature_point == "before_upsample" else sample)
    return features


def up_block_forward(
    block: nn.Module, hidden: Tensor, res_samples: tuple[Tensor, ...], temb: Tensor, context: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Run an UpBlock2D / AttnUpBlock2D / CrossAttnUpBlock2D, returning (output before upsampling, after it)."""
    cross = getattr(block, "has_cross_attention", False)
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for resnet, attn in zip(block.resnets, attentions):
        hidden = torch.cat([hidden, res_samples[-1]], dim=1)
        res_samples = res_samples[:-1]
        hidden = resnet(hidden, temb)
        if attn is not None:
            hidden = attn(hidden, encoder_hidden_states=context, return_dict=False)[0] if cross else attn(hidden)
    before = hidden
    for upsampler in block.upsamplers or []:
        if getattr(block, "upsample_type", "conv") == "resnet":
            hidden = upsampler(hidden, temb=temb)
        else:
            hidden = upsampler(hidden)
    return before, hidden


def build_diffusion_teacher(
    cfg: TeacherConfig, device: torch.device | str = "cpu", load_weights: bool = True
) -> DiffusionTeacher:
    """The frozen teacher `cfg` describes, on `device` (load_weights: see `load_diffusion_components`)."""
    unet, scheduler = load_diffusion_components(cfg.path, load_weights)
    if cfg.weights == "untrained":
        unet = untrained_copy(unet, cfg.untrained_seed)
    return DiffusionTeacher(unet, scheduler, cfg).to(device)


def untrained_copy(unet: nn.Module, seed: int) -> nn.Module:
    """A freshly initialised `UNet2DModel` of `unet`'s architecture, drawn under `torch.manual_seed(seed)`."""
    with seeded(seed):
        return type(unet).from_config(unet.config)

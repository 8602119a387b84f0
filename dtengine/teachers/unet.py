"""The pixel-space DDPM U-Net that `dtengine train-teacher` trains and the teacher loads: architecture and saving.

A teacher folder is what `DDPMPipeline.save_pretrained` writes (unet/, scheduler/, model_index.json), which is
exactly what `teacher.path` loads.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dtengine.runtime.errors import ConfigError


@dataclass
class UNetArchConfig:
    """Architecture of the DDPM's `UNet2DModel`."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64, 128, 128])
    """Channels per resolution level, finest first; each level but the last halves the resolution."""
    layers_per_block: int = 1
    attention_levels: int = 2
    """Self-attention in this many of the coarsest levels (ADM: at 32, 16 and 8 px of 256)."""
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    resnet_resample: bool = False
    """Down- and upsample with residual blocks, as ADM does (resblock_updown), instead of strided / nearest convs."""

    def __post_init__(self) -> None:
        if not 0 <= self.attention_levels <= len(self.block_out_channels):
            raise ConfigError("model.attention_levels must be between 0 and len(model.block_out_channels)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError("model.block_out_channels must all be divisible by model.norm_num_groups")


def build_unet(image_size: int, arch: UNetArchConfig):
    from diffusers import UNet2DModel

    n = len(arch.block_out_channels)
    attn = [i >= n - arch.attention_levels for i in range(n)]
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=arch.layers_per_block,
        block_out_channels=tuple(arch.block_out_channels),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.norm_num_groups,
        downsample_type="resnet" if arch.resnet_resample else "conv",
        upsample_type="resnet" if arch.resnet_resample else "conv",
    )


def save_teacher_pipeline(unet, scheduler, out_dir: Path) -> None:
    """Write unet/, scheduler/ and model_index.json into out_dir, each moved into place by one rename."""
    from diffusers import DDPMPipeline

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".saving-") as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        for name in ("unet", "scheduler", "model_index.json"):
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            Path(tmp, name).replace(target)

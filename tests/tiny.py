"""Sizes and architectures of the tiny models the tests build (importable from any test module)."""

from __future__ import annotations

TINY_IMAGE = 32


def tiny_unet_arch(attention_levels: int = 1):
    from dtengine.teachers.unet import UNetArchConfig

    # 4 levels at 32 px: up blocks read before upsampling sit at strides 8, 4, 2, 1.
    return UNetArchConfig(
        block_out_channels=[16, 16, 32, 32], attention_levels=attention_levels, attention_head_dim=8, norm_num_groups=8
    )

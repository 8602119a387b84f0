"""Flash-style attention kernels (forward + backward) and the configurations they ship with."""

from dtkernels.attention.configs import (
    CONFIGS,
    HEAD_DIMS,
    MAX_HEAD_DIM,
    configs_for,
    forward_config,
    head_dim_chunks,
    padded_head_dim,
)
from dtkernels.attention.flash import attention_backward, attention_forward

__all__ = [
    "CONFIGS",
    "HEAD_DIMS",
    "MAX_HEAD_DIM",
    "attention_backward",
    "attention_forward",
    "configs_for",
    "forward_config",
    "head_dim_chunks",
    "padded_head_dim",
]

"""Device, precision and memory-format choices, resolved once from config."""

from __future__ import annotations

import contextlib

import torch

from dtengine.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device '{name}' requested but CUDA is not available; use train.device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"train.device '{name}' is not a torch device (use auto, cpu or cuda[:N])") from err


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for the student on CUDA with bf16 support ("auto"), never on CPU unless forced."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(device: torch.device) -> bool:
    # Tensor cores want NHWC; on CPU it buys nothing for these models.
    return device.type == "cuda"

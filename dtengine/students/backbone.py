"""The student backbone: any timm model, as a `features_only` multi-scale feature extractor."""

from __future__ import annotations

import difflib

import timm
import torch
from torch import Tensor, nn

from dtengine.runtime.errors import StudentError


def create_backbone(model_name: str) -> nn.Module:
    """Build `timm.create_model(model_name, features_only=True)` with random weights, offline.

    Raises:
        StudentError: the name is not a timm model (the message suggests the closest names).
    """
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()` for valid names"
        raise StudentError(f"student.model '{model_name}' is not a timm model{hint}")
    try:
        return timm.create_model(model_name, pretrained=False, features_only=True)
    except (RuntimeError, AssertionError, TypeError) as err:
        raise StudentError(f"timm model '{model_name}' cannot be built as a feature extractor: {err}") from err


class InputNormalization(nn.Module):
    """(x - mean) / std with the mean and std the timm model expects its [0, 1] input normalised with.

    The buffers are not persistent: they follow from the model's pretrained_cfg, so checkpoints do not hold them.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), False)

    def forward(self, images: Tensor) -> Tensor:  # (B, 3, H, W) in [0, 1] -> normalised
        return (images - self.mean) / self.std

"""Feature interpreter: a small segmentation head on the frozen teacher's multi-level features (paper, label
distillation), plus saving and loading it next to a JSON of its configuration.

    per level: 1x1 conv C_l -> channels, bilinear upsample to the fuse resolution
    concat (L * channels) -> depthwise 3x3 -> pointwise 1x1 -> channels -> GroupNorm(32) -> Swish -> dropout
    -> 1x1 conv -> K class logits

The fuse resolution is image / `output_stride` (default: the finest teacher level's stride).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor, nn

from dtengine.levels import TeacherLevel, describe_levels
from dtengine.runtime.errors import CheckpointError
from dtengine.runtime.io import atomic_write

WEIGHTS_FILE = "interpreter.safetensors"
CONFIG_FILE = "interpreter.json"


class FeatureInterpreter(nn.Module):
    """Teacher features -> per-pixel class logits.

    Args:
        levels: the teacher levels it reads (block, stride, channels), in the teacher's order.
        num_classes: K.
        channels: width after fusion (paper: 256); GroupNorm uses 32 groups, so a multiple of 32.
        dropout: before the logits (paper: 0.1).
        output_stride: input pixels per output pixel; 0 = the finest level's stride.
    """

    def __init__(
        self,
        levels: Sequence[TeacherLevel],
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        output_stride: int = 0,
    ):
        super().__init__()
        self.levels = list(levels)
        self.num_classes, self.channels, self.dropout_p = num_classes, channels, dropout
        self.finest_stride = min(level.stride for level in self.levels)
        self.output_stride = output_stride or self.finest_stride
        self.lateral = nn.ModuleList(nn.Conv2d(level.channels, channels, 1) for level in self.levels)
        fused = len(self.levels) * channels
        self.depthwise = nn.Conv2d(fused, fused, 3, padding=1, groups=fused, bias=False)
        self.pointwise = nn.Conv2d(fused, channels, 1, bias=False)
        self.norm = nn.GroupNorm(32, channels)
        self.act = nn.SiLU()  # Swish
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def fuse_size(self, features: Sequence[Tensor]) -> tuple[int, int]:
        """(H, W) of the fused map: the finest level's size scaled from its stride to `output_stride`."""
        finest = min(range(len(self.levels)), key=lambda i: self.levels[i].stride)
        h, w = features[finest].shape[-2:]
        scale = self.levels[finest].stride / self.output_stride
        return round(h * scale), round(w * scale)

    def forward(self, features: Sequence[Tensor], out_size: Sequence[int] | None = None) -> Tensor:
        """Args: one (B, C_l, H_l, W_l) map per level; optional (H, W) to resize the logits to (e.g. the labels').

        Returns: (B, K, H_out, W_out) fp32 logits, at `fuse_size` unless `out_size` is given.
        """
        size = self.fuse_size(features)
        maps = []
        for lateral, feature in zip(self.lateral, features):
            x = lateral(feature.float())  # (B, channels, H_l, W_l)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            maps.append(x)
        x = self.pointwise(self.depthwise(torch.cat(maps, dim=1)))  # (B, channels, H, W)
        logits = self.classifier(self.dropout(self.act(self.norm(x))))  # (B, K, H, W)
        if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits

    def describe(self) -> dict[str, Any]:
        """What `load_interpreter` needs to rebuild it, and what it must match."""
        return {
            "num_classes": self.num_classes,
            "channels": self.channels,
            "dropout": self.dropout_p,
            "output_stride": self.output_stride,
            "teacher_levels": describe_levels(self.levels),
        }


def save_interpreter(interpreter: FeatureInterpreter, out_dir: Path, extra: dict[str, Any]) -> Path:
    """Write interpreter.safetensors and interpreter.json (its `describe()` + `extra`) into out_dir, each atomically.

    Returns the weights' path.
    """

    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in interpreter.state_dict().items()}
    weights = out_dir / WEIGHTS_FILE
    atomic_write(weights, save(state))
    text = json.dumps({**interpreter.describe(), **extra}, indent=2) + "\n"
    atomic_write(out_dir / CONFIG_FILE, text)
    return weights


def load_interpreter(
    path: str | Path, teacher_levels: Sequence[TeacherLevel], device: torch.device | str = "cpu"
) -> FeatureInterpreter:
    """Load a saved interpreter for a teacher with `teacher_levels`; frozen, in eval mode.

    Args:
        path: the folder `dtengine train-interpreter` wrote, or its interpreter.safetensors.
    Raises:
        CheckpointError: files missing or unreadable, or written for other teacher levels.
    """
    path = Path(path).expanduser()
    folder = path.parent if path.suffix == ".safetensors" else path
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    for needed in (weights, config):
        if not needed.is_file():
            raise CheckpointError(
                f"interpreter file '{needed}' does not exist; pass a folder written by `dtengine train-interpreter`"
            )
    try:
        info = json.loads(config.read_text())
        state = load_file(str(weights))
    except Exception as err:  # json / safetensors raise several kinds for truncated or foreign files
        raise CheckpointError(f"interpreter in '{folder}' is unreadable ({type(err).__name__}); retrain it") from err
    want = describe_levels(teacher_levels)
    if info.get("teacher_levels") != want:
        raise CheckpointError(
            f"interpreter '{folder}' was trained on teacher levels {info.get('teacher_levels')} ([block, stride, "
            f"channels]), but this teacher gives {want}; use the same teacher.blocks or retrain the interpreter"
        )
    interpreter = FeatureInterpreter(
        teacher_levels, info["num_classes"], info["channels"], info["dropout"], info["output_stride"]
    )
    try:
        interpreter.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"interpreter weights in '{folder}' do not match interpreter.json; retrain it") from err
    return interpreter.to(device).eval().requires_grad_(False)

"""The distillation student: timm backbone + feature regressor, with levels matched to the teacher by stride."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import Tensor, nn

from dtengine.levels import TeacherLevel
from dtengine.runtime.errors import ConfigError, StudentError
from dtengine.students.backbone import InputNormalization, create_backbone
from dtengine.students.logit_head import LogitHead
from dtengine.students.regressor import FeatureRegressor


@dataclass
class StudentConfig:
    """The backbone being pretrained and the regressor head used only during distillation."""

    model: str = "resnet18"
    """Any timm model name that supports `features_only` (e.g. resnet18 for the demo, resnet50, convnext_base)."""
    regressor_channels: int = 256
    """FPN width of the feature regressor (paper: 256)."""
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    """Pyramid pooling scales on the last stage (paper: 1, 2, 3, 6)."""

    def __post_init__(self) -> None:
        if self.regressor_channels <= 0:
            raise ConfigError(f"student.regressor_channels must be positive, got {self.regressor_channels}")
        if not self.pool_scales or min(self.pool_scales) <= 0:
            raise ConfigError(f"student.pool_scales must be positive integers, got {list(self.pool_scales)}")


class StudentOutput(NamedTuple):
    features: list[Tensor]  # one (B, C_l, H_l, W_l) prediction per teacher level; [] without projections
    logits: Tensor | None  # (B, K, H / s, W / s) class logits at the finest FPN level's stride s; None without head


class DistillationStudent(nn.Module):
    """images in [0, 1] -> predictions of the teacher's (whitened) features, one map per teacher level, and, for
    label / mixed distillation, class logits.

    Args:
        cfg: backbone and decoder sizes.
        teacher_levels: the levels to predict; their finest stride also sets where the FPN starts.
        num_classes: > 0 adds a `LogitHead` on the FPN's finest output (label / mixed distillation).
        predict_features: False builds no per-level projections (label-only distillation uses the PPM + FPN
            decoder for its logits but regresses no features).
        backbone: a timm model built with `features_only=True` to use instead of a fresh `cfg.model`.

    Attributes:
        backbone: the timm `features_only` model; the only part exported after pretraining.
        regressor: PPM + FPN + projections; discarded after pretraining.
        logit_head: None, or the class-logit head; discarded after pretraining.
    """

    def __init__(
        self,
        cfg: StudentConfig,
        teacher_levels: Sequence[TeacherLevel],
        num_classes: int = 0,
        predict_features: bool = True,
        backbone: nn.Module | None = None,
    ):
        super().__init__()
        if backbone is not None and not hasattr(backbone, "feature_info"):
            raise StudentError(
                f"the student backbone given ({type(backbone).__name__}) has no feature_info; build it with "
                "timm.create_model(name, features_only=True)"
            )
        self.backbone = create_backbone(cfg.model) if backbone is None else backbone
        # The timm name export needs: a given backbone says what it is.
        self.model_name = getattr(self.backbone, "pretrained_cfg", {}).get("architecture") or cfg.model
        strides = self.backbone.feature_info.reduction()
        channels = self.backbone.feature_info.channels()
        teacher_strides = [level.stride for level in teacher_levels]
        missing = [s for s in teacher_strides if s not in strides]
        if missing:
            raise StudentError(
                f"teacher levels with stride {missing} have no student level of that stride (student '{cfg.model}' "
                f"strides: {strides}); choose teacher.blocks whose strides are among them"
            )
        # The FPN spans from the finest matched level to the last stage, as in the paper's levels 2..5.
        self.first_level = strides.index(min(teacher_strides))
        projected = list(teacher_levels) if predict_features else []
        self.regressor = FeatureRegressor(
            student_channels=channels[self.first_level :],
            student_strides=strides[self.first_level :],
            teacher_channels=[level.channels for level in projected],
            teacher_strides=[level.stride for level in projected],
            channels=cfg.regressor_channels,
            pool_scales=cfg.pool_scales,
            read_levels=[0] if num_classes > 0 else [],
        )
        self.logit_head = LogitHead(cfg.regressor_channels, num_classes) if num_classes > 0 else None
        self.normalize = InputNormalization(self.backbone)

    def forward(self, images: Tensor, out_sizes: Sequence[Sequence[int]]) -> StudentOutput:
        """Args: images (B, 3, H, W) in [0, 1]; (H_l, W_l) of each teacher level. Returns features and logits.

        This is the call DDP / FSDP wrap, so it is `forward` (their gradient hooks run only through it)."""
        pyramid = self.regressor.pyramid(self.backbone(self.normalize(images))[self.first_level :])
        logits = self.logit_head(pyramid[0]) if self.logit_head is not None else None
        return StudentOutput(self.regressor.project_pyramid(pyramid, out_sizes), logits)

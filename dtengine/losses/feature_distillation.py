"""The distillation objective as the trainer sees it: named loss terms from one teacher/student pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from dtengine.errors import ConfigError
from dtengine.ops import feature_regression_loss
from dtengine.ops.feature_loss import BACKENDS


@dataclass
class LossConfig:
    """Feature-distillation loss: L_feat = L_MSE + at_weight * L_AT over the teacher levels."""

    at_weight: float = 10.0
    """lambda_AT, weight of the attention-transfer term (paper: 10; MSE+AT beats either alone)."""
    whiten: bool = True
    """Normalise teacher features by a non-learnable LayerNorm over channels before comparison."""
    backend: str = "auto"
    """Implementation of `dtengine.ops.feature_regression_loss`: "auto" (Triton on CUDA) | "torch" | "triton"."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"loss.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.at_weight < 0:
            raise ConfigError(f"loss.at_weight must be >= 0, got {self.at_weight}")


def feature_distillation_terms(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], cfg: LossConfig
) -> dict[str, Tensor]:
    """Returns {"loss": scalar to minimise, "mse": ..., "at": ...} (0-dim fp32 tensors)."""
    terms = feature_regression_loss(
        student_feats, teacher_feats, at_weight=cfg.at_weight, whiten=cfg.whiten, backend=cfg.backend
    )
    return {"loss": terms.loss, "mse": terms.mse, "at": terms.at}

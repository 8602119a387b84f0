"""The distillation objective of every mode, as named loss terms from one teacher / student pass.

    feature: L = L_feat                              (MSE + AT on the regressed teacher features)
    label:   L = L_ld                                (soft cross-entropy against the interpreter's soft labels)
    mixed:   L = L_feat + label_weight * L_ld         (paper: lambda_ld = 1)

L_feat is `dtengine.ops.feature_regression_loss`; L_ld is `soft_cross_entropy`. The interpreter's logits come
from the same teacher pass as the features (no second teacher forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from dtengine.losses.soft_labels import soft_cross_entropy
from dtengine.ops import feature_regression_loss
from dtengine.ops.feature_loss import BACKENDS
from dtengine.runtime.errors import ConfigError

MODES = ("feature", "label", "mixed")


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


@dataclass
class DistillConfig:
    """What the student is distilled from: the teacher's features, its interpreter's soft labels, or both."""

    mode: str = "feature"
    """"feature" (regress the teacher's features), "label" (only the interpreter's soft labels, through the
    student's logit head) or "mixed" (both: L_feat + label_weight * L_ld)."""
    interpreter: str = ""
    """Folder (or its interpreter.safetensors) written by `dtengine train-interpreter` for this teacher; required
    by modes "label" and "mixed"."""
    label_weight: float = 1.0
    """lambda_ld, weight of the label-distillation term in mode "mixed" (paper: 1)."""
    temperature: float = 4.0
    """tau of the soft cross-entropy (paper: 4)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"distill.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "feature" and not str(self.interpreter).strip():
            raise ConfigError(
                f"distill.mode={self.mode} needs distill.interpreter=DIR "
                "(a folder written by `dtengine train-interpreter` for this teacher)"
            )
        if self.temperature <= 0 or self.label_weight < 0:
            raise ConfigError("distill.temperature must be > 0 and distill.label_weight >= 0")


def term_names(mode: str) -> tuple[str, ...]:
    """The named terms `distillation_terms` returns for `mode`, "loss" first."""
    return {"feature": ("loss", "mse", "at"), "label": ("loss", "ld"), "mixed": ("loss", "mse", "at", "ld")}[mode]


def distillation_terms(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    student_logits: Tensor | None,
    teacher_logits: Tensor | None,
    loss_cfg: LossConfig,
    distill_cfg: DistillConfig,
) -> dict[str, Tensor]:
    """The objective of `distill_cfg.mode` as named 0-dim fp32 terms (`term_names(mode)`); "loss" is minimised.

    Mode "label" ignores the features (pass [] for both); mode "feature" the logits (pass None for both).
    """
    mode = distill_cfg.mode
    terms = {}
    if mode != "label":
        feat = feature_regression_loss(
            student_feats, teacher_feats, at_weight=loss_cfg.at_weight, whiten=loss_cfg.whiten, backend=loss_cfg.backend
        )
        terms = {"loss": feat.loss, "mse": feat.mse, "at": feat.at}
    if mode == "feature":
        return terms
    ld = soft_cross_entropy(student_logits, teacher_logits, distill_cfg.temperature)
    if mode == "label":
        return {"loss": ld, "ld": ld}
    return {**terms, "loss": terms["loss"] + distill_cfg.label_weight * ld, "ld": ld}

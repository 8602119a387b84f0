"""Label distillation (paper: soft labels from the teacher's feature interpreter) and the per-mode objective.

    feature: L = L_feat                              (MSE + AT on the regressed teacher features)
    label:   L = L_ld                                (soft cross-entropy against the interpreter's soft labels)
    mixed:   L = L_feat + label_weight * L_ld         (paper: lambda_ld = 1)

The interpreter's logits come from the same teacher pass as the features (no second teacher forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from dtengine.errors import ConfigError
from dtengine.losses.feature_distillation import LossConfig, feature_distillation_terms

MODES = ("feature", "label", "mixed")


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


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, reduction: str = "mean"
) -> Tensor:
    """Hinton's temperature-scaled soft cross-entropy, per pixel, times tau^2.

        loss_i = -tau^2 * sum_c softmax(z_t / tau)_ic * log_softmax(z_s / tau)_ic

    Scaled by tau^2 (as Hinton et al. do): the gradient w.r.t. z_s is (q_s - q_t) / tau, and for small logits
    q_s - q_t itself shrinks like 1 / tau, so without the factor the term would weaken like 1 / tau^2 and its
    balance against L_feat (lambda_ld = 1) would depend on tau. The teacher side gets no gradient.
    Student logits at another resolution than the teacher's are resized bilinearly to the teacher's.

    Args:
        student_logits: (B, K, h, w).
        teacher_logits: (B, K, H, W), e.g. the frozen interpreter's output.
        reduction: "mean" over all B * H * W pixels (0-dim) or "none" ((B, H, W)).
    Returns:
        fp32 tensor as `reduction` says.
    """
    if student_logits.shape[-2:] != teacher_logits.shape[-2:]:
        student_logits = F.interpolate(
            student_logits.float(), size=teacher_logits.shape[-2:], mode="bilinear", align_corners=False
        )
    soft_targets = (teacher_logits.detach().float() / temperature).softmax(dim=1)
    log_probs = (student_logits.float() / temperature).log_softmax(dim=1)
    per_pixel = -(soft_targets * log_probs).sum(dim=1) * temperature**2  # (B, H, W)
    if reduction == "none":
        return per_pixel
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_pixel.mean()


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

    Mode "feature" returns exactly `feature_distillation_terms`; "label" ignores the features (pass [] for both).
    """
    mode = distill_cfg.mode
    terms = feature_distillation_terms(student_feats, teacher_feats, loss_cfg) if mode != "label" else {}
    if mode == "feature":
        return terms
    ld = soft_cross_entropy(student_logits, teacher_logits, distill_cfg.temperature)
    if mode == "label":
        return {"loss": ld, "ld": ld}
    return {**terms, "loss": terms["loss"] + distill_cfg.label_weight * ld, "ld": ld}

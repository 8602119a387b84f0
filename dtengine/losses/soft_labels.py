"""Hinton's soft cross-entropy: the label-distillation term (student logits against a teacher's soft labels)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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

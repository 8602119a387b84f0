"""`feature_regression_loss`: DreamTeacher's feature-regression objective (MSE + attention transfer).

The public entry point. It dispatches between the pure-PyTorch fp32 reference (`feature_loss_reference`, the CPU
path and the oracle) and the fused Triton kernel behind a custom op (`feature_loss_fused`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from dtengine.ops.feature_loss_fused import fused_feature_regression_loss
from dtengine.ops.feature_loss_reference import (
    FeatureRegressionLoss,
    attention_map,
    feature_regression_loss_reference,
    whiten_channels,
)

BACKENDS = ("auto", "torch", "triton")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = [
    "BACKENDS",
    "FeatureRegressionLoss",
    "attention_map",
    "feature_regression_loss",
    "feature_regression_loss_reference",
    "resolve_backend",
    "whiten_channels",
]


def _check_levels(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
    if len(student_feats) != len(teacher_feats) or len(student_feats) == 0:
        raise ValueError(
            f"feature_regression_loss needs one student map per teacher map, got {len(student_feats)} student and "
            f"{len(teacher_feats)} teacher levels"
        )
    for level, (r, g) in enumerate(zip(student_feats, teacher_feats)):
        if r.dim() != 4 or r.shape != g.shape:
            raise ValueError(
                f"feature_regression_loss level {level}: student {tuple(r.shape)} and teacher {tuple(g.shape)} must "
                "both be (B, C, H, W) of the same shape; resize/project the student map to the teacher's"
            )


def resolve_backend(backend: str, feats: Sequence[Tensor] = ()) -> str:
    """Pick the implementation for these tensors: "torch" (reference) or "triton" (fused kernel).

    "auto" takes Triton when every tensor is a CUDA fp32/bf16/fp16 tensor, the reference otherwise.
    `DTENGINE_DISABLE_TRITON=1` forces the reference whatever was asked for. "triton" on tensors the kernels
    cannot run on raises a one-line RuntimeError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"feature_regression_loss backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or os.environ.get("DTENGINE_DISABLE_TRITON") == "1":
        return "torch"
    on_cuda = all(x.is_cuda and x.dtype in FUSED_DTYPES for x in feats)
    if backend == "auto":
        return "triton" if on_cuda and len(feats) > 0 else "torch"
    if not on_cuda and not _triton_interpreter_runs(feats):
        raise RuntimeError(
            "feature_regression_loss backend='triton' needs CUDA fp32/bf16/fp16 tensors (or TRITON_INTERPRET=1 set "
            "before dtkernels is imported, for the CPU interpreter); use backend='auto' or 'torch' elsewhere"
        )
    return "triton"


def _triton_interpreter_runs(feats: Sequence[Tensor]) -> bool:
    try:
        from dtkernels.feature_loss import can_run_on  # imports triton: only on this error path
    except ImportError:
        return False

    return all(can_run_on(x.device) and x.dtype in FUSED_DTYPES for x in feats)


def feature_regression_loss(
    student_feats: Sequence[Tensor] | Tensor,
    teacher_feats: Sequence[Tensor] | Tensor,
    *,
    at_weight: float = 10.0,
    whiten: bool = True,
    backend: str = "auto",
) -> FeatureRegressionLoss:
    """DreamTeacher feature-regression loss over L levels.

    Per level l, with regressed student map r and raw teacher map g, both (B, C, H, W):

        g~     = LayerNorm over C at every pixel of g (no affine, eps 1e-6)   if whiten else g
        mse_l  = mean over B, C, H, W of (r - g~)^2
        q_x    = sum_c x[b, c, p]^2 for x in {r, g~};  qhat = q / max(||q[b]||_2, 1e-12)
        at_l   = mean over b of ||qhat_r[b] - qhat_g[b]||_2
        loss   = mean_l (mse_l + at_weight * at_l)

    The teacher receives no gradient, and neither do the returned mse and at (they are for logging; weigh the
    terms with at_weight). All arithmetic is fp32 whatever the input dtype.

    Args:
        student_feats: regressed student maps, one per level (or a single tensor for one level).
        teacher_feats: teacher maps of the same shapes, not whitened.
        at_weight: lambda_AT, the attention-transfer weight (paper: 10).
        whiten: apply the non-learnable LayerNorm to the teacher maps.
        backend: "auto" (Triton on CUDA, the reference elsewhere) | "torch" (reference) | "triton" (fused kernel).

    Returns:
        FeatureRegressionLoss(loss, mse, at), 0-dim fp32 tensors; mse and at are averaged over levels.
    """
    if isinstance(student_feats, Tensor):
        student_feats = [student_feats]
    if isinstance(teacher_feats, Tensor):
        teacher_feats = [teacher_feats]
    _check_levels(student_feats, teacher_feats)
    if resolve_backend(backend, [*student_feats, *teacher_feats]) == "triton":
        return fused_feature_regression_loss(student_feats, teacher_feats, at_weight=at_weight, whiten=whiten)
    out = feature_regression_loss_reference(student_feats, teacher_feats, at_weight=at_weight, whiten=whiten)
    return FeatureRegressionLoss(out.loss, out.mse.detach(), out.at.detach())

"""`feature_regression_loss`: DreamTeacher's feature-regression objective (MSE + attention transfer).

This module holds the pure-PyTorch fp32 reference. It is the CPU path, the fallback whenever the fused
Triton kernel cannot run, and the oracle the kernel's tests and benchmarks compare against: change the
definition here and every backend must follow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

LAYERNORM_EPS = 1e-6
AT_NORM_EPS = 1e-12
BACKENDS = ("auto", "torch")


class FeatureRegressionLoss(NamedTuple):
    """Scalar loss and its two terms, each averaged over levels (0-dim fp32 tensors)."""

    loss: Tensor  # mse + at_weight * at
    mse: Tensor  # mean over levels of mse_l
    at: Tensor  # mean over levels of at_l


def _fp32(x: Tensor) -> Tensor:
    # fp64 stays fp64 so gradcheck can verify the reference; every lower precision is lifted to fp32.
    return x if x.dtype == torch.float64 else x.float()


def whiten_channels(features: Tensor, eps: float = LAYERNORM_EPS) -> Tensor:
    """Non-learnable LayerNorm over channels at every pixel (the paper's feature "whitening").

    Shape: (B, C, H, W) -> (B, C, H, W), computed in fp32 (fp64 inputs stay fp64).
    """
    x = _fp32(features)
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def attention_map(features: Tensor, eps: float = AT_NORM_EPS) -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis with p = 2, L2-normalised per sample.

    q[b, p] = sum_c x[b, c, p]^2, qhat[b] = q[b] / max(||q[b]||_2, eps).
    Shape: (B, C, H, W) -> (B, H*W), fp32.
    """
    q = _fp32(features).pow(2).sum(dim=1).flatten(1)  # (B, H*W)
    return q / q.norm(dim=1, keepdim=True).clamp_min(eps)


def feature_regression_loss_reference(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], at_weight: float = 10.0, whiten: bool = True
) -> FeatureRegressionLoss:
    """fp32 reference of `feature_regression_loss`; see there for the definition."""
    mse_terms, at_terms = [], []
    for r, g in zip(student_feats, teacher_feats):
        r = _fp32(r)
        g = whiten_channels(g.detach()) if whiten else _fp32(g.detach())
        mse_terms.append((r - g).pow(2).mean())
        at_terms.append((attention_map(r) - attention_map(g)).norm(dim=1).mean())
    mse = torch.stack(mse_terms).mean()
    at = torch.stack(at_terms).mean()
    return FeatureRegressionLoss(mse + at_weight * at, mse, at)


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


def resolve_backend(backend: str) -> str:
    """Pick the implementation: 'torch' (reference) is the only one until the fused kernel lands.

    `DTENGINE_DISABLE_TRITON=1` forces the reference whatever is asked for by 'auto'.
    """
    if backend not in BACKENDS:
        raise ValueError(f"feature_regression_loss backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" or os.environ.get("DTENGINE_DISABLE_TRITON") == "1":
        return "torch"
    return backend


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

    The teacher receives no gradient. All arithmetic is fp32 whatever the input dtype.

    Args:
        student_feats: regressed student maps, one per level (or a single tensor for one level).
        teacher_feats: teacher maps of the same shapes, not whitened.
        at_weight: lambda_AT, the attention-transfer weight (paper: 10).
        whiten: apply the non-learnable LayerNorm to the teacher maps.
        backend: "auto" | "torch".

    Returns:
        FeatureRegressionLoss(loss, mse, at), 0-dim fp32 tensors; mse and at are averaged over levels.
    """
    if isinstance(student_feats, Tensor):
        student_feats = [student_feats]
    if isinstance(teacher_feats, Tensor):
        teacher_feats = [teacher_feats]
    _check_levels(student_feats, teacher_feats)
    resolve_backend(backend)
    return feature_regression_loss_reference(student_feats, teacher_feats, at_weight=at_weight, whiten=whiten)

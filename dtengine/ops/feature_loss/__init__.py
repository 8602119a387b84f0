"""`feature_regression_loss`: DreamTeacher's feature-regression objective (MSE + attention transfer).

    reference.py  the pure-PyTorch fp32 definition: the CPU path and the oracle of tests and benchmarks
    op.py         the fused computation as a custom op (`dtengine::fused_feature_regression_loss`), Triton kernels
                  from `dtkernels.feature_loss` behind it
    here          the public function and the choice between them (`dtengine.ops.backends`)

Backends: "auto" (Triton where its kernels run: CUDA fp32/bf16/fp16 tensors, or the CPU under TRITON_INTERPRET=1;
the reference elsewhere) | "torch" | "triton".
DTENGINE_FEATURE_LOSS_BACKEND forces one, DTENGINE_DISABLE_TRITON=1 keeps Triton off (`dtengine.runtime.flags`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dtengine.ops.backends import OpBackends, resolve_backend
from dtengine.ops.feature_loss.op import fused_feature_regression_loss
from dtengine.ops.feature_loss.reference import (
    FeatureRegressionLoss,
    attention_map,
    feature_regression_loss_reference,
    whiten_channels,
)
from dtengine.runtime.flags import flags

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = [
    "BACKENDS",
    "FeatureRegressionLoss",
    "attention_map",
    "feature_regression_loss",
    "feature_regression_loss_reference",
    "fused_feature_regression_loss",
    "whiten_channels",
]


def _triton_unavailable(*feats: Tensor) -> str | None:
    if any(x.dtype not in FUSED_DTYPES for x in feats):
        return f"the kernels take fp32/bf16/fp16 tensors, got {sorted({str(x.dtype) for x in feats})}"
    if all(x.is_cuda for x in feats):
        return None
    try:
        from dtkernels.interpreter import can_run_on  # imports triton: only off CUDA
    except ImportError as err:
        return f"triton is not importable ({err})"
    if all(can_run_on(x.device) for x in feats):
        return None
    return "it needs CUDA tensors (or TRITON_INTERPRET=1 set before start, for the CPU interpreter)"


FEATURE_LOSS_BACKENDS = OpBackends(
    op="feature_regression_loss",
    unavailable={"torch": lambda *feats: None, "triton": _triton_unavailable},
    auto_order=("triton", "torch"),
    reference="torch",
)
BACKENDS = FEATURE_LOSS_BACKENDS.names


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


def resolve_feature_loss_backend(backend: str, feats: Sequence[Tensor]) -> str:
    """ "torch" or "triton": the implementation a call on `feats` runs (see the module docstring)."""
    return resolve_backend(FEATURE_LOSS_BACKENDS, backend, flags().feature_loss_backend, *feats)


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

    Raises:
        BackendError: `backend` cannot run on these tensors (e.g. "triton" on CPU).
    """
    if isinstance(student_feats, Tensor):
        student_feats = [student_feats]
    if isinstance(teacher_feats, Tensor):
        teacher_feats = [teacher_feats]
    _check_levels(student_feats, teacher_feats)
    if resolve_feature_loss_backend(backend, [*student_feats, *teacher_feats]) == "triton":
        return fused_feature_regression_loss(student_feats, teacher_feats, at_weight=at_weight, whiten=whiten)
    out = feature_regression_loss_reference(student_feats, teacher_feats, at_weight=at_weight, whiten=whiten)
    return FeatureRegressionLoss(out.loss, out.mse.detach(), out.at.detach())

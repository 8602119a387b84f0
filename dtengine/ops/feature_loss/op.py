"""The fused feature-regression loss as a `torch.library` custom op, so `torch.compile` traces through it.

One op, `dtengine::fused_feature_regression_loss`, computes the loss terms *and* d loss / d r in its forward (the
loss is terminal, so nothing else is needed for backward) and returns [loss, mse, at, *dr]. Its autograd formula
only rescales the stored dr by the incoming gradient of `loss`; mse and at are returned for logging and carry no
gradient (keeping r alive for their separate gradients would cost an r-sized buffer per level).

Two implementations sit behind the op, chosen by its `impl` argument:
- "triton": the kernels of `dtkernels.feature_loss` (CUDA, or the CPU interpreter under TRITON_INTERPRET=1);
- "torch": the same two-pass computation in PyTorch ops. It lets `torch.compile` of the op be tested on a CPU
  and double-checks the analytic gradient the kernels implement against autograd of the reference.

Caution: backward allocates the scaled gradient while dr is still held, so for that moment two r-sized buffers
per level exist; dr is released with the graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from dtengine.ops.feature_loss.reference import (
    AT_NORM_EPS,
    LAYERNORM_EPS,
    FeatureRegressionLoss,
    whiten_channels,
)

OP_IMPLS = ("triton", "torch")


def attention_distance_and_grad(q_r: Tensor, q_g: Tensor, eps: float = AT_NORM_EPS) -> tuple[Tensor, Tensor]:
    """Per-sample AT distance |q_r/|q_r| - q_g/|q_g|| and its gradient with respect to q_r.

    Shape: q_r, q_g (B, P) fp32 -> distance (B,), grad (B, P). The same formulas as `_attention_kernel`.
    """
    norm_r = q_r.norm(dim=1, keepdim=True)
    scale_r = 1.0 / norm_r.clamp_min(eps)
    qhat_r = q_r * scale_r
    diff = qhat_r - q_g * (1.0 / q_g.norm(dim=1, keepdim=True).clamp_min(eps))
    distance = diff.norm(dim=1, keepdim=True)
    unit = torch.where(distance > 0, diff / distance.clamp_min(torch.finfo(diff.dtype).tiny), 0.0)
    # Below the clamp the normaliser is the constant eps: no projection term (as clamp_min's own gradient).
    projection = (qhat_r * unit).sum(dim=1, keepdim=True) * (norm_r >= eps)
    return distance.squeeze(1), (unit - qhat_r * projection) * scale_r


def fused_forward_torch(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], *, at_weight: float, whiten: bool
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(loss, mse, at, [d loss / d r per level]) in PyTorch ops, mirroring the Triton kernels' two passes."""
    num_levels = len(student_feats)
    mse_terms, at_terms, grads = [], [], []
    for r, g in zip(student_feats, teacher_feats):
        batch, _, height, width = r.shape
        r32 = r.float()
        target = whiten_channels(g.detach(), LAYERNORM_EPS) if whiten else g.detach().float()
        diff = r32 - target  # (B, C, H, W)
        distance, grad_q = attention_distance_and_grad(
            r32.pow(2).sum(1).flatten(1), target.pow(2).sum(1).flatten(1)
        )  # (B,), (B, H*W)
        at_coef = grad_q.view(batch, 1, height, width) * (2.0 / (num_levels * batch))
        grad = diff * (2.0 / (num_levels * r.numel())) + at_weight * at_coef * r32
        grads.append(torch.empty_like(r).copy_(grad))  # the strides the fake implementation promises
        mse_terms.append(diff.pow(2).mean())
        at_terms.append(distance.mean())
    mse = torch.stack(mse_terms).mean()
    at = torch.stack(at_terms).mean()
    return mse + at_weight * at, mse, at, grads


@torch.library.custom_op("dtengine::fused_feature_regression_loss", mutates_args=())
def _fused_op(student: list[Tensor], teacher: list[Tensor], at_weight: float, whiten: bool, impl: str) -> list[Tensor]:
    if impl == "triton":
        from dtkernels.feature_loss import feature_loss_forward  # imports triton: only when asked for

        out = feature_loss_forward(
            student, teacher, at_weight=at_weight, whiten=whiten, layernorm_eps=LAYERNORM_EPS, norm_eps=AT_NORM_EPS
        )
        loss, mse, at, grads = out.loss, out.mse, out.at, out.grads
    else:
        loss, mse, at, grads = fused_forward_torch(student, teacher, at_weight=at_weight, whiten=whiten)
    return [loss, mse, at, *grads]


@_fused_op.register_fake
def _fused_op_fake(student, teacher, at_weight, whiten, impl):
    scalars = [student[0].new_empty((), dtype=torch.float32) for _ in range(3)]
    return [*scalars, *(torch.empty_like(r) for r in student)]


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # mse, at and the dr outputs get no incoming gradient: skip their zeros
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[3:])


def _backward(ctx, grads):
    grad_loss = grads[0]
    student_grads = [None if grad_loss is None else dr * grad_loss for dr in ctx.saved_tensors]
    return student_grads, [None] * len(student_grads), None, None, None


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def fused_feature_regression_loss(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    *,
    at_weight: float = 10.0,
    whiten: bool = True,
    impl: str = "triton",
) -> FeatureRegressionLoss:
    """The loss through the custom op; `impl` is "triton" or "torch" (see the module docstring).

    Shapes as in `dtengine.ops.feature_regression_loss`; mse and at come back without autograd history.
    """
    if impl not in OP_IMPLS:
        raise ValueError(f"fused feature loss impl must be one of {OP_IMPLS}, got {impl!r}")
    loss, mse, at, *_ = _fused_op(list(student_feats), [g.detach() for g in teacher_feats], at_weight, whiten, impl)
    return FeatureRegressionLoss(loss, mse, at)


FLOPS_PER_ELEMENT = 15
"""Arithmetic per element of a level, forward with its gradient: whitening (mean, variance, normalise) 5, squared
error 3, both attention maps 4, d loss / d r 3. Only for counting (`torch.utils.flop_counter`, MFU)."""


@register_flop_formula(torch.ops.dtengine.fused_feature_regression_loss)
def _fused_loss_flops(student_shapes, teacher_shapes, *args, out_shape=None, **kwargs) -> int:
    return FLOPS_PER_ELEMENT * sum(math.prod(shape) for shape in student_shapes)

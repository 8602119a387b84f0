"""The fused feature-regression loss as `torch.library` custom ops, so `torch.compile` traces through it.

`dtengine::fused_feature_regression_loss` returns [loss, mse, at, stats]: the loss terms, and the (3, B * sum_l
H_l W_l) fp32 statistics of every pixel of every level, level after level (channel mean and rstd of the teacher
map, the attention term's gradient coefficient)
that `dtengine::fused_feature_regression_loss_backward` needs, with r and g, to write grad_loss * d loss / d r.
Nothing r-sized is stored between them: the backward reads r and g again. mse and at are returned for logging and
carry no gradient.

Two implementations sit behind each op, chosen by its `impl` argument:
- "triton": the kernels of `dtkernels.feature_loss` (CUDA, or the CPU interpreter under TRITON_INTERPRET=1);
- "torch": the same computation in PyTorch ops. It lets `torch.compile` of the ops be tested on a CPU and
  double-checks the analytic gradient the kernels implement against autograd of the reference.

Memory: r and g are kept from forward to backward (r is usually alive anyway; g, the teacher's features, would
otherwise be freed after the forward), plus three fp32 values per pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from dtengine.ops.feature_loss.reference import AT_NORM_EPS, LAYERNORM_EPS, FeatureRegressionLoss

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


def _whitened(g: Tensor, whiten: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(g~, mean, rstd): g~ = (g - mean) * rstd over channels, or g itself (mean 0, rstd 1); fp32, mean and rstd
    (B, 1, H, W)."""
    g32 = g.detach().float()
    if not whiten:
        ones = g32.new_ones(g.shape[0], 1, *g.shape[2:])
        return g32, torch.zeros_like(ones), ones
    mean = g32.mean(1, keepdim=True)
    rstd = torch.rsqrt(g32.var(1, unbiased=False, keepdim=True) + LAYERNORM_EPS)
    return (g32 - mean) * rstd, mean, rstd


def fused_forward_torch(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], *, at_weight: float, whiten: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, mse, at, stats) in PyTorch ops, mirroring the Triton forward kernels."""
    num_levels = len(student_feats)
    mse_terms, at_terms, level_stats = [], [], []
    for r, g in zip(student_feats, teacher_feats):
        batch = r.shape[0]
        r32 = r.float()
        target, mean, rstd = _whitened(g, whiten)
        distance, grad_q = attention_distance_and_grad(
            r32.pow(2).sum(1).flatten(1), target.pow(2).sum(1).flatten(1)
        )  # (B,), (B, H*W)
        at_coef = grad_q * (2.0 * at_weight / (num_levels * batch))
        level_stats.append(torch.stack([mean.flatten(), rstd.flatten(), at_coef.flatten()]))
        mse_terms.append((r32 - target).pow(2).mean())
        at_terms.append(distance.mean())
    mse = torch.stack(mse_terms).mean()
    at = torch.stack(at_terms).mean()
    return mse + at_weight * at, mse, at, torch.cat(level_stats, dim=1)


def fused_backward_torch(
    grad_loss: Tensor, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], stats: Tensor
) -> list[Tensor]:
    """grad_loss * d loss / d r per level in PyTorch ops, mirroring `_grad_kernel`."""
    grads = []
    sizes = [r.shape[0] * r.shape[2] * r.shape[3] for r in student_feats]
    for r, g, (mean, rstd, at_coef) in zip(student_feats, teacher_feats, stats.split(sizes, dim=1)):
        shape = (r.shape[0], 1, *r.shape[2:])
        r32, target = r.float(), (g.float() - mean.view(shape)) * rstd.view(shape)
        grad = (r32 - target) * (2.0 / (len(student_feats) * r.numel())) + at_coef.view(shape) * r32
        grads.append(torch.empty_like(r).copy_(grad * grad_loss))  # the strides the fake implementation promises
    return grads


@torch.library.custom_op("dtengine::fused_feature_regression_loss", mutates_args=())
def _fused_op(student: list[Tensor], teacher: list[Tensor], at_weight: float, whiten: bool, impl: str) -> list[Tensor]:
    if impl == "triton":
        from dtkernels.feature_loss import feature_loss_forward  # imports triton: only when asked for

        out = feature_loss_forward(
            student, teacher, at_weight=at_weight, whiten=whiten, layernorm_eps=LAYERNORM_EPS, norm_eps=AT_NORM_EPS
        )
        loss, mse, at, stats = out.loss, out.mse, out.at, out.stats
    else:
        loss, mse, at, stats = fused_forward_torch(student, teacher, at_weight=at_weight, whiten=whiten)
    return [loss, mse, at, stats]


@_fused_op.register_fake
def _fused_op_fake(student, teacher, at_weight, whiten, impl):
    scalars = [student[0].new_empty((), dtype=torch.float32) for _ in range(3)]
    columns = sum(r.shape[0] * r.shape[2] * r.shape[3] for r in student)
    return [*scalars, student[0].new_empty((3, columns), dtype=torch.float32)]


@torch.library.custom_op("dtengine::fused_feature_regression_loss_backward", mutates_args=())
def _fused_backward_op(
    grad_loss: Tensor, student: list[Tensor], teacher: list[Tensor], stats: Tensor, impl: str
) -> list[Tensor]:
    if impl == "triton":
        from dtkernels.feature_loss import feature_loss_backward

        return feature_loss_backward(grad_loss, student, teacher, stats)
    return fused_backward_torch(grad_loss, student, teacher, stats)


@_fused_backward_op.register_fake
def _fused_backward_op_fake(grad_loss, student, teacher, stats, impl):
    return [torch.empty_like(r) for r in student]


def _setup_context(ctx, inputs, output):
    student, teacher, _, _, impl = inputs
    ctx.set_materialize_grads(False)  # mse, at and the statistics get no incoming gradient: skip their zeros
    ctx.mark_non_differentiable(*output[1:])
    ctx.num_levels, ctx.impl = len(student), impl
    ctx.save_for_backward(*student, *teacher, output[3])


def _backward(ctx, grads):
    grad_loss, levels = grads[0], ctx.num_levels
    if grad_loss is None:
        return [None] * levels, [None] * levels, None, None, None
    saved = ctx.saved_tensors
    student, teacher, stats = saved[:levels], saved[levels : 2 * levels], saved[2 * levels]
    student_grads = _fused_backward_op(grad_loss, list(student), list(teacher), stats, ctx.impl)
    return student_grads, [None] * levels, None, None, None


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

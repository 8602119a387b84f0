"""Launchers of the fused feature-regression loss: checks, allocation, grids; pure torch + triton.

`feature_loss_forward` runs the forward kernels of `kernel.py` per level and returns the loss terms and, per
level, the (3, B, P) statistics the backward needs (mean, rstd, at_coef); `feature_loss_backward` reads r and g
again and writes grad_loss * d loss / d r. The autograd layer (in `dtengine.ops`) keeps r, g and the statistics
between the two.

Bytes model (per level; N = B*C*H*W elements, M = B*H*W pixels, s_r / s_g = element bytes of r / g):

    forward   _stats_kernel      read r, g                     N (s_r + s_g)      write 5 stats     20 M
              _attention_kernel  read q_r, q_g (three times), sse                 28 M, write at_coef 4 M
    backward  _grad_kernel       read r, g                     N (s_r + s_g)      read 3 stats      12 M
                                 write grad                    N s_r
    total                        2 N (s_r + s_g) + N s_r + 64 M     (10 N + 64 M bytes in bf16)

The O(M) terms are 1/C of the O(N) ones (C >= 512 at the paper's teacher levels), and the reduce kernel's
re-reads are of a (B, P) array that stays in L2. Reading r and g twice (once per pass) is the price of the
attention term: its gradient needs per-sample norms over all pixels. Memory held from forward to backward: the
three (B, P) fp32 statistics, plus r and g themselves (the autograd layer keeps them; no r-sized dr buffer).

Limitations: inputs must be fp32, bf16 or fp16 (fp64 goes to the reference); each level is launched separately
(two forward kernels and two tiny torch reductions, one backward kernel), so very small levels are bound by
launch latency, not bandwidth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from dtkernels.feature_loss.kernel import (
    ATTENTION_BLOCK,
    ATTENTION_WARPS,
    PIXEL_TILE_CONFIGS,
    _attention_kernel,
    _grad_kernel,
    _stats_kernel,
)
from dtkernels.interpreter import INTERPRETED, can_run_on

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FusedFeatureLoss(NamedTuple):
    """What the fused forward produces; loss, mse, at are 0-dim fp32, `stats` holds one entry per level."""

    loss: Tensor
    mse: Tensor
    at: Tensor
    stats: list[Tensor]  # (3, B, H*W) fp32 per level: mean, rstd, at_coef (what `feature_loss_backward` needs)


def flat_pixels(*maps: Tensor) -> bool:
    """Whether every (B, C, H, W) map steps from row to row as from pixel to pixel (stride_h = W * stride_w, as
    NCHW and channels_last do): the kernels then address pixels along one axis, which loads as vectors."""
    return all(m.shape[2] == 1 or m.stride(2) == m.shape[3] * m.stride(3) for m in maps)  # one row: no row step


def _launch_pixel_kernel(kernel, shape: torch.Size, args: list, config: triton.Config | None, **constexprs) -> None:
    batch, _, height, width = shape
    grid = lambda meta: (triton.cdiv(height * width, meta["BLOCK_P"]), batch)  # noqa: E731
    if config is None and not INTERPRETED:
        kernel[grid](*args, **constexprs)
        return
    # The interpreter has nothing to time, and tests pin configurations: launch the jitted kernel directly.
    config = config or PIXEL_TILE_CONFIGS[0]
    kernel.fn[grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _check_levels(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
    for level, (r, g) in enumerate(zip(student_feats, teacher_feats)):
        if r.dtype not in SUPPORTED_DTYPES or g.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"fused feature loss level {level}: dtypes {r.dtype}, {g.dtype}; supported {SUPPORTED_DTYPES}"
            )
        if not can_run_on(r.device) or g.device != r.device:
            raise RuntimeError(f"fused feature loss level {level}: tensors on {r.device} / {g.device} cannot run here")


def _strides(r: Tensor, g: Tensor) -> list:
    return [r.shape[1], r.shape[3], r.shape[2] * r.shape[3], *r.stride(), *g.stride()]


def feature_loss_forward(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    *,
    at_weight: float,
    whiten: bool,
    layernorm_eps: float,
    norm_eps: float,
    config: triton.Config | None = None,
) -> FusedFeatureLoss:
    """Loss terms of the feature-regression loss, and the statistics its backward needs, one pass per level.

    Args:
        student_feats: r per level, (B, C_l, H_l, W_l), fp32 / bf16 / fp16, any strides.
        teacher_feats: g per level, same shapes (dtypes may differ from r's).
        at_weight, whiten, layernorm_eps, norm_eps: as in `dtengine.ops.feature_regression_loss`.
        config: pin one of `PIXEL_TILE_CONFIGS` instead of autotuning (tests; the interpreter uses the first).

    Returns:
        FusedFeatureLoss(loss, mse, at, stats); see there for shapes.
    """
    _check_levels(student_feats, teacher_feats)
    num_levels = len(student_feats)
    mse_terms, at_terms, level_stats = [], [], []
    for r, g in zip(student_feats, teacher_feats):
        batch, pixels = r.shape[0], r.shape[2] * r.shape[3]
        stats = torch.empty((3, batch, pixels), device=r.device, dtype=torch.float32)  # mean, rstd, at_coef
        q_r, q_g, sse = torch.empty((3, batch, pixels), device=r.device, dtype=torch.float32)
        at, sse_sample = torch.empty((2, batch), device=r.device, dtype=torch.float32)
        stats_args = [r, g, stats[0], stats[1], q_r, q_g, sse, *_strides(r, g), layernorm_eps, whiten]
        _launch_pixel_kernel(
            _stats_kernel,
            r.shape,
            stats_args,
            config,
            FLAT_PIXELS=flat_pixels(r, g),
            PIXELS_CONTIGUOUS=r.stride(3) == 1,
        )
        _attention_kernel[(batch,)](
            q_r, q_g, at, stats[2], sse, sse_sample, pixels, norm_eps, 2.0 * at_weight / (num_levels * batch),
            BLOCK=ATTENTION_BLOCK, num_warps=ATTENTION_WARPS,
        )  # fmt: skip
        mse_terms.append(sse_sample.sum() / r.numel())
        at_terms.append(at.mean())
        level_stats.append(stats)
    mse = torch.stack(mse_terms).mean()
    at = torch.stack(at_terms).mean()
    return FusedFeatureLoss(mse + at_weight * at, mse, at, level_stats)


def feature_loss_backward(
    grad_loss: Tensor,
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    stats: Sequence[Tensor],
    config: triton.Config | None = None,
) -> list[Tensor]:
    """grad_loss * d loss / d r per level, from the forward's inputs and statistics.

    Args:
        grad_loss: 0-dim fp32 tensor on the maps' device, the incoming gradient of the loss (read by the kernel:
            no host sync).
        student_feats, teacher_feats: what `feature_loss_forward` was given.
        stats: its `stats`.
    Returns:
        one gradient per level, with r's shape, dtype and (dense) strides.
    """
    _check_levels(student_feats, teacher_feats)
    num_levels, grads = len(student_feats), []
    grad_loss = grad_loss.to(torch.float32).reshape(())
    for r, g, level_stats in zip(student_feats, teacher_feats, stats):
        dr = torch.empty_like(r)
        mse_scale = 2.0 / (num_levels * r.numel())
        grad_args = [r, g, dr, *level_stats, grad_loss, *_strides(r, g), *dr.stride(), mse_scale]
        _launch_pixel_kernel(_grad_kernel, r.shape, grad_args, config, FLAT_PIXELS=flat_pixels(r, g, dr))
        grads.append(dr)
    return grads


def bytes_moved(shapes: Sequence[Sequence[int]], r_bytes: int, g_bytes: int, mode: str) -> int:
    """DRAM bytes of the fused kernels under the model above, summed over levels; mode is fwd | bwd | full."""
    total = 0
    for batch, channels, height, width in shapes:
        n, m = batch * channels * height * width, batch * height * width
        forward = n * (r_bytes + g_bytes) + 52 * m
        backward = n * (r_bytes + g_bytes) + n * r_bytes + 12 * m
        total += {"fwd": forward, "bwd": backward, "full": forward + backward}[mode]
    return total

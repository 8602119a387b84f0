"""Launchers of the fused feature-regression loss: checks, allocation, grids; pure torch + triton.

`feature_loss_forward` runs the three kernels of `kernel.py` per level and returns the loss terms together with
d loss / d r, which the autograd layer (in `dtengine.ops`) keeps for backward: the loss is terminal, so backward
only rescales the stored gradient by the incoming one.

Bytes model (per level; N = B*C*H*W elements, M = B*H*W pixels, s_r / s_g = element bytes of r / g):

    pass 1  (_stats_kernel)      read r, g                     N (s_r + s_g)      write 4 stats     16 M
    reduce  (_attention_kernel)  read q_r, q_g three times     24 M               write at_coef      4 M
    pass 2  (_grad_kernel)       read r, g                     N (s_r + s_g)      read 3 stats      12 M
                                 write dr                      N s_r              write sse          4 M
    forward total                2 N (s_r + s_g) + N s_r + 60 M
    backward (loss only used)    read dr, write grad           2 N s_r

The O(M) terms are 1/C of the O(N) ones (C >= 512 at the paper's teacher levels), and the reduce kernel's
re-reads are of a (B, P) array that stays in L2. Reading r and g twice is the price of the attention term: its
gradient needs per-sample norms over all pixels before the first dr can be written. Extra memory: dr (one
r-sized buffer, kept until backward) plus 6 fp32 arrays of M elements.

Limitations: inputs must be fp32, bf16 or fp16 (fp64 goes to the reference); each level is launched separately
(three kernels plus two small reductions), so very small levels are bound by launch latency, not bandwidth.
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
    """What the fused forward produces; loss, mse, at are 0-dim fp32, the lists hold one entry per level."""

    loss: Tensor
    mse: Tensor
    at: Tensor
    grads: list[Tensor]  # d loss / d r per level, r's shape, dtype and (dense) strides


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


def _level_forward(
    r: Tensor,  # (B, C, H, W)
    g: Tensor,  # (B, C, H, W)
    *,
    at_weight: float,
    whiten: bool,
    num_levels: int,
    layernorm_eps: float,
    norm_eps: float,
    config: triton.Config | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One level: returns (mse_l, at_l, dr), dr being this level's share of d loss / d r (1 / L included)."""
    batch, channels, height, width = r.shape
    pixels = height * width
    mean, rstd, q_r, q_g, at_coef, sse = torch.empty((6, batch, pixels), device=r.device, dtype=torch.float32)
    at = torch.empty(batch, device=r.device, dtype=torch.float32)
    dr = torch.empty_like(r)

    common = [channels, width, pixels, *r.stride(), *g.stride()]
    flat = flat_pixels(r, g, dr)
    stats_args = [r, g, mean, rstd, q_r, q_g, *common, layernorm_eps, whiten]
    _launch_pixel_kernel(_stats_kernel, r.shape, stats_args, config, FLAT_PIXELS=flat)
    _attention_kernel[(batch,)](
        q_r, q_g, at, at_coef, pixels, norm_eps, 2.0 / (num_levels * batch), BLOCK=ATTENTION_BLOCK,
        num_warps=ATTENTION_WARPS,
    )  # fmt: skip
    mse_scale = 2.0 / (num_levels * r.numel())
    grad_args = [r, g, dr, mean, rstd, at_coef, sse, *common, *dr.stride(), mse_scale, at_weight]
    _launch_pixel_kernel(_grad_kernel, r.shape, grad_args, config, FLAT_PIXELS=flat)
    return sse.sum() / r.numel(), at.mean(), dr


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
    """Loss terms and d loss / d r of the feature-regression loss, in one fused pass per level.

    Args:
        student_feats: r per level, (B, C_l, H_l, W_l), fp32 / bf16 / fp16, any strides.
        teacher_feats: g per level, same shapes (dtypes may differ from r's).
        at_weight, whiten, layernorm_eps, norm_eps: as in `dtengine.ops.feature_regression_loss`.
        config: pin one of `PIXEL_TILE_CONFIGS` instead of autotuning (tests; the interpreter uses the first).

    Returns:
        FusedFeatureLoss(loss, mse, at, grads); see there for shapes.
    """
    for level, (r, g) in enumerate(zip(student_feats, teacher_feats)):
        if r.dtype not in SUPPORTED_DTYPES or g.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"fused feature loss level {level}: dtypes {r.dtype}, {g.dtype}; supported {SUPPORTED_DTYPES}"
            )
        if not can_run_on(r.device) or g.device != r.device:
            raise RuntimeError(f"fused feature loss level {level}: tensors on {r.device} / {g.device} cannot run here")
    num_levels = len(student_feats)
    mse_terms, at_terms, grads = [], [], []
    for r, g in zip(student_feats, teacher_feats):
        mse_l, at_l, dr = _level_forward(
            r, g.detach(), at_weight=at_weight, whiten=whiten, num_levels=num_levels,
            layernorm_eps=layernorm_eps, norm_eps=norm_eps, config=config,
        )  # fmt: skip
        mse_terms.append(mse_l)
        at_terms.append(at_l)
        grads.append(dr)
    mse = torch.stack(mse_terms).mean()
    at = torch.stack(at_terms).mean()
    return FusedFeatureLoss(mse + at_weight * at, mse, at, grads)


def bytes_moved(shapes: Sequence[Sequence[int]], r_bytes: int, g_bytes: int, mode: str) -> int:
    """DRAM bytes of the fused kernels under the model above, summed over levels; mode is fwd | bwd | full."""
    total = 0
    for batch, channels, height, width in shapes:
        n, m = batch * channels * height * width, batch * height * width
        forward = 2 * n * (r_bytes + g_bytes) + n * r_bytes + 60 * m
        backward = 2 * n * r_bytes
        total += {"fwd": forward, "bwd": backward, "full": forward + backward}[mode]
    return total

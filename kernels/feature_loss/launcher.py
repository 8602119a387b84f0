"""Launchers of the fused feature-regression loss: checks, allocation, grids; pure torch + triton.

`feature_loss_forward` runs the forward kernels of `kernel.py` over every level at once and returns the loss
terms and the (3, B * sum_l P_l) statistics the backward needs (mean, rstd, at_coef; level l's (B, P_l) block
starts at column B * sum_{k<l} P_k); `feature_loss_backward` reads r and g again and writes grad_loss * d loss /
d r. The autograd layer (in `dtengine.ops`) keeps r, g and the statistics between the two.

Launches: three forward (statistics, attention term, scalars) and one backward, whatever the number of levels,
and no torch kernels between them (buffers are only allocated). Levels whose maps differ in layout (NCHW against
channels_last, or rows that are not one pixel axis) compile to different code, so they get a pixel-kernel launch
per layout; the engine's levels share one.

Bytes model (per level; N = B*C*H*W elements, M = B*H*W pixels, s_r / s_g = element bytes of r / g):

    forward   _stats_kernel      read r, g                     N (s_r + s_g)      write 5 stats     20 M
              _attention_kernel  read q_r, q_g (three times), sse                 28 M, write at_coef 4 M
              _reduce_kernel     read 2 values per (level, sample)                O(B L)
    backward  _grad_kernel       read r, g                     N (s_r + s_g)      read 3 stats      12 M
                                 write grad                    N s_r
    total                        2 N (s_r + s_g) + N s_r + 64 M     (10 N + 64 M bytes in bf16)

The O(M) terms are 1/C of the O(N) ones (C >= 512 at the paper's teacher levels). Reading r and g twice (once per
pass) is the price of the attention term: its gradient needs per-sample norms over all pixels. Memory held from
forward to backward: the (3, B * sum P) fp32 statistics, plus r and g themselves (the autograd layer keeps them;
no r-sized dr buffer).

Limitations: inputs must be fp32, bf16 or fp16 (fp64 goes to the reference). The pixel kernels' body is unrolled
once per level, so compile time grows with the level count; the autotuner keys on shapes and strides, not dtypes.
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
    REDUCE_BLOCK,
    _attention_kernel,
    _grad_kernel,
    _reduce_kernel,
    _stats_kernel,
)
from dtkernels.interpreter import INTERPRETED, can_run_on

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FusedFeatureLoss(NamedTuple):
    """What the fused forward produces; loss, mse, at are 0-dim fp32."""

    loss: Tensor
    mse: Tensor
    at: Tensor
    stats: Tensor  # (3, B * sum_l P_l) fp32: mean, rstd, at_coef (what `feature_loss_backward` needs)


def flat_pixels(*maps: Tensor) -> bool:
    """Whether every (B, C, H, W) map steps from row to row as from pixel to pixel (stride_h = W * stride_w, as
    NCHW and channels_last do): the kernels then address pixels along one axis, which loads as vectors."""
    return all(m.shape[2] == 1 or m.stride(2) == m.shape[3] * m.stride(3) for m in maps)  # one row: no row step


def stats_columns(shapes: Sequence[Sequence[int]]) -> list[int]:
    """First column of each level in the statistics, and their total: [0, B P_0, B (P_0 + P_1), ..., T]."""
    columns = [0]
    for batch, _, height, width in shapes:
        columns.append(columns[-1] + batch * height * width)
    return columns


def _check_levels(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
    batch = len(student_feats[0])
    for level, (r, g) in enumerate(zip(student_feats, teacher_feats)):
        if r.dtype not in SUPPORTED_DTYPES or g.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"fused feature loss level {level}: dtypes {r.dtype}, {g.dtype}; supported {SUPPORTED_DTYPES}"
            )
        if not can_run_on(r.device) or g.device != r.device:
            raise RuntimeError(f"fused feature loss level {level}: tensors on {r.device} / {g.device} cannot run here")
        if len(r) != batch:
            raise ValueError(f"fused feature loss level {level}: batch {len(r)}, but level 0's is {batch}")


def _layout_groups(maps: Sequence[Sequence[Tensor]], by_unit_stride: bool) -> dict[tuple[bool, bool], list[int]]:
    """Levels grouped by the code their pixel kernels compile to: (pixels on one axis, and when asked, r's pixels
    unit-stride)."""
    groups: dict[tuple[bool, bool], list[int]] = {}
    for level, level_maps in enumerate(maps):
        key = (flat_pixels(*level_maps), by_unit_stride and level_maps[0].stride(3) == 1)
        groups.setdefault(key, []).append(level)
    return groups


def _launch_pixel_kernel(kernel, levels: list[Tensor], args: list, config: triton.Config | None, **constexprs) -> None:
    """One launch of a pixel kernel over `levels` (the student maps): each level's tiles, one after another."""
    batch, pixels = levels[0].shape[0], [r.shape[2] * r.shape[3] for r in levels]
    grid = lambda meta: (sum(triton.cdiv(p, meta["BLOCK_P"]) for p in pixels) * batch,)  # noqa: E731
    if config is None and not INTERPRETED:
        kernel[grid](*args, **constexprs)
        return
    # The interpreter has nothing to time, and tests pin configurations: launch the jitted kernel directly.
    config = config or PIXEL_TILE_CONFIGS[0]
    kernel.fn[grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _level_args(levels: list[int], student_feats, teacher_feats, columns: list[int]) -> list:
    """RS, GS, B, CS, WS, PS, OUTS, R_STRIDES, G_STRIDES of the pixel kernels, for `levels`."""
    rs, gs = tuple(student_feats[i] for i in levels), tuple(teacher_feats[i] for i in levels)
    return [
        rs,
        gs,
        rs[0].shape[0],
        tuple(r.shape[1] for r in rs),
        tuple(r.shape[3] for r in rs),
        tuple(r.shape[2] * r.shape[3] for r in rs),
        tuple(columns[i] for i in levels),
        tuple(tuple(r.stride()) for r in rs),
        tuple(tuple(g.stride()) for g in gs),
    ]


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
    """Loss terms of the feature-regression loss, and the statistics its backward needs, in three launches.

    Args:
        student_feats: r per level, (B, C_l, H_l, W_l), fp32 / bf16 / fp16, any strides; one B for all levels.
        teacher_feats: g per level, same shapes (dtypes may differ from r's).
        at_weight, whiten, layernorm_eps, norm_eps: as in `dtengine.ops.feature_regression_loss`.
        config: pin one of `PIXEL_TILE_CONFIGS` instead of autotuning (tests; the interpreter uses the first).

    Returns:
        FusedFeatureLoss(loss, mse, at, stats); see there for shapes.
    """
    _check_levels(student_feats, teacher_feats)
    r0, num_levels = student_feats[0], len(student_feats)
    batch, columns = r0.shape[0], stats_columns([r.shape for r in student_feats])
    stats = torch.empty((3, columns[-1]), device=r0.device, dtype=torch.float32)  # mean, rstd, at_coef
    scratch = torch.empty((3, columns[-1]), device=r0.device, dtype=torch.float32)  # q_r, q_g, sse
    at, sse_sample = torch.empty((2, num_levels, batch), device=r0.device, dtype=torch.float32)
    loss, mse, at_mean = (torch.empty((), device=r0.device, dtype=torch.float32) for _ in range(3))
    pairs = list(zip(student_feats, teacher_feats))
    for (flat, pixels_contiguous), levels in _layout_groups(pairs, by_unit_stride=True).items():
        level_args = _level_args(levels, student_feats, teacher_feats, columns)
        stats_args = [*level_args[:2], stats, scratch, columns[-1], *level_args[2:], layernorm_eps, whiten]
        rs = list(level_args[0])
        _launch_pixel_kernel(_stats_kernel, rs, stats_args, config, FLAT_PIXELS=flat,
                             PIXELS_CONTIGUOUS=pixels_contiguous)  # fmt: skip
    pixels = tuple(r.shape[2] * r.shape[3] for r in student_feats)
    _attention_kernel[(batch, num_levels)](
        stats, scratch, columns[-1], at, sse_sample, batch, pixels, tuple(columns[:-1]), norm_eps,
        2.0 * at_weight / (num_levels * batch), BLOCK=ATTENTION_BLOCK, num_warps=ATTENTION_WARPS,
    )  # fmt: skip
    inv_numels = tuple(1.0 / r.numel() for r in student_feats)
    _reduce_kernel[(1,)](at, sse_sample, loss, mse, at_mean, batch, inv_numels, at_weight, BLOCK=REDUCE_BLOCK)
    return FusedFeatureLoss(loss, mse, at_mean, stats)


def feature_loss_backward(
    grad_loss: Tensor,
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    stats: Tensor,
    config: triton.Config | None = None,
) -> list[Tensor]:
    """grad_loss * d loss / d r per level, from the forward's inputs and statistics, in one launch.

    Args:
        grad_loss: 0-dim fp32 tensor on the maps' device, the incoming gradient of the loss (read by the kernel:
            no host sync).
        student_feats, teacher_feats: what `feature_loss_forward` was given.
        stats: its `stats`.
    Returns:
        one gradient per level, with r's shape, dtype and (dense) strides.
    """
    _check_levels(student_feats, teacher_feats)
    num_levels, columns = len(student_feats), stats_columns([r.shape for r in student_feats])
    grad_loss = grad_loss.to(torch.float32).reshape(())
    grads = [torch.empty_like(r) for r in student_feats]
    triples = list(zip(student_feats, teacher_feats, grads))
    for (flat, _), levels in _layout_groups(triples, by_unit_stride=False).items():
        rs, gs, b, cs, ws, ps, outs, r_strides, g_strides = _level_args(levels, student_feats, teacher_feats, columns)
        grad_args = [
            rs, gs, tuple(grads[i] for i in levels), stats, columns[-1], grad_loss, b, cs, ws, ps, outs, r_strides,
            g_strides, tuple(tuple(grads[i].stride()) for i in levels),
            tuple(2.0 / (num_levels * student_feats[i].numel()) for i in levels),
        ]  # fmt: skip
        _launch_pixel_kernel(_grad_kernel, list(rs), grad_args, config, FLAT_PIXELS=flat)
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

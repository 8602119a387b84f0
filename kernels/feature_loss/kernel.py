"""Triton kernels of the fused feature-regression loss, each one grid over every level of the loss.

Notation, per level: r = regressed student map, g = raw teacher map, both (B, C, H, W) addressed through
their own strides; P = H * W pixels; a "pixel row" is the C values of one (b, p).

    g~[b, :, p] = (g[b, :, p] - mean[b, p]) * rstd[b, p]         LayerNorm over C, no affine (or g itself)
    q_r[b, p]   = sum_c r^2,  q_g[b, p] = sum_c g~^2 = m2 * rstd^2   (m2 = sum_c (g - mean)^2)
    at[b]       = || q_r / max(|q_r|, eps) - q_g / max(|q_g|, eps) ||_2

Gradient of the level's share of the loss, mean_l(mse_l + w * at_l), with respect to r (L levels, N = B*C*P):

    d mse_l / d r = 2 (r - g~) / N
    d at_l / d r  = (1 / B) * (d at[b] / d q_r[b, p]) * 2 r[b, c, p]
    d at[b] / d q_r = (u - qhat_r (qhat_r . u)) / |q_r|,  u = (qhat_r - qhat_g) / at[b]   (0 when at[b] = 0)

The per-sample norms and the dot product need every pixel of a sample before any dr can be written, so the
forward reads r and g once for per-pixel statistics and the loss terms, and the backward reads them again to
write grad_loss * dr directly (no dr is stored between the two):

    forward   _stats_kernel      r, g -> mean, rstd, q_r, q_g, sse = sum_c (r - g~)^2     (B, P) fp32 each
              _attention_kernel  q_r, q_g, sse -> at (B,), sse per sample (B,), at_coef (B, P) with
                                 d (w at_l) / d r = at_coef * r (w, 1/L, 1/B folded in)
              _reduce_kernel     at, sse per sample of every level -> loss, mse, at (three scalars)
    backward  _grad_kernel       r, g, mean, rstd, at_coef, grad_loss -> grad_loss * dr (like r)

Levels differ in shape, so the maps come as tuples (one entry per level; Triton specialises each entry's
alignment like any argument) and a kernel's body is unrolled once per level: the pixel kernels' programs are the
levels' tiles one after another, the attention kernel's one per (sample, level). A 3-level loss is four launches
forward and backward, whatever the level count; the per-pixel values of all levels share one (3, B * sum P)
array. The scalars are reduced by one program in a fixed order (no atomics): the same on every run.

Every kernel reads in the input dtype and accumulates in fp32. The channel means, sums of squared deviations
and the co-moment sum_c (r - r_bar)(g - g_bar) are free of E[x^2] - E[x]^2 cancellation when teacher features
have a large mean: merged block by block with Chan's parallel formulas for channels_last, from shifted sums
reduced once after the channel loop for NCHW (no cross-warp reduction inside it). sse is expanded from them:
sum (r - g~)^2 = sum r^2 - 2 sum r g~ + sum g~^2. Its rounding is about 1e-7 of sum r^2 + sum g~^2 per pixel,
which only the reported mse sees when r is already very close to g~; the gradient is elementwise and exact.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# (BLOCK_C, BLOCK_P, num_warps): a [BLOCK_C, BLOCK_P] tile is loaded per step of the channel loop. Wide in P for
# NCHW (pixels are contiguous), wide in C for channels_last (channels are contiguous); the autotuner keys on the
# channel stride so each layout keeps its own winner. num_stages=2 keeps shared memory small on every arch.
PIXEL_TILE_CONFIGS = [
    triton.Config({"BLOCK_C": 8, "BLOCK_P": 256}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_C": 16, "BLOCK_P": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_C": 32, "BLOCK_P": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_C": 64, "BLOCK_P": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_C": 32, "BLOCK_P": 128}, num_warps=8, num_stages=2),
]
ATTENTION_BLOCK = 1024  # pixels per step of the per-sample reduction (one program per sample and level)
ATTENTION_WARPS = 4
REDUCE_BLOCK = 256  # (level, sample) values per step of the one-program scalar reduction
AUTOTUNE_KEY = ["CS", "PS", "R_STRIDES", "G_STRIDES"]


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs(config: triton.Config, pixels: tuple[int, ...], batch: int) -> int:
    """Programs a pixel-kernel launch with `config` runs: one per BLOCK_P pixels of each sample of each level."""
    return sum(triton.cdiv(p, config.kwargs["BLOCK_P"]) for p in pixels) * batch


def keep_tiles_that_fill_the_gpu(configs: list, named_args: dict, multiprocessors: int | None = None, **_) -> list:
    """The autotuner's early prune: drop tiles whose grid leaves SMs idle.

    At small levels a wide pixel tile makes few programs ((64, 512, 16, 16) with BLOCK_P=256: 64 programs for
    132 SMs), and the autotuner, timing one launch at a time, can still pick it. Configs giving at least one
    program per SM are kept; when none does, the ones giving the most programs.
    """
    r = named_args["RS"][0]
    if multiprocessors is None and r.device.type != "cuda":
        return configs  # captured for an ahead-of-time compile: no GPU to count SMs of, compile every tile
    sms = multiprocessors or _multiprocessors(r.device.index or 0)
    counts = {id(c): programs(c, named_args["PS"], r.shape[0]) for c in configs}
    filling = [c for c in configs if counts[id(c)] >= sms]
    return filling or [c for c in configs if counts[id(c)] == max(counts.values())]


PRUNE = {"early_config_prune": keep_tiles_that_fill_the_gpu}


@triton.jit
def _pixel_rows(X, b, p, W, stride_b, stride_h, stride_w, FLAT_PIXELS: tl.constexpr):
    """Pointers to channel 0 of pixels p of sample b in a (B, C, H, W) map; add c * stride_c for channel c."""
    if FLAT_PIXELS:  # stride_h = W * stride_w (NCHW, channels_last): one pixel axis the compiler can vectorise
        return X + b.to(tl.int64) * stride_b + p * stride_w
    # Pixels are flattened as p = h * W + w, but the strides stay separate so other views work; the compiler
    # cannot see that p // W and p % W walk memory contiguously, so small W load an element at a time.
    return X + b.to(tl.int64) * stride_b + (p // W) * stride_h + (p % W) * stride_w


@triton.jit
def _load_channel_block(r_rows, g_rows, c0, C, p_mask, stride_rc, stride_gc, BLOCK_C: tl.constexpr):
    """[BLOCK_C, BLOCK_P] tiles of r and g in fp32 (0 outside the map), their mask and channel indices."""
    c = c0 + tl.arange(0, BLOCK_C)
    mask = (c < C)[:, None] & p_mask[None, :]
    r = tl.load(r_rows[None, :] + c[:, None] * stride_rc, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_rows[None, :] + c[:, None] * stride_gc, mask=mask, other=0.0).to(tl.float32)
    return r, g, mask, c


@triton.jit
def _moments_merged(r_rows, g_rows, C, p_mask, stride_rc, stride_gc, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per pixel: channel means of r and g, their sums of squared deviations and the co-moment
    sum_c (r - r_bar)(g - g_bar), merged channel block by channel block with Chan's formulas.

    For channels_last, where a tile's channels sit in one warp's lanes and per-block reductions are shuffles:
    five [BLOCK_P] running values keep registers low.
    """
    r_mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    r_m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    g_mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    g_m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    co = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        r, g, mask, c = _load_channel_block(r_rows, g_rows, c0, C, p_mask, stride_rc, stride_gc, BLOCK_C)
        seen = c0 * 1.0  # channels merged so far, as fp32 (c0 is a Python int in the interpreter)
        count = tl.sum((c < C).to(tl.float32), axis=0)
        r_block, g_block = tl.sum(r, axis=0) / count, tl.sum(g, axis=0) / count
        r_centred = tl.where(mask, r - r_block[None, :], 0.0)
        g_centred = tl.where(mask, g - g_block[None, :], 0.0)
        r_delta, g_delta = r_block - r_mean, g_block - g_mean
        weight = seen * count / (seen + count)
        r_m2 += tl.sum(r_centred * r_centred, axis=0) + r_delta * r_delta * weight
        g_m2 += tl.sum(g_centred * g_centred, axis=0) + g_delta * g_delta * weight
        co += tl.sum(r_centred * g_centred, axis=0) + r_delta * g_delta * weight
        r_mean += r_delta * (count / (seen + count))
        g_mean += g_delta * (count / (seen + count))
    return r_mean, g_mean, r_m2, g_m2, co


@triton.jit
def _moments_shifted(r_rows, g_rows, C, p_mask, stride_rc, stride_gc, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The same five values from sums of values shifted by the first channel block's mean.

    For NCHW, where a tile's channels are split across warps and every per-block reduction would go through
    shared memory behind a barrier: the sums stay [BLOCK_C, BLOCK_P] and are reduced once, after the loop. The
    shift is within the channel spread of the pixel, so sum x^2 - (sum x)^2 / C loses nothing to a large
    channel mean (teacher features have one).
    """
    r, g, mask, c = _load_channel_block(r_rows, g_rows, 0, C, p_mask, stride_rc, stride_gc, BLOCK_C)
    count = tl.sum((c < C).to(tl.float32), axis=0)
    r_shift, g_shift = tl.sum(r, axis=0) / count, tl.sum(g, axis=0) / count
    acc_r = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    acc_rr = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    acc_gg = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    acc_rg = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        r, g, mask, c = _load_channel_block(r_rows, g_rows, c0, C, p_mask, stride_rc, stride_gc, BLOCK_C)
        r = tl.where(mask, r - r_shift[None, :], 0.0)
        g = tl.where(mask, g - g_shift[None, :], 0.0)
        acc_r += r
        acc_g += g
        acc_rr += r * r
        acc_gg += g * g
        acc_rg += r * g
    sum_r, sum_g = tl.sum(acc_r, axis=0), tl.sum(acc_g, axis=0)
    r_m2 = tl.maximum(tl.sum(acc_rr, axis=0) - sum_r * sum_r / C, 0.0)
    g_m2 = tl.maximum(tl.sum(acc_gg, axis=0) - sum_g * sum_g / C, 0.0)
    co = tl.sum(acc_rg, axis=0) - sum_r * sum_g / C
    return r_shift + sum_r / C, g_shift + sum_g / C, r_m2, g_m2, co


@triton.jit
def _level_end(start, P, B, BLOCK_P: tl.constexpr):
    """The first program after a level whose tiles (BLOCK_P pixels of one sample each) start at `start`."""
    return start + tl.cdiv(P, BLOCK_P) * B


@triton.jit
def _tile(pid, start, P, BLOCK_P: tl.constexpr):
    """Sample b and pixels p of program `pid` in a level whose tiles start at `start`, sample-major."""
    per_sample = tl.cdiv(P, BLOCK_P)
    local = pid - start
    return local // per_sample, (local % per_sample) * BLOCK_P + tl.arange(0, BLOCK_P)


@triton.jit
def _stats_tile(R, G, STATS, SCRATCH, T, out, b, p, C, W, P, r_strides, g_strides, eps, WHITEN: tl.constexpr,
                FLAT_PIXELS: tl.constexpr, PIXELS_CONTIGUOUS: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_P: tl.constexpr):  # fmt: skip
    """Statistics of pixels p of sample b of one level, into columns `out + b * P + p` of STATS and SCRATCH."""
    p_mask = p < P
    r_rows = _pixel_rows(R, b, p, W, r_strides[0], r_strides[2], r_strides[3], FLAT_PIXELS)
    g_rows = _pixel_rows(G, b, p, W, g_strides[0], g_strides[2], g_strides[3], FLAT_PIXELS)
    if PIXELS_CONTIGUOUS:
        r_mean, g_mean, r_m2, g_m2, co = _moments_shifted(
            r_rows, g_rows, C, p_mask, r_strides[1], g_strides[1], BLOCK_C, BLOCK_P
        )
    else:
        r_mean, g_mean, r_m2, g_m2, co = _moments_merged(
            r_rows, g_rows, C, p_mask, r_strides[1], g_strides[1], BLOCK_C, BLOCK_P
        )

    q_r = r_m2 + C * r_mean * r_mean
    if WHITEN:
        # g~ = (g - g_bar) rstd has mean 0: Sum (r - g~)^2 = m2_r + C r_bar^2 - 2 rstd co + Sum g~^2.
        rstd = 1.0 / tl.sqrt(g_m2 / C + eps)
        q_g = g_m2 * rstd * rstd
        cross = co * rstd
        mean = g_mean
    else:
        rstd = tl.full([BLOCK_P], 1.0, dtype=tl.float32)
        q_g = g_m2 + C * g_mean * g_mean
        cross = co + C * r_mean * g_mean
        mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    column = out + b.to(tl.int64) * P + p
    tl.store(STATS + column, mean, mask=p_mask)
    tl.store(STATS + T + column, rstd, mask=p_mask)
    tl.store(SCRATCH + column, q_r, mask=p_mask)
    tl.store(SCRATCH + T + column, q_g, mask=p_mask)
    tl.store(SCRATCH + 2 * T + column, tl.maximum(q_r - 2.0 * cross + q_g, 0.0), mask=p_mask)


@triton.autotune(configs=PIXEL_TILE_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _stats_kernel(
    RS,  # student maps r, one (B, C_l, H_l, W_l) per level
    GS,  # teacher maps g, same shapes
    STATS,  # out: (3, T) fp32, rows mean and rstd (row 2, at_coef, is the attention kernel's); see the launcher
    SCRATCH,  # out: (3, T) fp32, rows q_r, q_g, sse
    T,  # columns of STATS and SCRATCH: B * sum_l P_l
    B,
    CS,  # per level: channels
    WS,  # per level: width
    PS,  # per level: pixels H * W
    OUTS,  # per level: its first column of STATS (level l, sample b, pixel p sits at OUTS[l] + b * P_l + p)
    R_STRIDES,  # per level: r's (stride_b, stride_c, stride_h, stride_w)
    G_STRIDES,  # per level: g's strides
    eps,  # LayerNorm epsilon
    WHITEN: tl.constexpr,
    FLAT_PIXELS: tl.constexpr,  # every map has stride_h = W * stride_w (see `_pixel_rows`)
    PIXELS_CONTIGUOUS: tl.constexpr,  # r's pixels are its unit-stride axis (NCHW): see `_moments_shifted`
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # One grid over every level: the levels' tiles follow one another (see `_level_tile`).
    pid = tl.program_id(0)
    start = 0
    for level in tl.static_range(len(RS)):
        end = _level_end(start, PS[level], B, BLOCK_P)
        # Nothing vector-shaped outside the branch: pixel offsets computed here for every level cost 30 registers.
        if (pid >= start) & (pid < end):
            b, p = _tile(pid, start, PS[level], BLOCK_P)
            _stats_tile(RS[level], GS[level], STATS, SCRATCH, T, OUTS[level], b, p, CS[level], WS[level], PS[level],
                        R_STRIDES[level], G_STRIDES[level], eps, WHITEN, FLAT_PIXELS, PIXELS_CONTIGUOUS, BLOCK_C,
                        BLOCK_P)  # fmt: skip
        start = end


@triton.jit
def _attention_sample(STATS, SCRATCH, T, AT, SSE_SAMPLE, sample, base, P, norm_eps, grad_scale, BLOCK: tl.constexpr):
    """The attention term of one sample of one level, whose P pixels sit at columns base.. of STATS: at and the
    sum of sse into AT / SSE_SAMPLE[sample], at_coef into row 2 of STATS."""
    offsets = tl.arange(0, BLOCK)
    q_r_row, q_g_row = SCRATCH + base, SCRATCH + T + base
    sum_rr = tl.zeros([BLOCK], dtype=tl.float32)
    sum_gg = tl.zeros([BLOCK], dtype=tl.float32)
    sum_sse = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, P, BLOCK):
        mask = p0 + offsets < P
        q_r = tl.load(q_r_row + p0 + offsets, mask=mask, other=0.0)
        q_g = tl.load(q_g_row + p0 + offsets, mask=mask, other=0.0)
        sum_rr += q_r * q_r
        sum_gg += q_g * q_g
        sum_sse += tl.load(SCRATCH + 2 * T + base + p0 + offsets, mask=mask, other=0.0)
    tl.store(SSE_SAMPLE + sample, tl.sum(sum_sse, axis=0))
    norm_r = tl.sqrt(tl.sum(sum_rr, axis=0))
    scale_r = 1.0 / tl.maximum(norm_r, norm_eps)
    scale_g = 1.0 / tl.maximum(tl.sqrt(tl.sum(sum_gg, axis=0)), norm_eps)

    # The distance from the difference itself, not from |a|^2 + |b|^2 - 2 a.b, which cancels when the maps agree.
    sum_dd = tl.zeros([BLOCK], dtype=tl.float32)
    sum_rd = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, P, BLOCK):
        mask = p0 + offsets < P
        qhat_r = tl.load(q_r_row + p0 + offsets, mask=mask, other=0.0) * scale_r
        diff = qhat_r - tl.load(q_g_row + p0 + offsets, mask=mask, other=0.0) * scale_g
        sum_dd += diff * diff
        sum_rd += qhat_r * diff
    distance = tl.sqrt(tl.sum(sum_dd, axis=0))
    tl.store(AT + sample, distance)

    inv_distance = tl.where(distance > 0, 1.0 / tl.maximum(distance, 1e-30), 0.0)
    # Below the clamp the normaliser is the constant eps, so its projection term vanishes (as clamp_min's grad).
    projection = tl.where(norm_r >= norm_eps, tl.sum(sum_rd, axis=0) * inv_distance, 0.0)
    for p0 in range(0, P, BLOCK):
        mask = p0 + offsets < P
        qhat_r = tl.load(q_r_row + p0 + offsets, mask=mask, other=0.0) * scale_r
        diff = qhat_r - tl.load(q_g_row + p0 + offsets, mask=mask, other=0.0) * scale_g
        grad_q = (diff * inv_distance - qhat_r * projection) * scale_r
        tl.store(STATS + 2 * T + base + p0 + offsets, grad_q * grad_scale, mask=mask)


@triton.jit
def _attention_kernel(
    STATS,  # (3, T) fp32 from `_stats_kernel`; row 2 (at_coef) is written here
    SCRATCH,  # (3, T) fp32 from `_stats_kernel`: q_r, q_g, sse
    T,
    AT,  # out: (L, B) fp32, at[l, b] = |qhat_r - qhat_g|
    SSE_SAMPLE,  # out: (L, B) fp32, sum of sse over the sample's pixels
    B,
    PS,  # per level: pixels
    OUTS,  # per level: first column of STATS
    norm_eps,  # lower clamp of |q| (as in the reference)
    grad_scale,  # 2 w / (L * B): the AT weight w, the 2 of d q_r / d r = 2 r and the two means
    BLOCK: tl.constexpr,
):
    # One program per (sample, level): the norms need every pixel of the sample.
    b, level_id = tl.program_id(0), tl.program_id(1)
    for level in tl.static_range(len(PS)):
        if level_id == level:
            base = OUTS[level] + b.to(tl.int64) * PS[level]
            sample = level * B + b
            _attention_sample(STATS, SCRATCH, T, AT, SSE_SAMPLE, sample, base, PS[level], norm_eps, grad_scale, BLOCK)


@triton.jit
def _reduce_kernel(
    AT,  # (L, B) fp32
    SSE_SAMPLE,  # (L, B) fp32
    LOSS,  # out: () fp32, mse + w * at
    MSE,  # out: () fp32, mean over levels of sse / N_l
    AT_MEAN,  # out: () fp32, mean over levels and samples of at
    B,
    INV_NUMELS,  # per level: 1 / N_l (N_l = B * C_l * P_l)
    at_weight,
    BLOCK: tl.constexpr,
):
    # One program, in a fixed order: the scalars come out the same on every run (no atomics).
    offsets = tl.arange(0, BLOCK)
    num_levels: tl.constexpr = len(INV_NUMELS)
    sum_at = tl.zeros([BLOCK], dtype=tl.float32)
    sum_mse = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, num_levels * B, BLOCK):
        i = i0 + offsets
        mask = i < num_levels * B
        sum_at += tl.load(AT + i, mask=mask, other=0.0)
        weight = tl.zeros([BLOCK], dtype=tl.float32)
        for level in tl.static_range(num_levels):
            weight = tl.where(i // B == level, INV_NUMELS[level], weight)
        sum_mse += tl.load(SSE_SAMPLE + i, mask=mask, other=0.0) * weight
    mse = tl.sum(sum_mse, axis=0) / num_levels
    at = tl.sum(sum_at, axis=0) / (num_levels * B)
    tl.store(MSE, mse)
    tl.store(AT_MEAN, at)
    tl.store(LOSS, mse + at_weight * at)


@triton.jit
def _grad_tile(R, G, DR, STATS, T, out, b, p, C, W, P, r_strides, g_strides, d_strides, mse_coef, grad_loss,
               FLAT_PIXELS: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """grad_loss * dr at pixels p of sample b of one level."""
    p_mask = p < P
    r_rows = _pixel_rows(R, b, p, W, r_strides[0], r_strides[2], r_strides[3], FLAT_PIXELS)
    g_rows = _pixel_rows(G, b, p, W, g_strides[0], g_strides[2], g_strides[3], FLAT_PIXELS)
    dr_rows = _pixel_rows(DR, b, p, W, d_strides[0], d_strides[2], d_strides[3], FLAT_PIXELS)
    column = out + b.to(tl.int64) * P + p
    mean = tl.load(STATS + column, mask=p_mask, other=0.0)
    rstd = tl.load(STATS + T + column, mask=p_mask, other=0.0)
    at_coef = tl.load(STATS + 2 * T + column, mask=p_mask, other=0.0) * grad_loss
    for c0 in range(0, C, BLOCK_C):
        r, g, mask, c = _load_channel_block(r_rows, g_rows, c0, C, p_mask, r_strides[1], g_strides[1], BLOCK_C)
        dr = mse_coef * (r - (g - mean[None, :]) * rstd[None, :]) + at_coef[None, :] * r
        tl.store(dr_rows[None, :] + c[:, None] * d_strides[1], dr.to(DR.dtype.element_ty), mask=mask)


@triton.autotune(configs=PIXEL_TILE_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _grad_kernel(
    RS,  # student maps r, one (B, C_l, H_l, W_l) per level
    GS,  # teacher maps g
    DRS,  # out: grad_loss * d loss / d r per level, in r's dtype, own strides
    STATS,  # (3, T) fp32: rows mean, rstd, at_coef, as the forward left them
    T,
    GRAD_LOSS,  # () fp32: the incoming gradient of the loss, read on the device (no host sync)
    B,
    CS,
    WS,
    PS,
    OUTS,
    R_STRIDES,
    G_STRIDES,
    D_STRIDES,  # per level: the gradient's strides
    MSE_SCALES,  # per level: 2 / (L * N_l)
    FLAT_PIXELS: tl.constexpr,  # every map has stride_h = W * stride_w (see `_pixel_rows`)
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    grad_loss = tl.load(GRAD_LOSS)
    start = 0
    for level in tl.static_range(len(RS)):
        end = _level_end(start, PS[level], B, BLOCK_P)
        if (pid >= start) & (pid < end):
            b, p = _tile(pid, start, PS[level], BLOCK_P)
            _grad_tile(RS[level], GS[level], DRS[level], STATS, T, OUTS[level], b, p, CS[level], WS[level],
                       PS[level], R_STRIDES[level], G_STRIDES[level], D_STRIDES[level],
                       MSE_SCALES[level] * grad_loss, grad_loss, FLAT_PIXELS, BLOCK_C)  # fmt: skip
        start = end

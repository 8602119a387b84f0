"""Triton kernels of the fused feature-regression loss (one level; the launcher loops over levels).

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
    backward  _grad_kernel       r, g, mean, rstd, at_coef, grad_loss -> grad_loss * dr (like r)

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
ATTENTION_BLOCK = 1024  # pixels per step of the per-sample reduction (one program per sample)
ATTENTION_WARPS = 4
AUTOTUNE_KEY = ["C", "P", "stride_rc", "stride_gc"]


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs(config: triton.Config, pixels: int, batch: int) -> int:
    """Programs a pixel-kernel launch with `config` runs: one per BLOCK_P pixels of each sample."""
    return triton.cdiv(pixels, config.kwargs["BLOCK_P"]) * batch


def keep_tiles_that_fill_the_gpu(configs: list, named_args: dict, multiprocessors: int | None = None, **_) -> list:
    """The autotuner's early prune: drop tiles whose grid leaves SMs idle.

    At small levels a wide pixel tile makes few programs ((64, 512, 16, 16) with BLOCK_P=256: 64 programs for
    132 SMs), and the autotuner, timing one launch at a time, can still pick it. Configs giving at least one
    program per SM are kept; when none does, the ones giving the most programs.
    """
    r = named_args["R"]
    sms = multiprocessors or _multiprocessors(r.device.index or 0)
    counts = {id(c): programs(c, named_args["P"], r.shape[0]) for c in configs}
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


@triton.autotune(configs=PIXEL_TILE_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _stats_kernel(
    R,  # student map r, (B, C, H, W)
    G,  # teacher map g, (B, C, H, W)
    MEAN,  # out: (B, P) fp32, channel mean of g (0 without whitening)
    RSTD,  # out: (B, P) fp32, 1 / sqrt(var_c(g) + eps) (1 without whitening)
    Q_R,  # out: (B, P) fp32, sum_c r^2
    Q_G,  # out: (B, P) fp32, sum_c g~^2
    SSE,  # out: (B, P) fp32, sum_c (r - g~)^2
    C,
    W,
    P,
    stride_rb,
    stride_rc,
    stride_rh,
    stride_rw,
    stride_gb,
    stride_gc,
    stride_gh,
    stride_gw,
    eps,  # LayerNorm epsilon
    WHITEN: tl.constexpr,
    FLAT_PIXELS: tl.constexpr,  # every map has stride_h = W * stride_w (see `_pixel_rows`)
    PIXELS_CONTIGUOUS: tl.constexpr,  # r's pixels are its unit-stride axis (NCHW): see `_moments_shifted`
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    r_rows = _pixel_rows(R, b, p, W, stride_rb, stride_rh, stride_rw, FLAT_PIXELS)
    g_rows = _pixel_rows(G, b, p, W, stride_gb, stride_gh, stride_gw, FLAT_PIXELS)

    if PIXELS_CONTIGUOUS:
        r_mean, g_mean, r_m2, g_m2, co = _moments_shifted(
            r_rows, g_rows, C, p_mask, stride_rc, stride_gc, BLOCK_C, BLOCK_P
        )
    else:
        r_mean, g_mean, r_m2, g_m2, co = _moments_merged(
            r_rows, g_rows, C, p_mask, stride_rc, stride_gc, BLOCK_C, BLOCK_P
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
    out = b.to(tl.int64) * P + p
    tl.store(MEAN + out, mean, mask=p_mask)
    tl.store(RSTD + out, rstd, mask=p_mask)
    tl.store(Q_R + out, q_r, mask=p_mask)
    tl.store(Q_G + out, q_g, mask=p_mask)
    tl.store(SSE + out, tl.maximum(q_r - 2.0 * cross + q_g, 0.0), mask=p_mask)


@triton.jit
def _attention_kernel(
    Q_R,  # (B, P) fp32, sum_c r^2
    Q_G,  # (B, P) fp32, sum_c g~^2
    AT,  # out: (B,) fp32, at[b] = |qhat_r - qhat_g|
    AT_COEF,  # out: (B, P) fp32, d (w at_l) / d r = AT_COEF * r: grad_scale (w, the two means, the 2) folded in
    SSE,  # (B, P) fp32, sum_c (r - g~)^2 per pixel
    SSE_SAMPLE,  # out: (B,) fp32, its sum over the sample's pixels
    P,
    norm_eps,  # lower clamp of |q| (as in the reference)
    grad_scale,  # 2 w / (num_levels * B): the AT weight w, the 2 of d q_r / d r = 2 r and the two means
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    base = b.to(tl.int64) * P
    offsets = tl.arange(0, BLOCK)

    sum_rr = tl.zeros([BLOCK], dtype=tl.float32)
    sum_gg = tl.zeros([BLOCK], dtype=tl.float32)
    sum_sse = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, P, BLOCK):
        mask = p0 + offsets < P
        q_r = tl.load(Q_R + base + p0 + offsets, mask=mask, other=0.0)
        q_g = tl.load(Q_G + base + p0 + offsets, mask=mask, other=0.0)
        sum_rr += q_r * q_r
        sum_gg += q_g * q_g
        sum_sse += tl.load(SSE + base + p0 + offsets, mask=mask, other=0.0)
    tl.store(SSE_SAMPLE + b, tl.sum(sum_sse, axis=0))
    norm_r = tl.sqrt(tl.sum(sum_rr, axis=0))
    scale_r = 1.0 / tl.maximum(norm_r, norm_eps)
    scale_g = 1.0 / tl.maximum(tl.sqrt(tl.sum(sum_gg, axis=0)), norm_eps)

    # The distance from the difference itself, not from |a|^2 + |b|^2 - 2 a.b, which cancels when the maps agree.
    sum_dd = tl.zeros([BLOCK], dtype=tl.float32)
    sum_rd = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, P, BLOCK):
        mask = p0 + offsets < P
        qhat_r = tl.load(Q_R + base + p0 + offsets, mask=mask, other=0.0) * scale_r
        diff = qhat_r - tl.load(Q_G + base + p0 + offsets, mask=mask, other=0.0) * scale_g
        sum_dd += diff * diff
        sum_rd += qhat_r * diff
    distance = tl.sqrt(tl.sum(sum_dd, axis=0))
    tl.store(AT + b, distance)

    inv_distance = tl.where(distance > 0, 1.0 / tl.maximum(distance, 1e-30), 0.0)
    # Below the clamp the normaliser is the constant eps, so its projection term vanishes (as clamp_min's grad).
    projection = tl.where(norm_r >= norm_eps, tl.sum(sum_rd, axis=0) * inv_distance, 0.0)
    for p0 in range(0, P, BLOCK):
        mask = p0 + offsets < P
        qhat_r = tl.load(Q_R + base + p0 + offsets, mask=mask, other=0.0) * scale_r
        diff = qhat_r - tl.load(Q_G + base + p0 + offsets, mask=mask, other=0.0) * scale_g
        grad_q = (diff * inv_distance - qhat_r * projection) * scale_r
        tl.store(AT_COEF + base + p0 + offsets, grad_q * grad_scale, mask=mask)


@triton.autotune(configs=PIXEL_TILE_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _grad_kernel(
    R,  # student map r, (B, C, H, W)
    G,  # teacher map g, (B, C, H, W)
    DR,  # out: grad_loss * d loss / d r, (B, C, H, W) in r's dtype, own strides
    MEAN,  # (B, P) fp32
    RSTD,  # (B, P) fp32
    AT_COEF,  # (B, P) fp32
    GRAD_LOSS,  # () fp32: the incoming gradient of the loss, read on the device (no host sync)
    C,
    W,
    P,
    stride_rb,
    stride_rc,
    stride_rh,
    stride_rw,
    stride_gb,
    stride_gc,
    stride_gh,
    stride_gw,
    stride_db,
    stride_dc,
    stride_dh,
    stride_dw,
    mse_scale,  # 2 / (num_levels * N)
    FLAT_PIXELS: tl.constexpr,  # every map has stride_h = W * stride_w (see `_pixel_rows`)
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    r_rows = _pixel_rows(R, b, p, W, stride_rb, stride_rh, stride_rw, FLAT_PIXELS)
    g_rows = _pixel_rows(G, b, p, W, stride_gb, stride_gh, stride_gw, FLAT_PIXELS)
    dr_rows = _pixel_rows(DR, b, p, W, stride_db, stride_dh, stride_dw, FLAT_PIXELS)
    stats = b.to(tl.int64) * P + p
    grad_loss = tl.load(GRAD_LOSS)
    mean = tl.load(MEAN + stats, mask=p_mask, other=0.0)
    rstd = tl.load(RSTD + stats, mask=p_mask, other=0.0)
    at_coef = tl.load(AT_COEF + stats, mask=p_mask, other=0.0) * grad_loss
    mse_coef = mse_scale * grad_loss

    for c0 in range(0, C, BLOCK_C):
        r, g, mask, c = _load_channel_block(r_rows, g_rows, c0, C, p_mask, stride_rc, stride_gc, BLOCK_C)
        dr = mse_coef * (r - (g - mean[None, :]) * rstd[None, :]) + at_coef[None, :] * r
        tl.store(dr_rows[None, :] + c[:, None] * stride_dc, dr.to(DR.dtype.element_ty), mask=mask)

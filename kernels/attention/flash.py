"""Flash-style attention in Triton: forward with online softmax, backward for dQ, dK, dV.

    O = softmax(scale * Q K^T) V          Q, K, V, O: (B, H, N, D), any strides; non-causal, no mask

Forward (per query tile of BLOCK_M rows, looping over key tiles of BLOCK_N rows; the N x N matrix never exists):
    s     = scale * log2(e) * q k^T                  scores in base 2, so the kernel uses exp2
    m'    = max(m, rowmax(s))                        running row maximum
    p     = 2^(s - m'),  alpha = 2^(m - m')          alpha rescales what was accumulated under the old maximum
    l     = alpha * l + rowsum(p),  acc = alpha * acc + p v
    O     = acc / l,  LSE = ln(2) * (m + log2(l))    natural-log sum of exp(scale * q k^T), kept for the backward

Backward (FlashAttention-2): with P = exp(scale * Q K^T - LSE) recomputed tile by tile and dO the upstream grad,
    delta = rowsum(dO * O)                           = rowsum(P * dP), computed once by a small preprocess kernel
    dV    = P^T dO,  dP = dO V^T,  dS = P * (dP - delta)
    dQ    = scale * dS K,  dK = scale * dS^T Q
One kernel owns a key tile and loops over queries (dK, dV) and adds each query tile's dQ share into an fp32
buffer with atomics: five GEMMs per pair of tiles, but the order of the additions varies, so dQ is not
bit-reproducible. Under `torch.use_deterministic_algorithms(True)` (or `deterministic=True`), and for head dims
over 128 lanes (160: the extra dQ tile would spill), a second kernel owns a query tile and loops over keys for dQ
instead: no atomics, seven GEMMs (it recomputes P and dP).

Head dims that are not a power of two (40, 72, 80, 160) run as two power-of-two chunks (72 = 64 + 16, 160 = 128 +
32; `head_dim_chunks`) in the forward and in the backward's two tile kernels, with masked loads (padded lanes
read 0, contribute 0 to every dot product, and are never stored); N need not be a multiple of any
block size (out-of-range keys get score -inf, out-of-range queries are never stored). Every kernel's inner loop
runs unmasked over whole tiles; only when N is not a multiple of the loop's tile (`RAGGED_KEYS`, `RAGGED`) is one
last, masked tile peeled off after it. The teachers' N (64 to 4096) need none.

Cautions: fp16/bf16 on GPU (fp32 accumulate); fp32 inputs would run tl.dot in TF32, so the op layer sends fp32
on CUDA elsewhere. Under TRITON_INTERPRET=1 (set before Triton is imported) the same kernels run on CPU tensors
in Triton's interpreter (fp32, slow: tests only). Q, K and V share one sequence length (self-attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dtkernels import interpreter
from dtkernels.attention.configs import (
    FORWARD_TUNING_SPACE,
    KernelConfig,
    atomic_dq_fits,
    backward_configs,
    configs_for,
    forward_config,
    forward_configs_that_fit,
    head_dim_chunks,
    padded_head_dim,
)
from dtkernels.interpreter import INTERPRETED

LOG2E = 1.4426950408889634


@triton.jit
def _program_batch_head(num_heads):
    """(batch * num_heads + head, batch, head) of this program; batch and head in int64, because the base offsets
    of big batches overflow int32."""
    batch_head = tl.program_id(1)
    return batch_head, (batch_head // num_heads).to(tl.int64), (batch_head % num_heads).to(tl.int64)


@triton.jit
def _aligned(stride, ALIGNED: tl.constexpr):
    """`stride`, provably a multiple of 8 elements to the compiler when the launcher checked that it is (see
    `vector_aligned`): with 16-byte aligned pointers, rows then start on 16 bytes and load as 128-bit vectors
    (cp.async) even at D = 40 or 72, whose strides miss the JIT's own hint (divisible by 16). Written as
    (stride // 8) * 8, the same value, because `tl.multiple_of` on a scalar argument is dropped."""
    if ALIGNED:
        stride = (stride // 8) * 8
    return stride


@triton.jit
def _tile_ptrs(X, batch, head, rows, offs_d, stride_b, stride_h, stride_n, stride_d, ALIGNED: tl.constexpr):
    """(len(rows), BLOCK_D) pointers to X[batch, head, rows, :]."""
    row0 = X + batch * _aligned(stride_b, ALIGNED) + head * _aligned(stride_h, ALIGNED)
    return row0 + rows[:, None] * _aligned(stride_n, ALIGNED) + offs_d[None, :] * stride_d


@triton.jit
def _load_tile(X, batch, head, rows, offs_d, stride_b, stride_h, stride_n, stride_d, ALIGNED: tl.constexpr, mask):
    """The (len(rows), BLOCK_D) tile X[batch, head, rows, :], 0 where `mask` is False (padded lanes, rows past N)."""
    ptrs = _tile_ptrs(X, batch, head, rows, offs_d, stride_b, stride_h, stride_n, stride_d, ALIGNED)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _head_dim_lanes(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Lanes and masks of the two head-dim chunks (the tail's are the head's when BLOCK_T = 0: placeholders)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = offs_d
    if BLOCK_T > 0:
        offs_t = BLOCK_D + tl.arange(0, BLOCK_T)
    return offs_d, offs_t, offs_d < HEAD_DIM, offs_t < HEAD_DIM


@triton.jit
def _load_rows(X, DESC, batch, head, row0, rows, offs, lanes0, lane_mask, row_valid, stride_b, stride_h, stride_n,
               stride_d, ALIGNED: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_ROWS: tl.constexpr,
               BLOCK_LANES: tl.constexpr):  # fmt: skip
    """The (BLOCK_ROWS, BLOCK_LANES) tile X[batch, head, row0 + i, lanes0 + j]: through the tensor memory accelerator
    from descriptor DESC (which fills rows past N and lanes past D with 0 itself), or by masked pointer loads."""
    if USE_TMA:
        return DESC.load([batch.to(tl.int32), head.to(tl.int32), row0, lanes0]).reshape(BLOCK_ROWS, BLOCK_LANES)
    mask = (row_valid[:, None] & lane_mask[None, :]) if MASKED else lane_mask[None, :]
    return _load_tile(X, batch, head, rows, offs, stride_b, stride_h, stride_n, stride_d, ALIGNED, mask)


@triton.jit
def _fwd_key_tile(
    q, q_t, acc, acc_t, m_i, l_i,  # the query tile (and its tail chunk), the running state
    K, V, DESCS, batch, head, start_n, offs_n, offs_d, offs_t, d_mask, t_mask, seq_len,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    scale_log2e,
    ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,  # the tile holds rows past seq_len: mask them (only the last tile of a ragged N)
    USE_TMA: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tail-chunk lanes, 0 for none (q_t and acc_t are then placeholders, passed through)
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One step of the online softmax over the key rows start_n + offs_n: the new (acc, acc_t, m_i, l_i)."""
    offs_kv = start_n + offs_n
    kv_valid = offs_kv < seq_len
    k = _load_rows(K, DESCS[2], batch, head, start_n, offs_kv, offs_d, 0, d_mask, kv_valid, stride_kb, stride_kh,
                   stride_kn, stride_kd, ALIGNED, MASKED, USE_TMA, BLOCK_N, BLOCK_D)  # fmt: skip
    s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N)
    if BLOCK_T > 0:
        k_t = _load_rows(K, DESCS[3], batch, head, start_n, offs_kv, offs_t, BLOCK_D, t_mask, kv_valid, stride_kb,
                         stride_kh, stride_kn, stride_kd, ALIGNED, MASKED, USE_TMA, BLOCK_N, BLOCK_T)  # fmt: skip
        s = tl.dot(q_t, tl.trans(k_t), s)
    s = s * scale_log2e
    if MASKED:
        s = tl.where(kv_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(V, DESCS[4], batch, head, start_n, offs_kv, offs_d, 0, d_mask, kv_valid, stride_vb, stride_vh,
                   stride_vn, stride_vd, ALIGNED, MASKED, USE_TMA, BLOCK_N, BLOCK_D)  # fmt: skip
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    if BLOCK_T > 0:
        v_t = _load_rows(V, DESCS[5], batch, head, start_n, offs_kv, offs_t, BLOCK_D, t_mask, kv_valid, stride_vb,
                         stride_vh, stride_vn, stride_vd, ALIGNED, MASKED, USE_TMA, BLOCK_N, BLOCK_T)  # fmt: skip
        acc_t = tl.dot(p.to(v_t.dtype), v_t, acc_t * alpha[:, None])
    return acc, acc_t, m_new, l_i


@triton.jit
def _attention_fwd_kernel(
    Q,  # (B, H, N, D) queries
    K,  # (B, H, N, D) keys
    V,  # (B, H, N, D) values
    O,  # (B, H, N, D) output  # noqa: E741
    LSE,  # (B, H, N) fp32, contiguous: natural-log softmax normaliser per query row
    DESCS,  # with USE_TMA: TMA descriptors of q, q's tail chunk, k, k's tail, v, v's tail (else q, q, k, k, v, v)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    num_heads,
    seq_len,
    scale_log2e,  # softmax scale times log2(e)
    HEAD_DIM: tl.constexpr,
    ALIGNED: tl.constexpr,  # every B, H, N stride divides by 8 and every pointer by 16 bytes (`vector_aligned`)
    RAGGED_KEYS: tl.constexpr,  # seq_len % BLOCK_N != 0: the last key tile is masked (the others never are)
    USE_TMA: tl.constexpr,  # q, k, v tiles come through the tensor memory accelerator (sm_90+, opt-in)
    BLOCK_D: tl.constexpr,  # head-dim lanes of the first chunk, a power of two >= 16 (`head_dim_chunks`)
    BLOCK_T: tl.constexpr,  # lanes of the tail chunk after it, a power of two >= 16, or 0 for none
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    batch_head, batch, head = _program_batch_head(num_heads)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d, offs_t, d_mask, t_mask = _head_dim_lanes(HEAD_DIM, BLOCK_D, BLOCK_T)
    m_mask = offs_m < seq_len

    q = _load_rows(Q, DESCS[0], batch, head, start_m, offs_m, offs_d, 0, d_mask, m_mask, stride_qb,
                   stride_qh, stride_qn, stride_qd, ALIGNED, True, USE_TMA, BLOCK_M, BLOCK_D)  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BLOCK_T > 0:
        # The tail chunk (e.g. lanes 64..79 of D = 72 or 80): its own q tile, scores added to the first chunk's,
        # its own accumulator. Two power-of-two chunks do 0.6-0.8x the MMA work of one padded to 128 or 256.
        q_t = _load_rows(Q, DESCS[1], batch, head, start_m, offs_m, offs_t, BLOCK_D, t_mask, m_mask, stride_qb,
                         stride_qh, stride_qn, stride_qd, ALIGNED, True, USE_TMA, BLOCK_M, BLOCK_T)  # fmt: skip
        acc_t = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
    else:
        q_t, acc_t = q, acc  # placeholders the tile step passes through
    # Whole key tiles unmasked, then (ragged N only) the last one masked: the loop itself carries no key mask.
    full_tiles_end = seq_len - seq_len % BLOCK_N if RAGGED_KEYS else seq_len
    for start_n in range(0, full_tiles_end, BLOCK_N):
        acc, acc_t, m_i, l_i = _fwd_key_tile(
            q, q_t, acc, acc_t, m_i, l_i, K, V, DESCS, batch, head, start_n, offs_n, offs_d, offs_t, d_mask, t_mask,
            seq_len, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
            scale_log2e, ALIGNED, False, USE_TMA, BLOCK_D, BLOCK_T, BLOCK_N,
        )  # fmt: skip
    if RAGGED_KEYS:
        acc, acc_t, m_i, l_i = _fwd_key_tile(
            q, q_t, acc, acc_t, m_i, l_i, K, V, DESCS, batch, head, full_tiles_end, offs_n, offs_d, offs_t, d_mask,
            t_mask, seq_len, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
            scale_log2e, ALIGNED, True, USE_TMA, BLOCK_D, BLOCK_T, BLOCK_N,
        )  # fmt: skip

    tl.store(LSE + batch_head * seq_len + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_mask)
    o_ptrs = _tile_ptrs(O, batch, head, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od, ALIGNED)
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if BLOCK_T > 0:
        o_t_ptrs = _tile_ptrs(O, batch, head, offs_m, offs_t, stride_ob, stride_oh, stride_on, stride_od, ALIGNED)
        tl.store(o_t_ptrs, (acc_t / l_i[:, None]).to(O.dtype.element_ty), mask=m_mask[:, None] & t_mask[None, :])


@triton.jit
def _attention_bwd_delta_kernel(
    O,  # (B, H, N, D) forward output  # noqa: E741
    DO,  # (B, H, N, D) upstream gradient
    DELTA,  # (B, H, N) fp32, contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    num_heads,
    seq_len,
    HEAD_DIM: tl.constexpr,
    ALIGNED: tl.constexpr,  # every B, H, N stride divides by 8 and every pointer by 16 bytes (`vector_aligned`)
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    batch_head, batch, head = _program_batch_head(num_heads)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_len
    mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_ptrs = _tile_ptrs(O, batch, head, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od, ALIGNED)
    do_ptrs = _tile_ptrs(DO, batch, head, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod, ALIGNED)
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    do = tl.load(do_ptrs, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + batch_head * seq_len + offs_m, delta, mask=m_mask)


@triton.jit
def _load_chunks(X, batch, head, rows, offs_d, offs_t, d_mask, t_mask, row_valid, stride_b, stride_h, stride_n,
                 stride_d, ALIGNED: tl.constexpr, MASKED: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """The row tile X[batch, head, rows, :] as its head-dim chunks (x, x_t); x_t is x itself when BLOCK_T = 0.
    Rows past N (only when MASKED) and padded lanes read 0."""
    mask = (row_valid[:, None] & d_mask[None, :]) if MASKED else d_mask[None, :]
    x = _load_tile(X, batch, head, rows, offs_d, stride_b, stride_h, stride_n, stride_d, ALIGNED, mask)
    x_t = x
    if BLOCK_T > 0:
        mask_t = (row_valid[:, None] & t_mask[None, :]) if MASKED else t_mask[None, :]
        x_t = _load_tile(X, batch, head, rows, offs_t, stride_b, stride_h, stride_n, stride_d, ALIGNED, mask_t)
    return x, x_t


@triton.jit
def _dot_rows(a, a_t, b, b_t, BLOCK_T: tl.constexpr):
    """a b^T over both head-dim chunks: (rows of a, rows of b), fp32."""
    out = tl.dot(a, tl.trans(b))
    if BLOCK_T > 0:
        out = tl.dot(a_t, tl.trans(b_t), out)
    return out


@triton.jit
def _dkdv_query_tile(
    dk, dk_t, dv, dv_t, k, k_t, v, v_t,  # the accumulators and the key / value tile this program owns, by chunk
    Q, DO, LSE, DELTA, DQ_ACC, batch, head, row_base, rows, offs_d, offs_t, d_mask, t_mask, seq_len,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_dob, stride_doh, stride_don, stride_dod,
    scale, scale_log2e,
    HEAD_DIM: tl.constexpr,
    ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,  # the tile holds rows past seq_len (only the last tile of a ragged N)
    ATOMIC_DQ: tl.constexpr,  # also add this tile's share of dQ into DQ_ACC
    BLOCK_T: tl.constexpr,  # tail-chunk lanes, 0 for none (the *_t values are then placeholders, passed through)
):  # fmt: skip
    """dK and dV after the query rows `rows` (and, with ATOMIC_DQ, those rows' dQ from this key tile)."""
    row_valid = rows < seq_len
    if MASKED:
        # An out-of-range query row gets LSE = +inf, so its probabilities (and its dS) are exactly 0.
        lse = tl.load(LSE + row_base + rows, mask=row_valid, other=float("inf"))
        delta = tl.load(DELTA + row_base + rows, mask=row_valid, other=0.0)
    else:
        lse = tl.load(LSE + row_base + rows)
        delta = tl.load(DELTA + row_base + rows)
    q, q_t = _load_chunks(Q, batch, head, rows, offs_d, offs_t, d_mask, t_mask, row_valid, stride_qb, stride_qh,
                          stride_qn, stride_qd, ALIGNED, MASKED, BLOCK_T)  # fmt: skip
    do, do_t = _load_chunks(DO, batch, head, rows, offs_d, offs_t, d_mask, t_mask, row_valid, stride_dob, stride_doh,
                            stride_don, stride_dod, ALIGNED, MASKED, BLOCK_T)  # fmt: skip
    p_t = tl.exp2(_dot_rows(k, k_t, q, q_t, BLOCK_T) * scale_log2e - lse[None, :] * 1.4426950408889634)
    dv = tl.dot(p_t.to(do.dtype), do, dv)  # (BLOCK_N, BLOCK_M) @ (BLOCK_M, BLOCK_D)
    ds_t = p_t * (_dot_rows(v, v_t, do, do_t, BLOCK_T) - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk)
    if BLOCK_T > 0:
        dv_t = tl.dot(p_t.to(do_t.dtype), do_t, dv_t)
        dk_t = tl.dot(ds_t.to(q_t.dtype), q_t, dk_t)
    if ATOMIC_DQ:
        # The fifth GEMM: dQ[rows] += scale * dS K, added into an fp32 (B, H, N, D) buffer that every key tile's
        # program adds to, instead of a second kernel recomputing P and dP (two GEMMs more). The order of those
        # additions varies from run to run, so dQ is not bit-reproducible on this path.
        ds = tl.trans(ds_t * scale).to(k.dtype)  # (BLOCK_M, BLOCK_N)
        acc_rows = DQ_ACC + (row_base + rows).to(tl.int64)[:, None] * HEAD_DIM
        tl.atomic_add(acc_rows + offs_d[None, :], tl.dot(ds, k), mask=row_valid[:, None] & d_mask[None, :],
                      sem="relaxed")  # fmt: skip
        if BLOCK_T > 0:
            tl.atomic_add(acc_rows + offs_t[None, :], tl.dot(ds, k_t), mask=row_valid[:, None] & t_mask[None, :],
                          sem="relaxed")  # fmt: skip
    return dk, dk_t, dv, dv_t


@triton.jit
def _dq_key_tile(
    dq, dq_t, q, q_t, do, do_t, lse, delta,  # the accumulators and this program's query-side tiles (lse in base 2)
    K, V, batch, head, cols, offs_d, offs_t, d_mask, t_mask, seq_len,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    scale_log2e,
    ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,  # the tile holds key rows past seq_len (only the last tile of a ragged N)
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """dQ after the key rows `cols`."""
    col_valid = cols < seq_len
    k, k_t = _load_chunks(K, batch, head, cols, offs_d, offs_t, d_mask, t_mask, col_valid, stride_kb, stride_kh,
                          stride_kn, stride_kd, ALIGNED, MASKED, BLOCK_T)  # fmt: skip
    v, v_t = _load_chunks(V, batch, head, cols, offs_d, offs_t, d_mask, t_mask, col_valid, stride_vb, stride_vh,
                          stride_vn, stride_vd, ALIGNED, MASKED, BLOCK_T)  # fmt: skip
    p = tl.exp2(_dot_rows(q, q_t, k, k_t, BLOCK_T) * scale_log2e - lse[:, None])
    if MASKED:
        p = tl.where(col_valid[None, :], p, 0.0)  # padded keys read as 0 would otherwise get weight exp(-LSE)
    ds = p * (_dot_rows(do, do_t, v, v_t, BLOCK_T) - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq)
    if BLOCK_T > 0:
        dq_t = tl.dot(ds.to(k_t.dtype), k_t, dq_t)
    return dq, dq_t


@triton.jit
def _store_chunks(X, x, x_t, batch, head, rows, offs_d, offs_t, d_mask, t_mask, row_valid, stride_b, stride_h,
                  stride_n, stride_d, ALIGNED: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    ptrs = _tile_ptrs(X, batch, head, rows, offs_d, stride_b, stride_h, stride_n, stride_d, ALIGNED)
    tl.store(ptrs, x.to(X.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])
    if BLOCK_T > 0:
        ptrs = _tile_ptrs(X, batch, head, rows, offs_t, stride_b, stride_h, stride_n, stride_d, ALIGNED)
        tl.store(ptrs, x_t.to(X.dtype.element_ty), mask=row_valid[:, None] & t_mask[None, :])


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V,  # (B, H, N, D) forward inputs
    DO,  # (B, H, N, D) upstream gradient
    DK, DV,  # (B, H, N, D) outputs
    LSE, DELTA,  # (B, H, N) fp32, contiguous
    DQ_ACC,  # (B, H, N, D) fp32, contiguous, zeroed: scale * dS K is added here with ATOMIC_DQ (else unused)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads,
    seq_len,
    scale,
    HEAD_DIM: tl.constexpr,
    ALIGNED: tl.constexpr,  # every B, H, N stride divides by 8 and every pointer by 16 bytes (`vector_aligned`)
    RAGGED: tl.constexpr,  # seq_len % BLOCK_M != 0: the last query tile is masked (the others never are)
    ATOMIC_DQ: tl.constexpr,  # compute dQ here too, with fp32 atomics (no dQ kernel)
    BLOCK_D: tl.constexpr,  # head-dim chunks, as in the forward (`head_dim_chunks`)
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # key rows owned by this program
):  # fmt: skip
    batch_head, batch, head = _program_batch_head(num_heads)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d, offs_t, d_mask, t_mask = _head_dim_lanes(HEAD_DIM, BLOCK_D, BLOCK_T)
    n_valid = offs_n < seq_len
    k, k_t = _load_chunks(K, batch, head, offs_n, offs_d, offs_t, d_mask, t_mask, n_valid, stride_kb, stride_kh,
                          stride_kn, stride_kd, ALIGNED, True, BLOCK_T)  # fmt: skip
    v, v_t = _load_chunks(V, batch, head, offs_n, offs_d, offs_t, d_mask, t_mask, n_valid, stride_vb, stride_vh,
                          stride_vn, stride_vd, ALIGNED, True, BLOCK_T)  # fmt: skip
    row_base = batch_head * seq_len
    scale_log2e = scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk_t, dv_t = dk, dv
    if BLOCK_T > 0:
        dk_t = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
        dv_t = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
    # Whole query tiles unmasked, then (ragged N only) the last one masked.
    full_tiles_end = seq_len - seq_len % BLOCK_M if RAGGED else seq_len
    for start_m in range(0, full_tiles_end, BLOCK_M):
        dk, dk_t, dv, dv_t = _dkdv_query_tile(
            dk, dk_t, dv, dv_t, k, k_t, v, v_t, Q, DO, LSE, DELTA, DQ_ACC, batch, head, row_base, start_m + offs_m,
            offs_d, offs_t, d_mask, t_mask, seq_len, stride_qb, stride_qh, stride_qn, stride_qd, stride_dob,
            stride_doh, stride_don, stride_dod, scale, scale_log2e, HEAD_DIM, ALIGNED, False, ATOMIC_DQ, BLOCK_T,
        )  # fmt: skip
    if RAGGED:
        dk, dk_t, dv, dv_t = _dkdv_query_tile(
            dk, dk_t, dv, dv_t, k, k_t, v, v_t, Q, DO, LSE, DELTA, DQ_ACC, batch, head, row_base,
            full_tiles_end + offs_m, offs_d, offs_t, d_mask, t_mask, seq_len, stride_qb, stride_qh, stride_qn,
            stride_qd, stride_dob, stride_doh, stride_don, stride_dod, scale, scale_log2e, HEAD_DIM, ALIGNED, True,
            ATOMIC_DQ, BLOCK_T,
        )  # fmt: skip

    _store_chunks(DK, dk * scale, dk_t * scale, batch, head, offs_n, offs_d, offs_t, d_mask, t_mask, n_valid,
                  stride_dkb, stride_dkh, stride_dkn, stride_dkd, ALIGNED, BLOCK_T)  # fmt: skip
    _store_chunks(DV, dv, dv_t, batch, head, offs_n, offs_d, offs_t, d_mask, t_mask, n_valid, stride_dvb, stride_dvh,
                  stride_dvn, stride_dvd, ALIGNED, BLOCK_T)  # fmt: skip


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V,  # (B, H, N, D) forward inputs
    DO,  # (B, H, N, D) upstream gradient
    DQ,  # (B, H, N, D) output
    LSE, DELTA,  # (B, H, N) fp32, contiguous
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    num_heads,
    seq_len,
    scale,
    HEAD_DIM: tl.constexpr,
    ALIGNED: tl.constexpr,  # every B, H, N stride divides by 8 and every pointer by 16 bytes (`vector_aligned`)
    RAGGED: tl.constexpr,  # seq_len % BLOCK_N != 0: the last key tile is masked (the others never are)
    BLOCK_D: tl.constexpr,  # head-dim chunks, as in the forward (`head_dim_chunks`)
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows owned by this program
    BLOCK_N: tl.constexpr,  # key rows per loop step
):  # fmt: skip
    batch_head, batch, head = _program_batch_head(num_heads)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d, offs_t, d_mask, t_mask = _head_dim_lanes(HEAD_DIM, BLOCK_D, BLOCK_T)
    m_valid = offs_m < seq_len
    q, q_t = _load_chunks(Q, batch, head, offs_m, offs_d, offs_t, d_mask, t_mask, m_valid, stride_qb, stride_qh,
                          stride_qn, stride_qd, ALIGNED, True, BLOCK_T)  # fmt: skip
    do, do_t = _load_chunks(DO, batch, head, offs_m, offs_d, offs_t, d_mask, t_mask, m_valid, stride_dob, stride_doh,
                            stride_don, stride_dod, ALIGNED, True, BLOCK_T)  # fmt: skip
    lse = tl.load(LSE + batch_head * seq_len + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + batch_head * seq_len + offs_m, mask=m_valid, other=0.0)
    scale_log2e = scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq_t = dq
    if BLOCK_T > 0:
        dq_t = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
    # Whole key tiles unmasked, then (ragged N only) the last one masked.
    full_tiles_end = seq_len - seq_len % BLOCK_N if RAGGED else seq_len
    for start_n in range(0, full_tiles_end, BLOCK_N):
        dq, dq_t = _dq_key_tile(
            dq, dq_t, q, q_t, do, do_t, lse, delta, K, V, batch, head, start_n + offs_n, offs_d, offs_t, d_mask,
            t_mask, seq_len, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
            scale_log2e, ALIGNED, False, BLOCK_T,
        )  # fmt: skip
    if RAGGED:
        dq, dq_t = _dq_key_tile(
            dq, dq_t, q, q_t, do, do_t, lse, delta, K, V, batch, head, full_tiles_end + offs_n, offs_d, offs_t,
            d_mask, t_mask, seq_len, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
            stride_vd, scale_log2e, ALIGNED, True, BLOCK_T,
        )  # fmt: skip

    _store_chunks(DQ, dq * scale, dq_t * scale, batch, head, offs_m, offs_d, offs_t, d_mask, t_mask, m_valid,
                  stride_dqb, stride_dqh, stride_dqn, stride_dqd, ALIGNED, BLOCK_T)  # fmt: skip


A100_SHARED_OPTIN = 166_912  # bytes per block: the smaller limit of the two AOT targets, used off CUDA (capture)


def _shared_limit(device: torch.device) -> int:
    if device.type != "cuda":
        return A100_SHARED_OPTIN
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _as_kernel_config(config: triton.Config) -> KernelConfig:
    return KernelConfig(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _prune_forward_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's early prune (`forward_configs_that_fit`), on the launch's head dim, N and device."""
    fitting = forward_configs_that_fit(
        [_as_kernel_config(c) for c in configs],
        kwargs["HEAD_DIM"],
        named_args["seq_len"],
        _shared_limit(named_args["Q"].device),
    )
    return [c for c in configs if _as_kernel_config(c) in fitting]


# The forward with its tiles timed per (D, N, layout, dtype) instead of taken from the table (DTENGINE_ATTENTION_
# AUTOTUNE=1 through the op); RAGGED_KEYS then follows the chosen key tile. Triton caches each choice on disk.
_attention_fwd_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps, num_stages=c.num_stages)
        for c in FORWARD_TUNING_SPACE
    ],
    key=["HEAD_DIM", "seq_len", "ALIGNED", "stride_qn"],
    prune_configs_by={"early_config_prune": _prune_forward_configs},
    cache_results=True,
)(triton.heuristics({"RAGGED_KEYS": lambda args: args["seq_len"] % args["BLOCK_N"] != 0})(_attention_fwd_kernel))


def vector_aligned(*tensors: Tensor) -> bool:
    """Whether every tensor starts on 16 bytes and has a unit last stride and other strides that divide by 8
    elements: then the kernels may declare the strides multiples of 8 (`ALIGNED`) and load rows as 128-bit
    vectors. A wrong declaration would make misaligned loads that neither the interpreter nor an ahead-of-time
    compile can see, so it is only made after this check."""
    return all(
        t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(stride % 8 == 0 for stride in t.stride()[:-1])
        for t in tensors
    )


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"attention needs q, k, v of one shape (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention needs q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    configs_for(q.shape[-1])  # raises for an unsupported head dim


def tma_usable(*tensors: Tensor) -> bool:
    """Whether the forward can read these tensors through TMA descriptors: Triton has them, the device is an sm_90
    or newer (or the interpreter, or an ahead-of-time capture), and every tensor passes `vector_aligned` (16-byte
    base and row strides, unit last stride: what a descriptor requires)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    device = tensors[0].device
    on_hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    return (on_hopper or INTERPRETED or interpreter.CAPTURING) and vector_aligned(*tensors)


def _tma_descriptors(q: Tensor, k: Tensor, v: Tensor, cfg: KernelConfig, block_d: int, block_t: int) -> tuple:
    """Descriptors of the forward's tiles: q, k and v, each by head-dim chunk (a box of [1, 1, rows, lanes])."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    def box(x: Tensor, rows: int, lanes: int) -> TensorDescriptor:
        return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, lanes])

    tail = block_t or block_d  # without a tail chunk, never read
    return tuple(
        box(x, rows, lanes)
        for x, rows in ((q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n))
        for lanes in (block_d, tail)
    )


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, autotune: bool = False, tma: bool = False
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel.

    Args:
        q, k, v: (B, H, N, D), fp16/bf16 on CUDA (fp32 on CPU via the interpreter), any strides.
        scale: softmax scale, usually D ** -0.5.
        autotune: time `FORWARD_TUNING_SPACE` for this (D, N) once (cached) instead of the table's tiles; the
            interpreter, which has nothing to time, always takes the table's.
        tma: read q, k, v through TMA descriptors where `tma_usable` (else, silently, by pointer loads); with the
            table's tiles only (the autotuned launch loads by pointers).
    Returns:
        out (B, H, N, D) with q's dtype (and q's strides when q is dense), lse (B, H, N) fp32 contiguous.
    """
    _check_inputs(q, k, v)
    batch, heads, seq_len, head_dim = q.shape
    block_d, block_t = head_dim_chunks(head_dim)
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seq_len), device=q.device, dtype=torch.float32)
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), heads, seq_len, scale * LOG2E)
    shape = dict(HEAD_DIM=head_dim, ALIGNED=vector_aligned(q, k, v, out), BLOCK_D=block_d, BLOCK_T=block_t)
    pointers = (q, q, k, k, v, v)  # what DESCS holds without TMA: never read
    if autotune and not INTERPRETED:
        grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _attention_fwd_tuned[grid](q, k, v, out, lse, pointers, *strides, USE_TMA=False, **shape)
        return out, lse
    cfg = forward_config(head_dim)
    use_tma = tma and tma_usable(q, k, v)
    descs = _tma_descriptors(q, k, v, cfg, block_d, block_t) if use_tma else pointers
    _attention_fwd_kernel[(triton.cdiv(seq_len, cfg.block_m), batch * heads)](
        q, k, v, out, lse, descs, *strides, **shape, RAGGED_KEYS=seq_len % cfg.block_n != 0, USE_TMA=use_tma,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    deterministic: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernels: delta preprocess, then dK/dV with dQ added by fp32 atomics (five GEMMs per
    pair of tiles), or, when deterministic or beyond 128 head-dim lanes (`atomic_dq_fits`), dK/dV and a separate
    dQ kernel (seven: it recomputes P and dP).

    Args:
        grad_out: upstream gradient dO, (B, H, N, D).
        q, k, v, out, lse: the forward's inputs and outputs.
        scale: the forward's softmax scale.
        deterministic: bit-reproducible dQ (the two-kernel path); None follows
            `torch.are_deterministic_algorithms_enabled()`.
    Returns:
        dq, dk, dv: (B, H, N, D) with the dtypes and (dense) strides of q, k, v.
    """
    _check_inputs(q, k, v)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    batch, heads, seq_len, head_dim = q.shape
    configs, (block_d, block_t) = configs_for(head_dim), head_dim_chunks(head_dim)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    aligned = vector_aligned(q, k, v, out, grad_out, dq, dk, dv)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, ALIGNED=aligned)

    fwd = configs.forward  # the elementwise delta pass needs no chunks: one tile padded to a power of two
    _attention_bwd_delta_kernel[(triton.cdiv(seq_len, fwd.block_m), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, seq_len, BLOCK_M=fwd.block_m,
        HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), ALIGNED=aligned,
    )  # fmt: skip
    input_strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    atomic_dq = not deterministic and atomic_dq_fits(head_dim)
    dkdv_cfg, dq_cfg = backward_configs(head_dim, atomic_dq)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic_dq else dk  # dk: unused
    _attention_bwd_dkdv_kernel[(triton.cdiv(seq_len, dkdv_cfg.block_n), batch * heads)](
        q, k, v, grad_out, dk, dv, lse, delta, dq_acc, *input_strides, *dk.stride(), *dv.stride(), heads, seq_len,
        scale, RAGGED=seq_len % dkdv_cfg.block_m != 0, ATOMIC_DQ=atomic_dq, BLOCK_M=dkdv_cfg.block_m,
        BLOCK_N=dkdv_cfg.block_n, num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages, **common,
    )  # fmt: skip
    if atomic_dq:
        return dq.copy_(dq_acc), dk, dv  # one pass: fp32 to q's dtype, into q's strides (scale is already in)
    _attention_bwd_dq_kernel[(triton.cdiv(seq_len, dq_cfg.block_m), batch * heads)](
        q, k, v, grad_out, dq, lse, delta, *input_strides, *dq.stride(), heads, seq_len, scale,
        RAGGED=seq_len % dq_cfg.block_n != 0, BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n,
        num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages, **common,
    )  # fmt: skip
    return dq, dk, dv

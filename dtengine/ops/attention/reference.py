"""Pure-PyTorch fp32 attention: the oracle of tests and benchmarks, and the math backward of non-Triton backends."""

from __future__ import annotations

import torch
from torch import Tensor

BACKWARD_QUERY_CHUNK = 1024  # query rows per step of the reference backward: bounds its memory to chunk x N


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(scale * q k^T) v computed eagerly in fp32 (fp64 stays fp64): the oracle.

    Shape: q, k, v (B, H, N, D) -> (B, H, N, D), fp32.
    """
    q, k, v = (t if t.dtype == torch.float64 else t.float() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def attention_backward_reference(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    scale: float,
    query_chunk: int = BACKWARD_QUERY_CHUNK,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of attention by the math formula, in fp32, `query_chunk` query rows at a time.

    With P = softmax(scale q k^T): dv = P^T do, dP = do v^T, dS = P * (dP - rowsum(do * out)), dq = scale dS k,
    dk = scale dS^T q. Returns tensors with the dtypes of q, k, v.
    """
    q32, k32, v32, do32 = (t.float() for t in (q, k, v, grad_out))
    delta = (do32 * out.float()).sum(-1, keepdim=True)  # (B, H, N, 1)
    dq, dk, dv = torch.empty_like(q32), torch.zeros_like(k32), torch.zeros_like(v32)
    for start in range(0, q.shape[-2], query_chunk):
        rows = slice(start, start + query_chunk)
        p = torch.softmax(q32[..., rows, :] @ k32.transpose(-1, -2) * scale, dim=-1)  # (B, H, chunk, N)
        dv += p.transpose(-1, -2) @ do32[..., rows, :]
        ds = p * (do32[..., rows, :] @ v32.transpose(-1, -2) - delta[..., rows, :])
        dq[..., rows, :] = ds @ k32 * scale
        dk += ds.transpose(-1, -2) @ q32[..., rows, :] * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

"""`attention`: softmax(scale * q k^T) v over (B, H, N, D), with one switch between backends.

    reference.py  fp32 eager attention (the oracle) and the chunked math backward
    op.py         the custom ops (forward with fake + autograd; Triton's backward)
    here          the public function and the choice of backend (`dtengine.ops.backends`)

Backends:
    triton    dtkernels' flash-style kernels (fp16/bf16 on CUDA; fp32 on CPU only under TRITON_INTERPRET=1)
    xformers  xformers.ops.memory_efficient_attention, when installed, on CUDA, and its compiled ops load
    sdpa      torch.nn.functional.scaled_dot_product_attention (every device, every dtype)
    auto      triton when it supports the call (head dim <= 160, except 65-96 on CUDA: below), sdpa otherwise

DTENGINE_ATTENTION_BACKEND forces a backend, DTENGINE_DISABLE_TRITON=1 keeps Triton off (`dtengine.runtime.flags`).
Gradients: the Triton backend has its own backward kernels; the other backends differentiate
`attention_backward_reference`, the fp32 math formula evaluated in query chunks (it recomputes the
probabilities, like a flash backward, but in O(chunk * N) memory).

Cautions: non-causal, no mask, q/k/v of one shape (self-attention).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from dtengine.ops.attention.op import attention_forward_op
from dtengine.ops.attention.reference import attention_backward_reference, attention_reference
from dtengine.ops.backends import OpBackends, resolve_backend
from dtengine.runtime.flags import flags

__all__ = ["BACKENDS", "attention", "attention_backward_reference", "attention_reference"]


@functools.cache
def xformers_unavailable_reason() -> str | None:
    """Why xformers cannot run here (None when it can): checked once by running a tiny call on CUDA.

    xformers wheels are built against one torch release; under another it imports but its compiled ops do not
    load, so only a real call tells.
    """
    if not torch.cuda.is_available():
        return "xformers has no CPU kernels and no CUDA device is present"
    try:
        import xformers.ops as xops

        x = torch.zeros(1, 16, 1, 32, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(x, x, x)
    except (ImportError, NotImplementedError, RuntimeError, ValueError) as err:  # missing, or its ops did not load
        first_line = (str(err).strip().splitlines() or [""])[0][:120]
        return f"xformers is not usable ({type(err).__name__}: {first_line})"
    return None


def _xformers_unavailable(q: Tensor) -> str | None:
    return "it needs CUDA tensors" if q.device.type != "cuda" else xformers_unavailable_reason()


def _triton_unavailable(q: Tensor) -> str | None:
    try:
        from dtkernels.attention import MAX_HEAD_DIM
        from dtkernels.interpreter import INTERPRETED
    except ImportError as err:  # no triton on this platform
        return f"triton is not importable ({err})"
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM}"
    if INTERPRETED:
        if q.device.type != "cpu" or q.dtype != torch.float32:
            return "under TRITON_INTERPRET=1 the kernels take fp32 CPU tensors only"
        return None
    if q.device.type != "cuda":
        return f"it needs CUDA tensors (got {q.device.type}; set TRITON_INTERPRET=1 before start to interpret on CPU)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it supports fp16/bf16 on CUDA, got {q.dtype}"
    return None


def _triton_passed_over(q: Tensor) -> str | None:
    """Why "auto" keeps a call off Triton although it can run it. Head dims 65-96 run the forward as 64 + 16 or
    32 lane chunks in 128 x 64 tiles of 8 warps; at D = 72 with 77 tokens that forward faulted (illegal memory
    access) on an H100 and on one of two H200s. The interpreter finds no access outside the tensors, so the fault
    is in the compiled code: until it is found, auto takes SDPA there. An explicit backend="triton" still runs it
    (the GPU tests do, in a child process)."""
    from dtkernels.interpreter import INTERPRETED

    if not INTERPRETED and 64 < q.shape[-1] <= 96:
        return f"head dim {q.shape[-1]}: the Triton forward of head dims 65-96 faulted on an H100 and an H200"
    return None


ATTENTION_BACKENDS = OpBackends(
    op="attention",
    unavailable={"triton": _triton_unavailable, "xformers": _xformers_unavailable, "sdpa": lambda q: None},
    auto_order=("triton", "sdpa"),
    reference="sdpa",
    passed_over_by_auto={"triton": _triton_passed_over},
)
BACKENDS = ATTENTION_BACKENDS.names


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Non-causal scaled dot-product attention, dispatched to the backend named (see the module docstring).

    Args:
        q, k, v: (B, H, N, D) of one shape and dtype, any strides.
        scale: softmax scale; D ** -0.5 when None.
        backend: "auto" | "triton" | "xformers" | "sdpa" (DTENGINE_ATTENTION_BACKEND overrides it).
    Returns:
        (B, H, N, D) in q's dtype, laid out like `torch.empty_like(q)`.
    Raises:
        BackendError: `backend` cannot run this call (e.g. "triton" on CPU).
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"attention needs q, k, v of one shape (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype or not q.is_floating_point():
        raise ValueError(f"attention needs q, k, v of one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = resolve_backend(ATTENTION_BACKENDS, backend, flags().attention_backend, q)
    out, _ = attention_forward_op(q, k, v, scale, chosen)
    return out

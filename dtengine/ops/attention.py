"""`attention`: softmax(scale * q k^T) v over (B, H, N, D), with one switch between backends.

Backends:
    triton    dtkernels' flash-style kernels (fp16/bf16 on CUDA; fp32 on CPU only under TRITON_INTERPRET=1)
    xformers  xformers.ops.memory_efficient_attention, when installed, on CUDA, and its compiled ops load
    sdpa      torch.nn.functional.scaled_dot_product_attention (every device, every dtype)
    auto      triton when it supports the call (CUDA, fp16/bf16, head dim <= 160), sdpa otherwise

`DTENGINE_ATTENTION_BACKEND=<name>` forces a backend whatever the caller asked; `DTENGINE_DISABLE_TRITON=1` keeps
"auto" off Triton. The forward is one `torch.library.custom_op` (with a fake implementation), so
`torch.compile(fullgraph=True)` traces a teacher through it. Gradients: the Triton backend has its own backward
kernels (a second custom op); the other backends differentiate `attention_backward_reference`, the fp32 math
formula evaluated in query chunks (it recomputes the probabilities, like a flash backward, but in O(chunk * N)
memory).

Cautions: non-causal, no mask, q/k/v of one shape (self-attention). `attention_reference` is the fp32 oracle
the tests and the benchmark compare against.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "triton", "xformers", "sdpa")
BACKEND_ENV = "DTENGINE_ATTENTION_BACKEND"
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


def triton_unsupported_reason(q: Tensor) -> str | None:
    """Why the Triton backend cannot take `q` (None when it can)."""
    try:
        from dtkernels.attention import MAX_HEAD_DIM, running_in_interpreter
    except ImportError as err:  # no triton on this platform
        return f"triton is not importable ({err})"
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM}"
    if running_in_interpreter():
        if q.device.type != "cpu" or q.dtype != torch.float32:
            return "under TRITON_INTERPRET=1 the kernels take fp32 CPU tensors only"
        return None
    if q.device.type != "cuda":
        return f"it needs CUDA tensors (got {q.device.type}; set TRITON_INTERPRET=1 before start to interpret on CPU)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it supports fp16/bf16 on CUDA, got {q.dtype}"
    return None


@torch.compiler.assume_constant_result
def _requested_backend(backend: str) -> str:
    # Read once per trace: torch.compile treats the choice as a constant instead of guarding on os.environ.
    return os.environ.get(BACKEND_ENV) or backend


def resolve_backend(backend: str, q: Tensor) -> str:
    """The backend a call with these inputs runs on; raises a one-line ValueError when a request cannot run."""
    requested = _requested_backend(backend)
    if requested not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        triton_off = os.environ.get("DTENGINE_DISABLE_TRITON") == "1"
        return "sdpa" if triton_off or triton_unsupported_reason(q) else "triton"
    if requested == "triton" and (reason := triton_unsupported_reason(q)):
        raise ValueError(f"attention backend 'triton' cannot run this call: {reason}; use backend='sdpa'")
    if requested == "xformers":
        reason = "it needs CUDA tensors" if q.device.type != "cuda" else xformers_unavailable_reason()
        if reason:
            raise ValueError(f"attention backend 'xformers' cannot run this call: {reason}; use backend='sdpa'")
    return requested


def _dense_like(result: Tensor, layout: Tensor) -> Tensor:
    # Outputs take the layout `torch.empty_like(layout)` gives, which is what the fake implementations promise.
    target = torch.empty_like(layout)
    return result if result.stride() == target.stride() else target.copy_(result)


@torch.library.custom_op("dtengine::attention_forward", mutates_args=())
def _attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """Returns (out, lse); lse (B, H, N) fp32 for the Triton backend, an empty tensor otherwise."""
    if backend == "triton":
        from dtkernels.attention import attention_forward

        return attention_forward(q, k, v, scale)
    if backend == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        out = out.transpose(1, 2)  # xformers works in (B, N, H, D)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return _dense_like(out, q), q.new_empty((0,), dtype=torch.float32)


@_attention_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    lse_shape = q.shape[:-1] if backend == "triton" else (0,)
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("dtengine::attention_backward_triton", mutates_args=())
def _attention_backward_triton(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    from dtkernels.attention import attention_backward

    return attention_backward(grad_out, q, k, v, out, lse, scale)


@_attention_backward_triton.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad_out: Tensor, _grad_lse: Tensor):
    q, k, v, out, lse = ctx.saved_tensors
    if ctx.backend == "triton":
        dq, dk, dv = _attention_backward_triton(grad_out, q, k, v, out, lse, ctx.scale)
    else:
        dq, dk, dv = attention_backward_reference(grad_out, q, k, v, out, ctx.scale)
    return dq, dk, dv, None, None


_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Non-causal scaled dot-product attention, dispatched to the backend named (see the module docstring).

    Args:
        q, k, v: (B, H, N, D) of one shape and dtype, any strides.
        scale: softmax scale; D ** -0.5 when None.
        backend: "auto" | "triton" | "xformers" | "sdpa" (DTENGINE_ATTENTION_BACKEND overrides it).
    Returns:
        (B, H, N, D) in q's dtype, laid out like `torch.empty_like(q)`.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"attention needs q, k, v of one shape (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype or not q.is_floating_point():
        raise ValueError(f"attention needs q, k, v of one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _attention_forward(q, k, v, scale, resolve_backend(backend, q))
    return out

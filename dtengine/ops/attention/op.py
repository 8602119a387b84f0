"""Attention as `torch.library` custom ops, so `torch.compile(fullgraph=True)` traces a teacher through it.

`dtengine::attention_forward(q, k, v, scale, backend)` returns (out, lse) for the backend already chosen by the
dispatch; lse is the Triton forward's log-sum-exp (B, H, N) fp32, an empty tensor for the other backends. Its
autograd runs Triton's backward kernels (a second op, `dtengine::attention_backward_triton`) or, for the other
backends, `attention_backward_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from dtengine.ops.attention.reference import attention_backward_reference
from dtengine.runtime.flags import flags


def _dense_like(result: Tensor, layout: Tensor) -> Tensor:
    # Outputs take the layout `torch.empty_like(layout)` gives, which is what the fake implementations promise.
    target = torch.empty_like(layout)
    return result if result.stride() == target.stride() else target.copy_(result)


@torch.library.custom_op("dtengine::attention_forward", mutates_args=())
def attention_forward_op(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """Returns (out, lse); lse (B, H, N) fp32 for the Triton backend, an empty tensor otherwise."""
    if backend == "triton":
        from dtkernels.attention import attention_forward

        switches = flags()
        return attention_forward(q, k, v, scale, autotune=switches.attention_autotune, tma=switches.attention_tma)
    if backend == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        out = out.transpose(1, 2)  # xformers works in (B, N, H, D)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return _dense_like(out, q), q.new_empty((0,), dtype=torch.float32)


@attention_forward_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    lse_shape = q.shape[:-1] if backend == "triton" else (0,)
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("dtengine::attention_backward_triton", mutates_args=())
def attention_backward_triton_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    from dtkernels.attention import attention_backward

    return attention_backward(grad_out, q, k, v, out, lse, scale)


@attention_backward_triton_op.register_fake
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
        dq, dk, dv = attention_backward_triton_op(grad_out, q, k, v, out, lse, ctx.scale)
    else:
        dq, dk, dv = attention_backward_reference(grad_out, q, k, v, out, ctx.scale)
    return dq, dk, dv, None, None


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


# FLOP counts for `torch.utils.flop_counter` (MFU in the step benchmark), which counts a custom op as 0 otherwise.
# Forward: two (N x N x D) matmuls per head, 2 FLOPs per multiply-add. Backward: five, as a flash backward
# recomputes the scores (the reference backward of the other backends is made of aten ops, counted by torch).
@register_flop_formula(torch.ops.dtengine.attention_forward)
def _attention_forward_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, tokens, head_dim = q_shape
    return 4 * batch * heads * tokens * tokens * head_dim


@register_flop_formula(torch.ops.dtengine.attention_backward_triton)
def _attention_backward_flops(grad_shape, q_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, tokens, head_dim = q_shape
    return 10 * batch * heads * tokens * tokens * head_dim

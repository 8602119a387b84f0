"""`dtengine.ops.attention` on CPU: the SDPA path behind the custom op, the reference backward, dispatch, compile."""

from __future__ import annotations

import pytest
import torch

from dtengine.ops import attention, attention_reference
from dtengine.ops.attention import attention_backward_reference

# (B, H, N, D): odd sequence lengths and non-power-of-two head dims among them.
SHAPES = [(2, 3, 64, 32), (1, 2, 77, 40), (2, 1, 33, 72)]


def _qkv(shape, dtype=torch.float32, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_backend_matches_reference_forward_and_backward(shape):
    q, k, v = _qkv(shape, requires_grad=True)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = attention(q, k, v, backend="sdpa")
    (out * upstream).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]

    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = attention_reference(q64, k64, v64)
    (want * upstream.double()).sum().backward()
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(got, (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)


def test_reference_backward_in_query_chunks_agrees_with_autograd():
    q, k, v = _qkv((1, 2, 45, 24), dtype=torch.float64, requires_grad=True)
    out = attention_reference(q, k, v, scale=0.3)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    dq, dk, dv = attention_backward_reference(upstream, q.detach(), k.detach(), v.detach(), out.detach(), 0.3, 16)
    for ours, theirs in zip((dq, dk, dv), (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)


def test_gradcheck_in_double_through_the_custom_op():
    q, k, v = _qkv((1, 2, 9, 8), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, scale=0.5, backend="sdpa"), (q, k, v))


def test_opcheck_fake_and_autograd_registration():
    q, k, v = _qkv((2, 2, 17, 16), requires_grad=True)
    torch.library.opcheck(torch.ops.dtengine.attention_forward.default, (q, k, v, 0.25, "sdpa"))


def test_strided_inputs_and_output_layout():
    # diffusers hands over (B, N, H, D) projections viewed as (B, H, N, D): the output keeps that layout.
    q, k, v = (t.transpose(1, 2) for t in _qkv((2, 20, 3, 16)))
    out = attention(q, k, v)
    assert out.stride() == torch.empty_like(q).stride() and not out.is_contiguous()
    torch.testing.assert_close(out, attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_bf16_runs_on_cpu_and_stays_bf16():
    q, k, v = _qkv((1, 2, 32, 40), dtype=torch.bfloat16)
    out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attention_reference(q, k, v), rtol=0.02, atol=0.02)


def test_compiled_module_traces_through_the_op_fullgraph():
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 48)

    def block(x):  # x: (B, N, 16) -> (B, N, 16), two heads of 8
        q, k, v = proj(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return attention(q, k, v).transpose(1, 2).flatten(2)

    x = torch.randn(2, 11, 16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-6)
    (grad_compiled,) = torch.autograd.grad(out.square().sum(), x)
    (grad_eager,) = torch.autograd.grad(block(x).square().sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_clear_errors():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="one shape"):
        attention(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match="one shape"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="dtype"):
        attention(q, q.double(), q)


def test_the_autotune_and_tma_switches_reach_the_triton_forward(monkeypatch):
    """DTENGINE_ATTENTION_AUTOTUNE=1 and DTENGINE_ATTENTION_TMA=1 reach the Triton launcher."""
    import dtkernels.attention
    from dtengine.ops.attention.op import attention_forward_op
    from dtengine.runtime.flags import override

    asked = []

    def launcher(q, k, v, scale, autotune=False, tma=False):
        asked.append((autotune, tma))
        return torch.zeros_like(q), q.new_zeros(q.shape[:3])

    monkeypatch.setattr(dtkernels.attention, "attention_forward", launcher)
    q, k, v = _qkv((1, 2, 16, 32))
    attention_forward_op(q, k, v, 0.2, "triton")
    with override(attention_autotune=True):
        attention_forward_op(q, k, v, 0.2, "triton")
    with override(attention_tma=True):
        attention_forward_op(q, k, v, 0.2, "triton")
    assert asked == [(False, False), (True, False), (False, True)]

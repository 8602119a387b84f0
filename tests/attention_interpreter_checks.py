"""Triton attention kernels run by Triton's interpreter (fp32, CPU) against the fp32 reference.

Not collected directly: Triton picks interpreted or compiled kernels when it is imported, so
tests/test_ops_attention_interpreter.py runs this file in a subprocess with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch

from dtengine.ops import attention, attention_reference
from dtkernels.attention import attention_backward, attention_forward
from dtkernels.interpreter import INTERPRETED

# (B, H, N, D): the forward runs D=40, 72, 80 and 160 in two chunks (32+16, 64+16, 64+16, 128+32; 40 and 72 pad
# their tail), the backward pads them; D=8 pads its only chunk; N=77, 130, 33, 70 are not multiples of any block
# size, N=64 is (no key mask in the forward).
SHAPES = [(1, 2, 77, 40), (2, 1, 64, 32), (1, 1, 130, 72), (1, 2, 33, 8), (1, 1, 70, 80), (1, 1, 64, 160)]


def test_kernels_are_interpreted():
    assert INTERPRETED, "run with TRITON_INTERPRET=1 set before Python starts"


def _reference_grads(q, k, v, upstream, scale):
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    out = attention_reference(q64, k64, v64, scale)
    out.backward(upstream.double())
    lse = torch.logsumexp(q64.detach() @ k64.detach().transpose(-1, -2) * scale, dim=-1)
    return out.detach(), lse, (q64.grad, k64.grad, v64.grad)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "dq-kernel"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_reference_forward_and_backward(shape, deterministic):
    generator = torch.Generator().manual_seed(sum(shape))
    q, k, v, upstream = (torch.randn(shape, generator=generator) for _ in range(4))
    scale = shape[-1] ** -0.5
    out, lse = attention_forward(q, k, v, scale)
    grads = attention_backward(upstream, q, k, v, out, lse, scale, deterministic=deterministic)
    want_out, want_lse, want_grads = _reference_grads(q, k, v, upstream, scale)
    torch.testing.assert_close(out, want_out.float(), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(lse, want_lse.float(), rtol=1e-5, atol=2e-6)
    for name, got, want in zip("qkv", grads, want_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_misaligned_views_take_the_unhinted_variant_and_match():
    from dtkernels.attention.flash import vector_aligned

    # Rows of 41 elements, each view starting one element in: neither pointers nor row strides stay aligned.
    generator = torch.Generator().manual_seed(5)
    q, k, v, upstream = (torch.randn(1, 2, 37, 41, generator=generator)[..., 1:] for _ in range(4))
    assert not vector_aligned(q, k, v)
    out, lse = attention_forward(q, k, v, 0.2)
    grads = attention_backward(upstream, q, k, v, out, lse, 0.2)  # the atomic dQ path (the default)
    want_out, _, want_grads = _reference_grads(q, k, v, upstream, 0.2)
    torch.testing.assert_close(out, want_out.float(), rtol=1e-5, atol=2e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_op_with_triton_backend_on_strided_inputs():
    # The (B, N, H, D) -> (B, H, N, D) views diffusers produces, through the custom op and its autograd.
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 45, 3, 40, generator=generator).transpose(1, 2).requires_grad_(True) for _ in range(3))
    upstream = torch.randn(2, 3, 45, 40, generator=generator)
    out = attention(q, k, v, scale=0.2, backend="triton")
    out.backward(upstream)
    want_out, _, want_grads = _reference_grads(q.detach(), k.detach(), v.detach(), upstream, 0.2)
    torch.testing.assert_close(out, want_out.float(), rtol=1e-5, atol=2e-6)
    for got, want in zip((q.grad, k.grad, v.grad), want_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_teacher_features_with_triton_processor_match_diffusers(tmp_path, monkeypatch):
    from diffusers import DDPMScheduler

    import dtkernels.attention
    from dtengine.teachers import DiffusionTeacher, TeacherConfig
    from dtengine.teachers.unet import UNetArchConfig, build_unet

    torch.manual_seed(0)
    # Attention at the two coarsest of three levels of a 16 px image: 16 and 64 tokens, 2 heads of 16.
    arch = UNetArchConfig(block_out_channels=[16, 32, 32], attention_levels=2, attention_head_dim=16, norm_num_groups=8)
    unet, scheduler = build_unet(16, arch), DDPMScheduler(num_train_timesteps=1000)
    calls = []
    kernel_forward = dtkernels.attention.attention_forward
    spy = lambda *args, **kwargs: calls.append(1) or kernel_forward(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(dtkernels.attention, "attention_forward", spy)
    monkeypatch.setenv("DTENGINE_ATTENTION_BACKEND", "triton")
    images = torch.rand(2, 3, 16, 16)
    features = {}
    for implementation in ("diffusers", "dtengine"):
        teacher = DiffusionTeacher(unet, scheduler, TeacherConfig(blocks=[0, 1, 2], attention=implementation))
        torch.manual_seed(1)  # the same noise draw for both
        features[implementation] = teacher(images).features
    assert len(calls) == 7, "every attention layer (2 down, 1 mid, 4 up) must run the Triton kernel"
    for ours, theirs in zip(features["dtengine"], features["diffusers"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_deterministic_mode_takes_the_dq_kernel_and_repeats_bit_for_bit():
    """torch.use_deterministic_algorithms(True) selects the atomics-free path: two runs give identical gradients."""
    generator = torch.Generator().manual_seed(9)
    q, k, v, upstream = (torch.randn(1, 2, 70, 40, generator=generator) for _ in range(4))
    out, lse = attention_forward(q, k, v, 0.15)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (attention_backward(upstream, q, k, v, out, lse, 0.15) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = attention_backward(upstream, q, k, v, out, lse, 0.15, deterministic=False)
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 2, 77, 40), (1, 1, 64, 160), (1, 2, 33, 8)])
def test_forward_through_tma_descriptors_matches_reference(shape):
    """The descriptor path (opt-in, sm_90+): the copy engine's zero fill stands in for the row and lane masks."""
    from dtkernels.attention.flash import tma_usable

    generator = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    assert tma_usable(q, k, v)
    scale = shape[-1] ** -0.5
    out, lse = attention_forward(q, k, v, scale, tma=True)
    want_out, want_lse, _ = _reference_grads(q, k, v, torch.zeros(shape), scale)
    torch.testing.assert_close(out, want_out.float(), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(lse, want_lse.float(), rtol=1e-5, atol=2e-6)

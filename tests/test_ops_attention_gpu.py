"""Triton attention on a CUDA device: bf16/fp16 error at most 2x PyTorch's own low-precision error (skipped on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtengine.ops import attention, attention_reference
from dtengine.ops.attention import ATTENTION_BACKENDS
from dtengine.ops.backends import resolve_backend

pytestmark = pytest.mark.gpu
HEAD_DIMS = (32, 40, 64, 72, 80, 128, 160)


def _errors(dtype, shape, backend):
    q, k, v, upstream = (torch.randn(shape, device="cuda") for _ in range(4))
    ref_inputs = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*ref_inputs)
    ref.backward(upstream.double())
    results = {}
    for name, fn in (
        ("ours", lambda a, b, c: attention(a, b, c, backend=backend)),
        ("torch", F.scaled_dot_product_attention),
    ):
        low = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*low)
        out.backward(upstream.to(dtype))
        pairs = [(out, ref)] + [(t.grad, r.grad) for t, r in zip(low, ref_inputs)]
        results[name] = [(a.double() - b).abs().max().item() for a, b in pairs]
    return results


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq_len", [77, 1024])
def test_triton_error_within_twice_torch_error(dtype, head_dim, seq_len):
    torch.manual_seed(0)
    errors = _errors(dtype, (2, 3, seq_len, head_dim), "triton")
    for what, ours, theirs in zip(("out", "dq", "dk", "dv"), errors["ours"], errors["torch"]):
        assert ours <= 2 * theirs + 1e-5, f"{what}: triton {ours:.3g} vs torch {theirs:.3g}"


def test_auto_picks_triton_on_cuda_for_supported_calls():
    def auto(q):
        return resolve_backend(ATTENTION_BACKENDS, "auto", "", q)

    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert auto(q) == "triton"
    assert auto(q.float()) == "sdpa"
    assert auto(torch.randn(1, 1, 64, 256, device="cuda", dtype=torch.bfloat16)) == "sdpa"
    assert auto(torch.randn(1, 1, 64, 72, device="cuda", dtype=torch.bfloat16)) == "sdpa"  # faulted on an H100


def test_long_sequence_forward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16384, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = attention(q, k, v, backend="triton")
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (out.float() - want).abs().max().item() < 2e-2

"""Triton attention on a CUDA device: bf16/fp16 error at most 2x PyTorch's own low-precision error (skipped on CPU,
but for the check of the child process that isolates the head dims that faulted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dtengine.ops import attention, attention_reference
from dtengine.ops.attention import ATTENTION_BACKENDS, _triton_passed_over
from dtengine.ops.backends import resolve_backend

HEAD_DIMS = (32, 40, 64, 72, 80, 128, 160)


def _faulted(head_dim: int) -> bool:
    """A head dim whose forward faulted (illegal memory access) on a GPU, so that auto avoids Triton there. A fault
    leaves the process's CUDA context unusable and every later GPU test would fail too: these run in a child."""
    return _triton_passed_over(torch.empty(0, 0, 0, head_dim)) is not None


def _errors(dtype, shape, backend, device="cuda"):
    q, k, v, upstream = (torch.randn(shape, device=device) for _ in range(4))
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


def _errors_in_child(dtype, shape, backend, device="cuda"):
    """`_errors` in a fresh process (seeded as the caller is), so that a fault there fails one test, not the run."""
    script = (
        f"import sys, json, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); torch.manual_seed(0); "
        f"from {Path(__file__).stem} import _errors; "
        f"print(json.dumps(_errors(torch.{str(dtype).split('.')[-1]}, {tuple(shape)}, {backend!r}, {device!r})))"
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    if child.returncode != 0:
        pytest.fail(f"the child process failed (rc {child.returncode}): {child.stderr.strip()[-600:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_a_child_process_measures_what_this_one_does():
    """The isolation of the faulted head dims, checked where it can run: SDPA on the CPU."""
    torch.manual_seed(0)
    here = _errors(torch.bfloat16, (1, 2, 9, 8), "sdpa", device="cpu")
    assert _errors_in_child(torch.bfloat16, (1, 2, 9, 8), "sdpa", device="cpu") == here


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq_len", [77, 1024])
@pytest.mark.gpu
def test_triton_error_within_twice_torch_error(dtype, head_dim, seq_len):
    torch.manual_seed(0)
    measure = _errors_in_child if _faulted(head_dim) else _errors
    errors = measure(dtype, (2, 3, seq_len, head_dim), "triton")
    for what, ours, theirs in zip(("out", "dq", "dk", "dv"), errors["ours"], errors["torch"]):
        assert ours <= 2 * theirs + 1e-5, f"{what}: triton {ours:.3g} vs torch {theirs:.3g}"


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda_for_supported_calls():
    def auto(q):
        return resolve_backend(ATTENTION_BACKENDS, "auto", "", q)

    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert auto(q) == "triton"
    assert auto(q.float()) == "sdpa"
    assert auto(torch.randn(1, 1, 64, 256, device="cuda", dtype=torch.bfloat16)) == "sdpa"
    assert auto(torch.randn(1, 1, 64, 72, device="cuda", dtype=torch.bfloat16)) == "sdpa"  # faulted on an H100


@pytest.mark.gpu
def test_long_sequence_forward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16384, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = attention(q, k, v, backend="triton")
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (out.float() - want).abs().max().item() < 2e-2

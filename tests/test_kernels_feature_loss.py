"""Fused feature-loss kernels: interpreter correctness (subprocess), AOT compile of every shipped config, GPU.

- Interpreter: tests/triton_interpreted_feature_loss.py runs in a child process with TRITON_INTERPRET=1, because
  `@triton.jit` chooses the interpreter when the kernel module is imported (this process compiles for GPUs).
- AOT: every tile config x {bf16, fp32} x {sm_80, sm_90} x {NCHW, channels_last}, with the unit stride
  specialised the way Triton specialises it at launch; must compile, fit shared memory and not spill.
- GPU (`gpu`, skipped without CUDA): fp32 against the reference, bf16 within twice PyTorch's own bf16 error,
  and an inductor-compiled step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from feature_loss_cases import LAYOUTS, MULTI_LEVEL_SHAPES, ODD_SHAPE, assert_matches_reference, make_levels

from dtengine.ops import feature_regression_loss, feature_regression_loss_reference
from dtkernels.aot import ARCHES, compile_kernel
from dtkernels.feature_loss import kernel as fused

INTERPRETED_CASES = Path(__file__).resolve().parent / "triton_interpreted_feature_loss.py"


def test_kernels_match_reference_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("DTENGINE_DISABLE_TRITON", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(INTERPRETED_CASES)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=INTERPRETED_CASES.parent.parent,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def _strides(prefixes: str, unit_axis: str) -> tuple[dict[str, str], dict[str, int]]:
    """Signature entries for (b, c, h, w) strides of each tensor; the unit-stride axis becomes constexpr 1."""
    signature, constexprs = {}, {}
    for prefix in prefixes:
        for axis in "bchw":
            name = f"stride_{prefix}{axis}"
            if axis == unit_axis:
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32"
    return signature, constexprs


def _pixel_kernel_compilations(kernel_name: str, dtype: str, unit_axis: str):
    """(jit fn, signature, constexprs) of one pass over (B, C, H, W) tiles, for one dtype and layout."""
    pointers = {"R": f"*{dtype}", "G": f"*{dtype}"}
    sizes = {"C": "i32", "W": "i32", "P": "i32"}
    if kernel_name == "stats":
        strides, constexprs = _strides("rg", unit_axis)
        stats = {name: "*fp32" for name in ("MEAN", "RSTD", "Q_R", "Q_G")}
        for whiten in (True, False):
            yield (
                fused._stats_kernel,
                {**pointers, **stats, **sizes, **strides, "eps": "fp32"},
                {
                    **constexprs,
                    "WHITEN": whiten,
                },
            )
    else:
        strides, constexprs = _strides("rgd", unit_axis)
        buffers = {"DR": f"*{dtype}", "MEAN": "*fp32", "RSTD": "*fp32", "AT_COEF": "*fp32", "SSE": "*fp32"}
        scalars = {"mse_scale": "fp32", "at_weight": "fp32"}
        yield fused._grad_kernel, {**pointers, **buffers, **sizes, **strides, **scalars}, constexprs


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("kernel_name", ["stats", "grad"])
def test_every_shipped_tile_config_compiles_fits_and_does_not_spill(kernel_name, dtype, arch):
    problems, compiled = [], 0
    for unit_axis in ("w", "c"):  # NCHW, channels_last
        for fn, signature, constexprs in _pixel_kernel_compilations(kernel_name, dtype, unit_axis):
            for config in fused.PIXEL_TILE_CONFIGS:
                result = compile_kernel(
                    fn, signature, {**constexprs, **config.kwargs}, arch=arch, num_warps=config.num_warps,
                    num_stages=config.num_stages,
                )  # fmt: skip
                compiled += 1
                problems += [f"{result.summary()} unit stride {unit_axis}: {p}" for p in result.problems()]
    assert compiled >= 2 * len(fused.PIXEL_TILE_CONFIGS)
    assert problems == []


@pytest.mark.parametrize("arch", ARCHES)
def test_attention_reduction_compiles_fits_and_does_not_spill(arch):
    signature = {"Q_R": "*fp32", "Q_G": "*fp32", "AT": "*fp32", "AT_COEF": "*fp32", "P": "i32"}
    signature |= {"norm_eps": "fp32", "grad_scale": "fp32"}
    result = compile_kernel(
        fused._attention_kernel, signature, {"BLOCK": fused.ATTENTION_BLOCK}, arch=arch,
        num_warps=fused.ATTENTION_WARPS,
    )  # fmt: skip
    assert result.problems() == []


def _cuda(tensors):
    return [t.detach().cuda().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shapes", [[ODD_SHAPE], MULTI_LEVEL_SHAPES, [(8, 512, 32, 32)]], ids=["odd", "multi", "big"])
def test_gpu_fp32_matches_reference(layout, shapes):
    torch.manual_seed(0)
    student, teacher = make_levels(shapes, layout)
    student, teacher = _cuda(student), _cuda(teacher)
    assert_matches_reference(lambda s, t: feature_regression_loss(s, t, backend="triton"), student, teacher)


def _loss_in_bf16_by_torch(r, g):
    """The loss as PyTorch computes it in bf16 arithmetic: the yardstick for the kernel's bf16 error."""
    g = F.layer_norm(g.permute(0, 2, 3, 1), (g.shape[1],), eps=1e-6).permute(0, 3, 1, 2)
    q_r = F.normalize(r.pow(2).sum(1).flatten(1), dim=1, eps=1e-12)
    q_g = F.normalize(g.pow(2).sum(1).flatten(1), dim=1, eps=1e-12)
    return F.mse_loss(r, g) + 10.0 * torch.linalg.vector_norm(q_r - q_g, dim=1).mean()


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_bf16_error_is_within_twice_torch_bf16_error(layout):
    torch.manual_seed(1)
    (r,), (g,) = make_levels([(4, 256, 16, 16)], layout)
    r, g = r.detach().cuda(), g.detach().cuda()

    def loss_and_grad(fn, x):
        x = x.detach().requires_grad_(True)
        loss = fn(x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.float(), grad.float()

    want = loss_and_grad(lambda x: feature_regression_loss_reference([x], [g]).loss, r)
    torch_bf16 = loss_and_grad(lambda x: _loss_in_bf16_by_torch(x, g.bfloat16()), r.bfloat16())
    kernel_bf16 = loss_and_grad(lambda x: feature_regression_loss(x, g.bfloat16(), backend="triton").loss, r.bfloat16())
    for index, name in enumerate(("loss", "grad")):
        err_torch = (torch_bf16[index] - want[index]).abs().max().item()
        err_kernel = (kernel_bf16[index] - want[index]).abs().max().item()
        assert err_kernel <= 2 * err_torch + 1e-6, f"{name}: kernel {err_kernel:.3g} vs torch bf16 {err_torch:.3g}"


@pytest.mark.gpu
def test_gpu_inductor_compiled_step_matches_eager():
    torch.manual_seed(2)
    regressor = torch.nn.Conv2d(8, 64, 1).cuda()
    images, teacher = torch.randn(4, 8, 16, 16, device="cuda"), torch.randn(4, 64, 16, 16, device="cuda")

    def step(x):
        return feature_regression_loss(regressor(x), teacher, backend="triton").loss

    step(images).backward()
    want = regressor.weight.grad.clone()
    regressor.zero_grad()
    torch.compile(step, fullgraph=True)(images).backward()
    torch.testing.assert_close(regressor.weight.grad, want, rtol=1e-4, atol=1e-6)

"""Fused feature-loss kernels: interpreter correctness (subprocess), AOT compile of every shipped config, GPU.

- Interpreter: tests/triton_interpreted_feature_loss.py runs in a child process with TRITON_INTERPRET=1, because
  `@triton.jit` chooses the interpreter when the kernel module is imported (this process compiles for GPUs).
- AOT: every launch of a forward over real level shapes x {bf16, fp32} x {sm_80, sm_90} x {NCHW, channels_last},
  captured from CPU tensors and specialised by Triton's own binder (dtkernels.aot); must compile, fit shared
  memory, not spill, and load no element narrower than 32 bits at a time (an odd level: compile and fit).
- GPU (`gpu`, skipped without CUDA): fp32 against the reference, bf16 within twice PyTorch's own bf16 error,
  and an inductor-compiled step.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from feature_loss_cases import LAYOUTS, MULTI_LEVEL_SHAPES, ODD_SHAPE, assert_matches_reference, make_levels

from dtengine.ops import feature_regression_loss, feature_regression_loss_reference
from dtkernels.aot import ARCHES, capture_launches, compile_launch
from dtkernels.feature_loss import kernel as fused
from dtkernels.feature_loss.launcher import feature_loss_backward, feature_loss_forward

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


# The levels of the paper's ADM-256 teacher regressed at 256 px (batch 32), and a level of odd sizes whose rows
# cannot start on 16 bytes (so it loads an element at a time).
AOT_LEVELS = [(32, 512, 32, 32), (32, 512, 16, 16), (32, 1024, 8, 8)]
ODD_LEVEL = (3, 37, 7, 9)


def captured_loss_launches(shape, dtype: torch.dtype, layout: str, whiten: bool):
    """Every kernel launch of a fused forward and backward over one level, captured from CPU tensors as the
    launchers make them (the autotuned pixel kernels once per tile config), for `dtkernels.aot.compile_launch`."""
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    r = torch.empty(shape, dtype=dtype).contiguous(memory_format=memory_format)
    with capture_launches() as launches:
        out = feature_loss_forward([r], [r.clone()], at_weight=10.0, whiten=whiten, layernorm_eps=1e-5, norm_eps=1e-6)
        feature_loss_backward(torch.ones(()), [r], [r.clone()], out.stats)
    assert len(launches) == 2 * len(fused.PIXEL_TILE_CONFIGS) + 1
    return launches


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_real_launch_compiles_fits_does_not_spill_and_loads_vectors(layout, dtype, arch):
    problems, seen = [], set()
    for shape, whiten in itertools.product([*AOT_LEVELS, ODD_LEVEL], (True, False)):
        for launch in captured_loss_launches(shape, dtype, layout, whiten):
            result = compile_launch(launch, arch)
            if (result.summary(), result.specialization) in seen:  # levels that specialise alike compile alike
                continue
            seen.add((result.summary(), result.specialization))
            print(f"{shape} {layout} {dtype} whiten={whiten} {launch.options()}: {result.summary()}")
            if shape == ODD_LEVEL:
                # Rows that start anywhere: every element is addressed and loaded on its own, and the widest fp32
                # tile (64 channels x 32 pixels) spills a little. Only such levels pay it, and the autotuner
                # times the configs, so it picks one that does not; the numbers must stay correct (interpreter).
                assert result.fits_shared_memory and result.local_bytes + result.stack_bytes <= 64, result.summary()
                continue
            problems += [f"{shape} {result.summary()}: {p}" for p in result.problems()]
            if result.narrow_loads:
                problems.append(f"{shape} {result.summary()}: {result.narrow_loads} loads narrower than 32 bits")
            if layout == "contiguous" and "stats" in result.name and any(result.loop_barriers):
                problems.append(f"{shape} {result.summary()}: a CTA barrier in the NCHW channel loop")
    assert problems == []


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


@pytest.mark.parametrize(
    "shape, kept_block_p",
    [
        ((64, 512, 16, 16), {64, 32}),  # 64 or 128 programs would leave most of 132 SMs idle
        ((64, 512, 64, 64), {256, 128, 64, 32}),  # a large level keeps every tile
        ((1, 512, 8, 8), {32}),  # nothing fills the GPU: the tiles giving the most programs
    ],
)
def test_the_autotuner_never_considers_tiles_that_leave_most_sms_idle(shape, kept_block_p):
    r = torch.empty(shape)
    kept = fused.keep_tiles_that_fill_the_gpu(
        fused.PIXEL_TILE_CONFIGS, {"R": r, "P": shape[2] * shape[3]}, multiprocessors=132, FLAT_PIXELS=True
    )
    assert {c.kwargs["BLOCK_P"] for c in kept} == kept_block_p
    assert all(fused.programs(c, shape[2] * shape[3], shape[0]) >= 132 for c in kept) or len(kept_block_p) == 1
    for kernel in (fused._stats_kernel, fused._grad_kernel):
        assert kernel.early_config_prune is fused.keep_tiles_that_fill_the_gpu

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


def captured_loss_launches(shapes, dtype: torch.dtype, layout: str, whiten: bool):
    """Every kernel launch of a fused forward and backward over `shapes` (one launch covers every level),
    captured from CPU tensors as the launchers make them (the autotuned pixel kernels once per tile config), for
    `dtkernels.aot.compile_launch`."""
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    rs = [torch.empty(shape, dtype=dtype).contiguous(memory_format=memory_format) for shape in shapes]
    gs = [r.clone() for r in rs]
    with capture_launches() as launches:
        out = feature_loss_forward(rs, gs, at_weight=10.0, whiten=whiten, layernorm_eps=1e-5, norm_eps=1e-6)
        feature_loss_backward(torch.ones(()), rs, gs, out.stats)
    assert len(launches) == 2 * len(fused.PIXEL_TILE_CONFIGS) + 2
    return launches


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_real_launch_compiles_fits_does_not_spill_and_loads_vectors(layout, dtype, arch):
    problems, seen = [], set()
    for shape, whiten in itertools.product([AOT_LEVELS, [ODD_LEVEL]], (True, False)):
        for launch in captured_loss_launches(shape, dtype, layout, whiten):
            result = compile_launch(launch, arch)
            if (result.summary(), result.specialization) in seen:  # levels that specialise alike compile alike
                continue
            seen.add((result.summary(), result.specialization))
            print(f"{shape} {layout} {dtype} whiten={whiten} {launch.options()}: {result.summary()}")
            if shape == [ODD_LEVEL]:
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
    pixels = (shape[2] * shape[3],)
    kept = fused.keep_tiles_that_fill_the_gpu(
        fused.PIXEL_TILE_CONFIGS, {"RS": (r,), "PS": pixels}, multiprocessors=132, FLAT_PIXELS=True
    )
    assert {c.kwargs["BLOCK_P"] for c in kept} == kept_block_p
    assert all(fused.programs(c, pixels, shape[0]) >= 132 for c in kept) or len(kept_block_p) == 1
    for kernel in (fused._stats_kernel, fused._grad_kernel):
        assert kernel.early_config_prune is fused.keep_tiles_that_fill_the_gpu


def test_the_programs_of_one_launch_cover_every_level():
    """A pixel kernel's grid is every level's tiles: a small level's few programs add to the big one's."""
    (config,) = [c for c in fused.PIXEL_TILE_CONFIGS if c.kwargs["BLOCK_P"] == 256]
    assert fused.programs(config, (32 * 32, 16 * 16, 8 * 8), 4) == (4 + 1 + 1) * 4
    kept = fused.keep_tiles_that_fill_the_gpu([config], {"RS": (torch.empty(4, 8, 32, 32),), "PS": (1024, 256, 64)},
                                              multiprocessors=16)  # fmt: skip
    assert kept == [config]  # 24 programs fill 16 SMs


# Metadata-only aten ops: they allocate or view, and launch no kernel.
NO_KERNEL_OPS = {
    "empty", "empty_strided", "empty_like", "view", "_unsafe_view", "alias", "unbind", "select", "slice", "detach",
    "as_strided", "_reshape_alias", "expand", "permute", "split", "split_with_sizes", "t",
}  # fmt: skip


class KernelOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops that would launch a kernel (not allocations or views)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in NO_KERNEL_OPS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_three_level_forward_and_backward_is_four_launches(layout):
    """Counted by capturing the launchers' kernel launches (an autotuned one counts once) and every torch op that
    would run a kernel between them: three forward (statistics, attention, scalars), one backward, no torch
    kernels; at most six is the target."""
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    rs = [torch.empty(shape, dtype=torch.bfloat16).contiguous(memory_format=memory_format) for shape in AOT_LEVELS]
    gs, grad_loss = [r.clone() for r in rs], torch.ones(())
    with capture_launches(every_config=False) as launches, KernelOps() as torch_ops:
        out = feature_loss_forward(rs, gs, at_weight=10.0, whiten=True, layernorm_eps=1e-5, norm_eps=1e-6)
        grads = feature_loss_backward(grad_loss, rs, gs, out.stats)
    assert [launch.name for launch in launches] == ["_stats_kernel", "_attention_kernel", "_reduce_kernel",
                                                    "_grad_kernel"]  # fmt: skip
    assert torch_ops.ops == []
    assert len(launches) + len(torch_ops.ops) <= 6
    assert [g.shape for g in grads] == [r.shape for r in rs] and out.stats.shape == (3, 32 * (1024 + 256 + 64))


def test_levels_of_different_layouts_get_a_pixel_launch_each():
    """NCHW and channels_last levels compile to different code: one statistics launch per layout."""
    rs = [torch.empty(4, 64, 16, 16), torch.empty(4, 64, 8, 8).contiguous(memory_format=torch.channels_last)]
    with capture_launches(every_config=False) as launches:
        out = feature_loss_forward(rs, rs, at_weight=10.0, whiten=True, layernorm_eps=1e-5, norm_eps=1e-6)
        feature_loss_backward(torch.ones(()), rs, rs, out.stats)
    names = [launch.name for launch in launches]
    assert names == ["_stats_kernel", "_stats_kernel", "_attention_kernel", "_reduce_kernel", "_grad_kernel"]

"""Triton kernels of the fused feature loss vs the fp32 reference, under the CPU interpreter.

Not collected by the normal run: `@triton.jit` picks the interpreter when the kernel module is imported, so
test_kernels_feature_loss.py runs this file in a subprocess with TRITON_INTERPRET=1 set from the start.
"""

from __future__ import annotations

import pytest
import torch
from feature_loss_cases import LAYOUTS, MULTI_LEVEL_SHAPES, ODD_SHAPE, assert_matches_reference, make_levels

from dtengine.ops import feature_regression_loss, fused_feature_regression_loss
from dtkernels.feature_loss import feature_loss_backward, feature_loss_forward
from dtkernels.feature_loss.kernel import PIXEL_TILE_CONFIGS
from dtkernels.interpreter import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 before triton kernels are imported")


def _triton_loss(at_weight=10.0, whiten=True):
    return lambda s, t: fused_feature_regression_loss(s, t, at_weight=at_weight, whiten=whiten, impl="triton")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("whiten", [True, False])
def test_odd_shape_matches_reference(layout, whiten):
    torch.manual_seed(0)
    student, teacher = make_levels([ODD_SHAPE], layout)
    assert_matches_reference(_triton_loss(whiten=whiten), student, teacher, whiten=whiten)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_multi_level_with_different_channels_matches_reference(layout):
    torch.manual_seed(1)
    student, teacher = make_levels(MULTI_LEVEL_SHAPES, layout)
    assert_matches_reference(_triton_loss(at_weight=2.5), student, teacher, at_weight=2.5)


def test_levels_of_mixed_layouts_in_one_call_match_reference():
    """NCHW, channels_last and strided levels take different statistics launches that share the statistics array
    and the one attention / scalar launch."""
    torch.manual_seed(7)
    student, teacher = [], []
    for shape, layout in zip(MULTI_LEVEL_SHAPES, ("channels_last", "contiguous", "non_contiguous")):
        (r,), (g,) = make_levels([shape], layout)
        student.append(r)
        teacher.append(g)
    assert_matches_reference(_triton_loss(), student, teacher)


@pytest.mark.parametrize("config", PIXEL_TILE_CONFIGS, ids=str)
def test_every_shipped_tile_config_is_correct(config):
    """Each config masks its own ragged edge of the odd shape (C = 37, P = 63) correctly."""
    torch.manual_seed(2)
    (r,), (g,) = make_levels([ODD_SHAPE], "channels_last")
    out = feature_loss_forward([r.detach()], [g], at_weight=10.0, whiten=True, layernorm_eps=1e-6, norm_eps=1e-12,
                               config=config)  # fmt: skip
    reference = feature_regression_loss(r.detach(), g, backend="torch")
    torch.testing.assert_close(out.mse, reference.mse, rtol=1e-5, atol=1e-6)
    upstream = torch.tensor(0.75)
    (grad,) = feature_loss_backward(upstream, [r.detach()], [g], out.stats, config=config)
    want = torch.func.grad(lambda x: feature_regression_loss(x, g, backend="torch").loss)(r.detach()) * upstream
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_mse_stays_accurate_when_the_student_is_close_to_the_target():
    """The forward expands sum (r - g~)^2 from channel statistics: near convergence that cancels; check its size."""
    torch.manual_seed(5)
    (_,), (g,) = make_levels([ODD_SHAPE], "contiguous")
    whitened = feature_regression_loss(g, g, backend="torch")  # r = g: the whitened target differs from r
    r = ((g - g.mean(1, keepdim=True)) * torch.rsqrt(g.var(1, unbiased=False, keepdim=True) + 1e-6)).detach()
    r = (r + 1e-2 * torch.randn_like(r)).contiguous()
    out = feature_loss_forward([r], [g], at_weight=10.0, whiten=True, layernorm_eps=1e-6, norm_eps=1e-12)
    want = feature_regression_loss(r, g, backend="torch").mse
    assert whitened.mse > 0.5  # the case is not trivially exact
    torch.testing.assert_close(out.mse, want, rtol=2e-3, atol=0)


@pytest.mark.parametrize("whiten", [True, False])
def test_large_channel_means_lose_no_precision(whiten):
    """Teacher features can have a channel mean far above their spread: statistics must not cancel."""
    torch.manual_seed(6)
    (r,), (g,) = make_levels([ODD_SHAPE], "contiguous")
    r, g = (300.0 + r.detach()).requires_grad_(), 1000.0 + 0.5 * g
    out = fused_feature_regression_loss([r], [g], at_weight=10.0, whiten=whiten, impl="triton")
    (grad,) = torch.autograd.grad(out.loss, r)
    r64 = r.detach().double().requires_grad_()
    want = feature_regression_loss([r64], [g.double()], at_weight=10.0, whiten=whiten, backend="torch")
    (want_grad,) = torch.autograd.grad(want.loss, r64)
    for got, exact in zip((out.loss, out.mse, out.at), (want.loss, want.mse, want.at)):
        torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def test_public_function_runs_triton_under_the_interpreter():
    torch.manual_seed(3)
    student, teacher = make_levels([ODD_SHAPE], "non_contiguous")
    assert_matches_reference(lambda s, t: feature_regression_loss(s, t, backend="triton"), student, teacher)


def test_compiled_step_with_triton_impl_has_no_graph_break():
    torch.manual_seed(4)
    regressor = torch.nn.Conv2d(3, 37, 1)
    images, teacher = torch.randn(3, 3, 7, 9), torch.randn(ODD_SHAPE)

    def step(x):
        return fused_feature_regression_loss([regressor(x)], [teacher], impl="triton").loss

    step(images).backward()
    want = regressor.weight.grad.clone()
    regressor.zero_grad()
    # aot_eager traces the op through its fake and autograd registrations without inductor's compile cost.
    torch.compile(step, backend="aot_eager", fullgraph=True)(images).backward()
    torch.testing.assert_close(regressor.weight.grad, want, rtol=1e-4, atol=1e-6)

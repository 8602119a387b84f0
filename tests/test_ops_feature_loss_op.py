"""The fused custom op with its PyTorch implementation (CPU): math, autograd, dispatch and torch.compile.

The Triton implementation behind the same op is tested under the interpreter (test_kernels_feature_loss.py)
and on GPUs (tests marked `gpu`).
"""

from __future__ import annotations

import pytest
import torch
from feature_loss_cases import LAYOUTS, MULTI_LEVEL_SHAPES, ODD_SHAPE, assert_matches_reference, make_levels

from dtengine.ops import feature_regression_loss, fused_feature_regression_loss
from dtengine.ops.feature_loss.op import attention_distance_and_grad


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shapes", [[ODD_SHAPE], MULTI_LEVEL_SHAPES], ids=["odd", "multi_level"])
@pytest.mark.parametrize("whiten", [True, False])
def test_torch_impl_matches_reference(layout, shapes, whiten):
    torch.manual_seed(0)
    student, teacher = make_levels(shapes, layout)
    assert_matches_reference(
        lambda s, t: fused_feature_regression_loss(s, t, at_weight=3.0, whiten=whiten, impl="torch"),
        student,
        teacher,
        at_weight=3.0,
        whiten=whiten,
    )


def test_attention_gradient_matches_autograd_including_degenerate_samples():
    torch.manual_seed(1)
    q_r = torch.rand(4, 10, dtype=torch.float64)
    q_g = torch.rand(4, 10, dtype=torch.float64)
    q_g[1] = q_r[1]  # identical maps: distance exactly 0, gradient 0 (as torch.norm's at 0)
    q_r[2] = 0.0  # below the norm clamp
    leaf = q_r.clone().requires_grad_(True)
    qhat = lambda q: q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    want = (qhat(leaf) - qhat(q_g)).norm(dim=1)
    upstream = torch.randn(4, dtype=torch.float64)
    (want * upstream).sum().backward()
    distance, grad = attention_distance_and_grad(q_r, q_g)
    torch.testing.assert_close(distance, want.detach())
    torch.testing.assert_close(grad * upstream[:, None], leaf.grad)
    assert grad[1].abs().max() == 0


def test_backward_scales_with_the_incoming_gradient_and_mse_at_carry_none():
    torch.manual_seed(2)
    (r,), (g,) = make_levels([ODD_SHAPE], "contiguous")
    out = fused_feature_regression_loss([r], [g], impl="torch")
    assert not out.mse.requires_grad and not out.at.requires_grad
    (out.loss * 0.25).backward()
    first = r.grad.clone()
    r.grad = None
    fused_feature_regression_loss([r], [g], impl="torch").loss.backward()
    torch.testing.assert_close(first, r.grad * 0.25)


def test_public_function_detaches_terms_for_every_backend():
    (r,), (g,) = make_levels([(2, 4, 3, 3)], "contiguous")
    out = feature_regression_loss(r, g, backend="torch")
    assert out.loss.requires_grad and not out.mse.requires_grad and not out.at.requires_grad


def test_compiled_student_step_has_no_graph_break():
    """fullgraph=True fails on any graph break; the op's fake and autograd registrations make it traceable."""
    torch.manual_seed(3)
    regressor = torch.nn.Conv2d(3, 5, 1)
    images = torch.randn(2, 3, 5, 7)
    teacher = torch.randn(2, 5, 5, 7)

    def step(x):
        return fused_feature_regression_loss([regressor(x)], [teacher], impl="torch").loss

    eager = step(images)
    eager.backward()
    want = regressor.weight.grad.clone()
    regressor.zero_grad()
    compiled = torch.compile(step, fullgraph=True)(images)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(regressor.weight.grad, want, rtol=1e-4, atol=1e-6)


def test_public_dispatch_traces_without_graph_break():
    """Backend resolution (flags, device checks) must not break the graph; dynamo-only tracing is enough here."""
    (r,), (g,) = make_levels([(2, 4, 3, 3)], "contiguous")
    traced = torch.compile(lambda s, t: feature_regression_loss(s, t).loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(traced(r, g), feature_regression_loss(r, g).loss)

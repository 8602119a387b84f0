"""`feature_regression_loss` reference: hand-computed values, an independent formula, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dtengine.ops import attention_map, feature_regression_loss, whiten_channels
from dtengine.runtime.errors import BackendError

# (B, C, H, W) per level; includes odd, non-power-of-two sizes.
LEVEL_SHAPES = [[(2, 8, 4, 4)], [(3, 37, 7, 9)], [(2, 16, 8, 8), (2, 5, 3, 5), (2, 33, 1, 1)]]


def independent_loss(student, teacher, at_weight=10.0, whiten=True):
    """Same definition written with torch's own layer_norm and normalize."""
    total = 0.0
    for r, g in zip(student, teacher):
        if whiten:
            g = F.layer_norm(g.permute(0, 2, 3, 1), (g.shape[1],), eps=1e-6).permute(0, 3, 1, 2)
        mse = F.mse_loss(r, g)
        q_r = F.normalize(r.pow(2).sum(1).flatten(1), dim=1)
        q_g = F.normalize(g.pow(2).sum(1).flatten(1), dim=1)
        at = torch.linalg.vector_norm(q_r - q_g, dim=1).mean()
        total = total + mse + at_weight * at
    return total / len(student)


def test_hand_computed_without_whitening():
    r = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2): energy at pixel 0
    g = torch.tensor([[[[0.0, 0.0]], [[0.0, 1.0]]]])  # energy at pixel 1
    out = feature_regression_loss([r], [g], whiten=False)
    assert out.mse.item() == pytest.approx(0.5)
    assert out.at.item() == pytest.approx(math.sqrt(2))
    assert out.loss.item() == pytest.approx(0.5 + 10 * math.sqrt(2))


def test_hand_computed_with_whitening():
    r = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])
    g = torch.tensor([[[[0.0, 0.0]], [[0.0, 1.0]]]])
    # pixel 0 is constant over channels -> whitened to 0; pixel 1 (0, 1) -> (-a, a) with a = 0.5/sqrt(0.25+eps)
    a = 0.5 / math.sqrt(0.25 + 1e-6)
    out = feature_regression_loss([r], [g], at_weight=2.0)
    assert out.mse.item() == pytest.approx((1 + 2 * a * a) / 4, rel=1e-6)
    assert out.at.item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert out.loss.item() == pytest.approx((1 + 2 * a * a) / 4 + 2 * math.sqrt(2), rel=1e-6)


@pytest.mark.parametrize("shapes", LEVEL_SHAPES)
@pytest.mark.parametrize("whiten", [True, False])
def test_matches_independent_formula(shapes, whiten):
    torch.manual_seed(0)
    student = [torch.randn(s) for s in shapes]
    teacher = [torch.randn(s) * 3 + 1 for s in shapes]
    out = feature_regression_loss(student, teacher, at_weight=10.0, whiten=whiten)
    torch.testing.assert_close(out.loss, independent_loss(student, teacher, 10.0, whiten), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shapes", LEVEL_SHAPES)
def test_gradient_matches_independent_formula_with_random_upstream(shapes):
    torch.manual_seed(1)
    upstream = torch.randn(())  # a random incoming gradient, not 1
    student = [torch.randn(s, requires_grad=True) for s in shapes]
    teacher = [torch.randn(s, requires_grad=True) for s in shapes]
    (feature_regression_loss(student, teacher).loss * upstream).backward()
    ours = [s.grad.clone() for s in student]
    assert all(t.grad is None for t in teacher), "the teacher must receive no gradient"
    reference_student = [s.detach().clone().requires_grad_(True) for s in student]
    (independent_loss(reference_student, [t.detach() for t in teacher]) * upstream).backward()
    for got, want in zip(ours, reference_student):
        torch.testing.assert_close(got, want.grad, rtol=1e-4, atol=1e-6)


def test_gradcheck_in_double():
    torch.manual_seed(2)
    r = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: feature_regression_loss([x], [g]).loss, (r,))


def test_low_precision_inputs_are_computed_in_fp32():
    torch.manual_seed(3)
    r, g = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    out = feature_regression_loss([r.bfloat16()], [g.bfloat16()])
    assert out.loss.dtype == torch.float32
    expected = feature_regression_loss([r.bfloat16().float()], [g.bfloat16().float()])
    torch.testing.assert_close(out.loss, expected.loss)


def test_pieces_are_what_the_docstring_says():
    x = torch.randn(2, 6, 3, 4)
    w = whiten_channels(x)
    torch.testing.assert_close(w.mean(1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    q = attention_map(x)
    assert q.shape == (2, 12)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(2))


def test_bad_inputs_are_clear_errors():
    a = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="level 0"):
        feature_regression_loss([a], [torch.randn(1, 4, 2, 3)])
    with pytest.raises(ValueError, match="one student map per teacher map"):
        feature_regression_loss([a, a], [a])
    with pytest.raises(BackendError, match="backend"):
        feature_regression_loss([a], [a], backend="cuda-magic")
    assert feature_regression_loss(a, a).loss.ndim == 0  # a single tensor counts as one level

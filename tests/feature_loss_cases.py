"""Shared cases for every backend of `feature_regression_loss`: shapes, memory layouts, and the oracle check.

Imported by the reference / fused-op tests, the Triton-interpreter cases and the GPU tests, so all of them are
held to the same shapes (including an odd, non-power-of-two one) and the same random-upstream gradient check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dtengine.ops import feature_regression_loss_reference

ODD_SHAPE = (3, 37, 7, 9)  # (B, C, H, W): nothing is a power of two
MULTI_LEVEL_SHAPES = [(2, 16, 8, 8), (2, 5, 3, 5), (2, 33, 1, 1)]  # different C per level, a 1x1 level
LAYOUTS = ("contiguous", "channels_last", "non_contiguous")


def make_feature_map(shape: Sequence[int], layout: str, *, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    """A random (B, C, H, W) fp32 leaf tensor stored in `layout`."""
    batch, channels, height, width = shape
    if layout == "contiguous":
        return torch.randn(batch, channels, height, width) * scale + shift
    if layout == "channels_last":
        x = torch.randn(batch, channels, height, width) * scale + shift
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        # A strided window of a larger map: no stride of it is the dense one.
        larger = torch.randn(batch, channels + 3, 2 * height, width + 2) * scale + shift
        return larger[:, 1 : channels + 1, ::2, 1 : width + 1]
    raise ValueError(layout)


def make_levels(shapes: Sequence[Sequence[int]], layout: str) -> tuple[list[Tensor], list[Tensor]]:
    """Student maps (leaves requiring grad) and teacher maps with a large channel mean, one per shape."""
    student = [make_feature_map(s, layout).requires_grad_(True) for s in shapes]
    teacher = [make_feature_map(s, layout, scale=3.0, shift=1.0) for s in shapes]
    return student, teacher


def assert_matches_reference(
    loss_fn: Callable[[list[Tensor], list[Tensor]], object],
    student: list[Tensor],
    teacher: list[Tensor],
    *,
    at_weight: float = 10.0,
    whiten: bool = True,
    rtol: float = 1e-5,
    grad_rtol: float = 1e-4,
) -> None:
    """loss_fn(student, teacher) -> FeatureRegressionLoss must match the fp32 reference in value and gradient.

    The gradient is checked with a random upstream gradient (not 1), relative to the largest gradient entry.
    """
    upstream = torch.randn(()).abs() + 0.5
    leaves = [s.detach().clone().requires_grad_(True) for s in student]
    want = feature_regression_loss_reference(leaves, teacher, at_weight=at_weight, whiten=whiten)
    (want.loss * upstream).backward()

    got = loss_fn(student, teacher)
    for name in ("loss", "mse", "at"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name).detach(), rtol=rtol, atol=1e-6, msg=name)
    for s in student:
        s.grad = None
    (got.loss * upstream).backward()
    for level, (s, leaf) in enumerate(zip(student, leaves)):
        scale = leaf.grad.abs().max().item()
        torch.testing.assert_close(
            s.grad.float(), leaf.grad, rtol=grad_rtol, atol=grad_rtol * scale, msg=f"gradient of level {level}"
        )
    assert all(t.grad is None for t in teacher), "the teacher must receive no gradient"

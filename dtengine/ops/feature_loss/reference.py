"""Pure-PyTorch fp32 reference of `feature_regression_loss` (definition: `dtengine.ops.feature_regression_loss`).

It is the CPU path, the fallback whenever the fused Triton kernel cannot run, and the oracle the kernel's tests
and benchmarks compare against: change the definition here and every backend must follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

LAYERNORM_EPS = 1e-6
AT_NORM_EPS = 1e-12


class FeatureRegressionLoss(NamedTuple):
    """Scalar loss and its two terms, each averaged over levels (0-dim fp32 tensors)."""

    loss: Tensor  # mse + at_weight * at
    mse: Tensor  # mean over levels of mse_l
    at: Tensor  # mean over levels of at_l


def _fp32(x: Tensor) -> Tensor:
    # fp64 stays fp64 so gradcheck can verify the reference; every lower precision is lifted to fp32.
    return x if x.dtype == torch.float64 else x.float()


def whiten_channels(features: Tensor, eps: float = LAYERNORM_EPS) -> Tensor:
    """Non-learnable LayerNorm over channels at every pixel (the paper's feature "whitening").

    Shape: (B, C, H, W) -> (B, C, H, W), computed in fp32 (fp64 inputs stay fp64).
    """
    x = _fp32(features)
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def attention_map(features: Tensor, eps: float = AT_NORM_EPS) -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis with p = 2, L2-normalised per sample.

    q[b, p] = sum_c x[b, c, p]^2, qhat[b] = q[b] / max(||q[b]||_2, eps).
    Shape: (B, C, H, W) -> (B, H*W), fp32.
    """
    q = _fp32(features).pow(2).sum(dim=1).flatten(1)  # (B, H*W)
    return q / q.norm(dim=1, keepdim=True).clamp_min(eps)


def feature_regression_loss_reference(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], at_weight: float = 10.0, whiten: bool = True
) -> FeatureRegressionLoss:
    """fp32 reference of `dtengine.ops.feature_regression_loss`; see there for the definition.

    Unlike the public function, mse and at keep their autograd history (the oracle differentiates each term).
    """
    mse_terms, at_terms = [], []
    for r, g in zip(student_feats, teacher_feats):
        r = _fp32(r)
        g = whiten_channels(g.detach()) if whiten else _fp32(g.detach())
        mse_terms.append((r - g).pow(2).mean())
        at_terms.append((attention_map(r) - attention_map(g)).norm(dim=1).mean())
    mse = torch.stack(mse_terms).mean()
    at = torch.stack(at_terms).mean()
    return FeatureRegressionLoss(mse + at_weight * at, mse, at)

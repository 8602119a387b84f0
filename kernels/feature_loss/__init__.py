"""Fused feature-regression loss (whitening + MSE + attention transfer): forward and backward, in Triton.

kernel.py holds the @triton.jit kernels and their tile configurations; launcher.py allocates and launches them.
The autograd / custom_op layer and the pure-PyTorch reference live in `dtengine.ops` (kernels never import the
engine).
"""

from dtkernels.feature_loss.launcher import (
    FusedFeatureLoss,
    bytes_moved,
    feature_loss_backward,
    feature_loss_forward,
)

__all__ = ["FusedFeatureLoss", "bytes_moved", "feature_loss_backward", "feature_loss_forward"]

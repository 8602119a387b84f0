"""Public ops. Each dispatches between a fused kernel (from `kernels/`) and its pure-PyTorch reference."""

from dtengine.ops.attention import attention, attention_reference
from dtengine.ops.feature_loss import (
    FeatureRegressionLoss,
    attention_map,
    feature_regression_loss,
    feature_regression_loss_reference,
    whiten_channels,
)
from dtengine.ops.feature_loss_fused import fused_feature_regression_loss

__all__ = [
    "FeatureRegressionLoss",
    "attention",
    "attention_map",
    "attention_reference",
    "feature_regression_loss",
    "feature_regression_loss_reference",
    "fused_feature_regression_loss",
    "whiten_channels",
]

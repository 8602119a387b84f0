"""Public ops. Each dispatches between a fused kernel (from `kernels/`) and its pure-PyTorch reference."""

from dtengine.ops.attention import attention, attention_reference
from dtengine.ops.feature_loss import (
    FeatureRegressionLoss,
    attention_map,
    feature_regression_loss,
    feature_regression_loss_reference,
    whiten_channels,
)

__all__ = [
    "FeatureRegressionLoss",
    "attention",
    "attention_map",
    "attention_reference",
    "feature_regression_loss",
    "feature_regression_loss_reference",
    "whiten_channels",
]

"""Public ops. Each has the same shape: a pure-PyTorch fp32 reference (the CPU path and the oracle), a custom op
with the fused Triton kernel behind it, and the dispatch between them (`backends.py`, one rule for every op)."""

from dtengine.ops.attention import attention, attention_reference
from dtengine.ops.feature_loss import (
    FeatureRegressionLoss,
    attention_map,
    feature_regression_loss,
    feature_regression_loss_reference,
    fused_feature_regression_loss,
    whiten_channels,
)

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

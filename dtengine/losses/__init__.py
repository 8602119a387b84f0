"""Distillation objectives built from the public ops (label / mixed distillation terms join here)."""

from dtengine.losses.feature_distillation import LossConfig, feature_distillation_terms

__all__ = ["LossConfig", "feature_distillation_terms"]

"""Distillation objectives built from the public ops: feature regression, label distillation, their mix."""

from dtengine.losses.feature_distillation import LossConfig, feature_distillation_terms
from dtengine.losses.label_distillation import DistillConfig, distillation_terms, soft_cross_entropy, term_names
from dtengine.losses.segmentation import interpreter_loss, soft_dice_loss

__all__ = [
    "DistillConfig",
    "LossConfig",
    "distillation_terms",
    "feature_distillation_terms",
    "interpreter_loss",
    "soft_cross_entropy",
    "soft_dice_loss",
    "term_names",
]

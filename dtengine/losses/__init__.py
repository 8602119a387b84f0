"""Distillation objectives built from the public ops: the per-mode objective, soft labels, the interpreter's loss."""

from dtengine.losses.objective import MODES, DistillConfig, LossConfig, distillation_terms, term_names
from dtengine.losses.segmentation import interpreter_loss, soft_dice_loss
from dtengine.losses.soft_labels import soft_cross_entropy

__all__ = [
    "MODES",
    "DistillConfig",
    "LossConfig",
    "distillation_terms",
    "interpreter_loss",
    "soft_cross_entropy",
    "soft_dice_loss",
    "term_names",
]

"""Supervised segmentation loss of the feature interpreter: cross-entropy + dice_weight * multi-class soft Dice."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255
"""Label id that takes no part in the loss or in mIoU (the usual "void" id of segmentation datasets)."""


def soft_dice_loss(logits: Tensor, labels: Tensor, smooth: float = 1.0, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Multi-class soft Dice loss, summed over the whole batch ("batch Dice").

    With p = softmax(logits) over classes and y the one-hot labels, over the valid (non-ignored) pixels i:

        dice_c = (2 * sum_i p_ic * y_ic + smooth) / (sum_i p_ic + sum_i y_ic + smooth)
        loss   = 1 - mean_c dice_c                  (c over all K classes)

    `smooth` keeps a class absent from the batch well defined (dice_c -> 1 as its predicted mass -> 0).

    Args:
        logits: (B, K, H, W) class scores.
        labels: (B, H, W) int64 class ids in [0, K), or `ignore_index`.
    Returns:
        0-dim fp32 tensor.
    """
    logits = logits.float()
    valid = (labels != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    probs = logits.softmax(dim=1) * valid
    one_hot = F.one_hot(labels.where(labels != ignore_index, 0), logits.shape[1]).permute(0, 3, 1, 2) * valid
    intersection = (probs * one_hot).sum(dim=(0, 2, 3))  # (K,)
    denominator = probs.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    return 1 - ((2 * intersection + smooth) / (denominator + smooth)).mean()


def interpreter_loss(
    logits: Tensor, labels: Tensor, dice_weight: float = 3.0, ignore_index: int = IGNORE_INDEX
) -> dict[str, Tensor]:
    """The interpreter's training loss (paper: cross-entropy + 3 * Dice).

    Args:
        logits: (B, K, H, W), at the labels' resolution.
        labels: (B, H, W) int64.
    Returns:
        {"loss": ce + dice_weight * dice, "ce": mean pixel cross-entropy, "dice": `soft_dice_loss`}, 0-dim fp32.
    """
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    dice = soft_dice_loss(logits, labels, ignore_index=ignore_index)
    return {"loss": ce + dice_weight * dice, "ce": ce, "dice": dice}

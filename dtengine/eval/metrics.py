"""Segmentation and classification metrics, from a confusion matrix accumulated over all held-out pixels."""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Counts of (true class, predicted class) pairs.

    Args:
        pred: predicted label ids, any shape.
        target: true label ids, same shape as `pred`, in [0, num_classes) or `ignore_index` (left out).
        num_classes: K.
        ignore_index: target value of pixels that count nowhere.

    Returns:
        int64 (K, K); entry [i, j] counts elements with target i and prediction j.
    """
    valid = target.reshape(-1) != ignore_index
    index = target.reshape(-1)[valid].long() * num_classes + pred.reshape(-1)[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(confusion: Tensor) -> float:
    """Mean over classes present in the ground truth (background included) of TP / (TP + FP + FN).

    A class absent from the held-out ground truth has no defined IoU and is left out of the mean; pixels wrongly
    predicted as it still count, as false negatives of their true class.

    Args:
        confusion: (K, K) from `confusion_matrix`.

    Returns:
        mIoU in [0, 1].
    """
    confusion = confusion.double()
    tp = confusion.diag()
    present = confusion.sum(dim=1) > 0
    union = confusion.sum(dim=1) + confusion.sum(dim=0) - tp
    return (tp[present] / union[present]).mean().item()


def per_class_iou(confusion: Tensor) -> list[float | None]:
    """IoU of each class, None where the class is absent from the ground truth. Args: (K, K) confusion."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(dim=1) + confusion.sum(dim=0) - tp
    return [(t / u).item() if present else None for t, u, present in zip(tp, union, confusion.sum(dim=1) > 0)]


def pixel_accuracy(confusion: Tensor) -> float:
    """Fraction of pixels whose predicted class is the true one. Args: (K, K) confusion. Returns: in [0, 1]."""
    return (confusion.diag().sum() / confusion.sum().clamp_min(1)).item()


def top1_accuracy(logits_or_pred: Tensor, target: Tensor) -> float:
    """Fraction of samples whose top prediction is the target.

    Args:
        logits_or_pred: (N, K) scores or (N,) predicted ids.
        target: (N,) true ids.

    Returns:
        top-1 accuracy in [0, 1].
    """
    pred = logits_or_pred.argmax(dim=1) if logits_or_pred.dim() == 2 else logits_or_pred
    return (pred == target).double().mean().item()

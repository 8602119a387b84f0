"""Eval metrics against hand-computed values, and the level-wise head against concat-then-1x1-conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtengine.eval.heads import LevelwiseLinearHead
from dtengine.eval.metrics import confusion_matrix, mean_iou, pixel_accuracy, top1_accuracy
from dtengine.eval.report import aggregate, format_margins, format_table, margins_over


def test_confusion_miou_and_pixel_accuracy_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    confusion = confusion_matrix(pred, target, num_classes=3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # IoU: class 0 = 1 / (2 + 2 - 1), class 1 = 2 / (2 + 3 - 2), class 2 = 1 / (2 + 1 - 1)
    assert mean_iou(confusion) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert pixel_accuracy(confusion) == pytest.approx(4 / 6)


def test_miou_skips_classes_absent_from_ground_truth():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 3])  # class 3 is predicted once but never true
    confusion = confusion_matrix(pred, target, num_classes=4)
    # class 0: 1 / (2 + 1 - 1); class 1: 2 / (2 + 3 - 2); class 2: 1 / (2 + 1 - 1); class 3 left out
    assert mean_iou(confusion) == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert mean_iou(confusion_matrix(target, target, 4)) == 1.0


def test_top1_from_logits_and_from_ids():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.1, 3.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    target = torch.tensor([0, 2, 0, 1])
    assert top1_accuracy(logits, target) == pytest.approx(0.5)
    assert top1_accuracy(torch.tensor([0, 2, 1, 1]), target) == pytest.approx(0.75)


def test_aggregate_and_table():
    assert aggregate([0.5]) == {"per_seed": [0.5], "mean": 0.5, "std": 0.0}
    two = aggregate([0.2, 0.4])
    assert two["mean"] == pytest.approx(0.3) and two["std"] == pytest.approx(0.1414213562)
    table = format_table({"student": {"metrics": {"dense_miou": two}}})
    assert "0.300 ± 0.141" in table and "n/a" in table


def test_levelwise_head_equals_conv_on_concatenated_upsampled_levels():
    torch.manual_seed(0)
    channels, size = [3, 5, 7], (23, 23)  # odd size: upsampling factors are not integers
    feats = [torch.randn(2, c, s, s) for c, s in zip(channels, (12, 6, 3))]
    head = LevelwiseLinearHead(channels, num_classes=4)
    with torch.no_grad():
        head.bias.normal_()
        upsampled = torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats], 1)
        weight = torch.cat([conv.weight for conv in head.convs], dim=1)  # (K, sum C, 1, 1)
        reference = F.conv2d(upsampled, weight, head.bias)
        torch.testing.assert_close(head(feats, size), reference, rtol=1e-5, atol=1e-5)


def test_ignored_pixels_and_per_class_iou():
    from dtengine.eval.metrics import per_class_iou

    target = torch.tensor([0, 0, 1, 255, 2])
    pred = torch.tensor([0, 1, 1, 2, 1])
    confusion = confusion_matrix(pred, target, num_classes=4)
    assert confusion.sum() == 4  # the 255 pixel counts nowhere
    assert per_class_iou(confusion) == [pytest.approx(1 / 2), pytest.approx(1 / 3), 0.0, None]


def test_margins_use_the_larger_std_and_need_more_than_three():
    models = {
        "random": {"metrics": {"dense_miou": aggregate([0.20, 0.22, 0.24]), "global_top1": aggregate([0.5])}},
        "clear": {"metrics": {"dense_miou": aggregate([0.40, 0.41, 0.42])}},  # margin 0.19, std 0.02 -> 9.5
        "close": {"metrics": {"dense_miou": aggregate([0.26, 0.27, 0.28])}},  # margin 0.05, std 0.02 -> 2.5
        "one-seed": {"metrics": {"global_top1": aggregate([0.9])}},
    }
    margins = margins_over(models, "random")
    assert margins["clear"]["dense_miou"]["stds"] == pytest.approx(9.5)
    assert margins["clear"]["dense_miou"]["significant"]
    assert margins["close"]["dense_miou"]["stds"] == pytest.approx(2.5)
    assert not margins["close"]["dense_miou"]["significant"]
    assert margins["one-seed"]["global_top1"] == {"margin": pytest.approx(0.4), "std": 0.0, "stds": None,
                                                  "significant": False}  # fmt: skip
    text = format_margins(margins)
    assert "clear: dense probe mIoU +0.190 (+9.5 std) *" in text and "(n/a)" in text

"""mIoU / aAcc on hand-built label maps whose answer is worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from pvtlab.evaluation.segmentation import (
    SegmentationMetrics,
    confusion_matrix,
    iou_table,
    save_iou_csv,
    scores_from_confusion,
)

IGNORE = 255


def _maps() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 2x4 images, three classes, two ignored pixels (whose predictions must not count).

    image 1  target 0 0 1 1   pred 0 1 1 1
                    2 2 X X        2 0 0 0      (X = ignore; predicted 0 there)
    image 2  target 1 1 1 1   pred 1 1 1 2
                    2 2 0 0        2 2 0 0
    """
    target = torch.tensor(
        [
            [[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]],
            [[1, 1, 1, 1], [2, 2, 0, 0]],
        ]
    )
    pred = torch.tensor(
        [
            [[0, 1, 1, 1], [2, 0, 0, 0]],
            [[1, 1, 1, 2], [2, 2, 0, 0]],
        ]
    )
    return pred, target


def test_confusion_matrix_skips_ignored_pixels() -> None:
    pred, target = _maps()
    confusion = confusion_matrix(pred, target, num_classes=3, ignore_index=IGNORE)
    # rows = ground truth, columns = prediction, counted by hand from _maps
    expected = torch.tensor(
        [
            [3, 1, 0],  # gt 0: (0,0)->0, (0,1)->1, img2 (1,2),(1,3)->0
            [0, 5, 1],  # gt 1: img1 (0,2),(0,3)->1; img2 three ->1, one ->2
            [1, 0, 3],  # gt 2: img1 (1,0)->2, (1,1)->0; img2 both ->2
        ]
    )
    assert torch.equal(confusion, expected)
    assert confusion.sum() == 14  # the two ignored pixels are nowhere


def test_scores_match_the_hand_computed_answer() -> None:
    pred, target = _maps()
    scores = scores_from_confusion(confusion_matrix(pred, target, 3, IGNORE))
    # IoU = TP / (gt + pred - TP): class 0: 3/(4+4-3)=3/5; class 1: 5/(6+6-5)=5/7; class 2: 3/(4+4-3)=3/5
    expected_iou = [3 / 5, 5 / 7, 3 / 5]
    assert scores["IoU"].tolist() == pytest.approx(expected_iou)
    assert float(scores["mIoU"]) == pytest.approx(sum(expected_iou) / 3)
    assert float(scores["aAcc"]) == pytest.approx(11 / 14)
    assert float(scores["mAcc"]) == pytest.approx((3 / 4 + 5 / 6 + 3 / 4) / 3)


def test_miou_is_dataset_wide_not_an_average_of_images() -> None:
    """A class covering 1 pixel in one image and 99 in another weighs by pixels, not images."""
    metric = SegmentationMetrics(num_classes=2, ignore_index=IGNORE)
    target_a = torch.zeros(1, 10, 10, dtype=torch.long)
    target_a[0, 0, 0] = 1
    pred_a = torch.zeros_like(target_a)  # misses the single class-1 pixel
    target_b = torch.ones(1, 10, 10, dtype=torch.long)
    target_b[0, 0, 0] = 0
    pred_b = torch.ones_like(target_b)  # misses the single class-0 pixel
    metric.update(pred_a, target_a)
    metric.update(pred_b, target_b)
    scores = metric.compute()
    # class 0: TP 99, gt 100, pred 100 -> 99/101; class 1 likewise
    assert float(scores["mIoU"]) == pytest.approx(99 / 101)
    # a per-image average would give (99/100 * 0.5 + 0 * 0.5) per image: 0.495
    assert float(scores["mIoU"]) > 0.9


def test_class_absent_from_labels_and_predictions_is_left_out() -> None:
    target = torch.tensor([[0, 0, 1, IGNORE]])
    pred = torch.tensor([[0, 0, 1, 2]])  # class 2 predicted only on an ignored pixel
    scores = scores_from_confusion(confusion_matrix(pred, target, 3, IGNORE))
    assert math.isnan(float(scores["IoU"][2]))
    assert float(scores["mIoU"]) == pytest.approx(1.0)


def test_falsely_predicted_class_counts_as_zero_iou() -> None:
    target = torch.tensor([[0, 0, 0, 0]])
    pred = torch.tensor([[0, 0, 0, 1]])
    scores = scores_from_confusion(confusion_matrix(pred, target, 2, IGNORE))
    assert scores["IoU"].tolist() == pytest.approx([3 / 4, 0.0])
    assert float(scores["mIoU"]) == pytest.approx(3 / 8)


def test_metric_takes_logits_and_accumulates_over_updates() -> None:
    pred, target = _maps()
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    metric = SegmentationMetrics(3, IGNORE)
    metric.update(logits[:1], target[:1])
    metric.update(logits[1:], target[1:])
    assert float(metric.compute()["mIoU"]) == pytest.approx((3 / 5 + 5 / 7 + 3 / 5) / 3)
    metric.reset()
    assert metric.confusion.sum() == 0


def test_out_of_range_labels_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3, IGNORE)


def test_table_and_csv(tmp_path: Path) -> None:
    pred, target = _maps()
    scores = scores_from_confusion(confusion_matrix(pred, target, 3, IGNORE))
    console = Console(record=True, width=100)
    console.print(iou_table(scores, ["wall", "sky", "tree"]))
    text = console.export_text()
    assert "sky" in text and "71.43" in text  # 5/7
    path = save_iou_csv(scores, ["wall", "sky", "tree"], tmp_path / "iou.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "class,IoU,Acc"
    assert lines[2].startswith("sky,0.714286")

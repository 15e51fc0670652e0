"""Semantic segmentation scores from one dataset-wide confusion matrix.

mIoU is computed as on ADE20K: the intersections and unions of each class are summed over the
whole data set first, then divided, then averaged over the classes that occur (in the ground
truth or in the predictions); pixels labelled with the ignore index count nowhere. aAcc is the
fraction of labelled pixels predicted correctly. The confusion matrix is a torchmetrics state
summed across DDP ranks, so every rank reports the same figures.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.table import Table
from torch import Tensor
from torchmetrics import Metric


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """`(num_classes, num_classes)` counts, rows = ground truth, columns = prediction.

    Args:
        pred: predicted class per pixel, any shape, values in [0, num_classes).
        target: ground-truth class per pixel, same shape; `ignore_index` pixels are skipped.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}"
        )
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"label values must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"found {int(target.min())}..{int(target.max())}"
        )
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(
            f"predicted classes must lie in [0, {num_classes}); found {int(pred.min())}..{int(pred.max())}"
        )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores_from_confusion(confusion: Tensor) -> dict[str, Tensor]:
    """mIoU, aAcc, mAcc and the per-class IoU / accuracy (NaN for a class absent from both).

    Returns a dict with scalar tensors `mIoU`, `aAcc`, `mAcc` and vectors `IoU`, `Acc`.
    """
    confusion = confusion.double()
    intersection = confusion.diag()
    gt_pixels = confusion.sum(dim=1)
    pred_pixels = confusion.sum(dim=0)
    union = gt_pixels + pred_pixels - intersection
    nan = torch.tensor(float("nan"), dtype=confusion.dtype, device=confusion.device)
    iou = torch.where(union > 0, intersection / union.clamp(min=1), nan)
    acc = torch.where(gt_pixels > 0, intersection / gt_pixels.clamp(min=1), nan)
    total = confusion.sum()
    return {
        "mIoU": _nanmean(iou),
        "aAcc": intersection.sum() / total if total > 0 else nan,
        "mAcc": _nanmean(acc),
        "IoU": iou,
        "Acc": acc,
    }


def _nanmean(values: Tensor) -> Tensor:
    valid = ~values.isnan()
    if not valid.any():
        return torch.tensor(float("nan"), dtype=values.dtype, device=values.device)
    return values[valid].mean()


class SegmentationMetrics(Metric):
    """Dataset-wide confusion matrix; `compute()` gives `scores_from_confusion` of it.

    Args:
        num_classes: classes scored (label values 0..num_classes-1).
        ignore_index: label value of pixels that are not scored.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.add_state(
            "confusion",
            default=torch.zeros(self.num_classes, self.num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, pred: Tensor, target: Tensor) -> None:
        """`pred`: class indices (or `(N, C, ...)` logits, argmax taken); `target`: labels."""
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Tensor]:
        return scores_from_confusion(self.confusion)


def iou_table(
    scores: dict[str, Tensor], class_names: Sequence[str], title: str = "Per-class IoU"
) -> Table:
    """A rich table of per-class IoU and accuracy (percent), then the mean row."""
    table = Table(title=title, show_header=True)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("Acc", justify="right")
    for name, iou, acc in zip(
        class_names, scores["IoU"].tolist(), scores["Acc"].tolist(), strict=True
    ):
        table.add_row(str(name), _percent(iou), _percent(acc))
    table.add_section()
    table.add_row("mean", _percent(float(scores["mIoU"])), _percent(float(scores["mAcc"])))
    table.add_row("aAcc", _percent(float(scores["aAcc"])), "")
    return table


def save_iou_csv(scores: dict[str, Tensor], class_names: Sequence[str], path: str | Path) -> Path:
    """Per-class IoU and accuracy (fractions; empty for classes absent from labels and predictions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "IoU", "Acc"])
        for name, iou, acc in zip(
            class_names, scores["IoU"].tolist(), scores["Acc"].tolist(), strict=True
        ):
            writer.writerow([name, _fraction(iou), _fraction(acc)])
        writer.writerow(["mIoU", _fraction(float(scores["mIoU"])), ""])
        writer.writerow(["mAcc", _fraction(float(scores["mAcc"])), ""])
        writer.writerow(["aAcc", _fraction(float(scores["aAcc"])), ""])
    return path


def _percent(value: float) -> str:
    return "-" if value != value else f"{100 * value:.2f}"


def _fraction(value: float) -> str:
    return "" if value != value else f"{value:.6f}"

"""RetinaNet's anchor assignment and training loss as fixed-shape tensor operations.

Why not torchvision's: its per-image loop reads values back to the host; this gives the same
values (the tests compare them) over the whole batch with masks, reading nothing back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou, sigmoid_focal_loss

BELOW_LOW_THRESHOLD = -1  # background
BETWEEN_THRESHOLDS = -2  # ignored by the classification loss


def match_anchors(
    iou: Tensor, high: float, low: float, allow_low_quality_matches: bool = True
) -> Tensor:
    """The ground-truth box each anchor learns from, given the (boxes, anchors) IoU matrix.

    Returns (anchors,) int64: the box index where the anchor's best IoU reaches `high`,
    `BELOW_LOW_THRESHOLD` under `low`, `BETWEEN_THRESHOLDS` in between. With
    `allow_low_quality_matches`, the anchors that overlap a box most (ties included) keep their
    best box whatever the IoU, so that no box is left without an anchor (torchvision's
    `Matcher`, whose result this equals).
    """
    best_iou, best_box = iou.max(dim=0)
    matches = best_box.masked_fill(best_iou < high, BETWEEN_THRESHOLDS)
    matches = matches.masked_fill(best_iou < low, BELOW_LOW_THRESHOLD)
    if allow_low_quality_matches:
        best_iou_of_each_box = iou.max(dim=1, keepdim=True).values
        is_a_best_anchor = (iou == best_iou_of_each_box).any(dim=0)
        matches = torch.where(is_a_best_anchor, best_box, matches)
    return matches


def encode_boxes(
    boxes: Tensor, anchors: Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> Tensor:
    """R-CNN box deltas (dx, dy, dw, dh) of `boxes` from `anchors`, both (..., 4) xyxy: centre
    offsets in anchor sizes and log size ratios, times `weights` (torchvision's `BoxCoder`).
    The weights stay Python numbers, so nothing is copied from the host to the device."""
    anchor_size = anchors[..., 2:] - anchors[..., :2]
    anchor_centre = anchors[..., :2] + 0.5 * anchor_size
    box_size = boxes[..., 2:] - boxes[..., :2]
    box_centre = boxes[..., :2] + 0.5 * box_size
    wx, wy, ww, wh = weights
    offsets = (box_centre - anchor_centre) / anchor_size
    log_ratios = torch.log(box_size / anchor_size)
    return torch.cat(
        [
            offsets[..., :1] * wx,
            offsets[..., 1:] * wy,
            log_ratios[..., :1] * ww,
            log_ratios[..., 1:] * wh,
        ],
        dim=-1,
    )


def assign_anchors(
    anchors: Sequence[Tensor],
    targets: Sequence[Mapping[str, Tensor]],
    high: float,
    low: float,
    allow_low_quality_matches: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per image and anchor: its match (`match_anchors`), its box's label and its box.

    Returns `matches` (B, A) int64, `labels` (B, A) int64 and `boxes` (B, A, 4), the last two
    those of the matched box where there is one and placeholders that the losses mask out
    elsewhere (the first box's; in an image without boxes label 0 and the anchor itself).
    """
    matches, labels, boxes = [], [], []
    for anchors_of_image, target in zip(anchors, targets, strict=True):
        gt_boxes, gt_labels = target["boxes"], target["labels"]
        if gt_boxes.shape[0] == 0:  # shapes are host metadata: no read
            matches.append(
                anchors_of_image.new_full(anchors_of_image.shape[:1], -1, dtype=torch.long)
            )
            labels.append(anchors_of_image.new_zeros(anchors_of_image.shape[:1], dtype=torch.long))
            boxes.append(anchors_of_image)
            continue
        image_matches = match_anchors(
            box_iou(gt_boxes, anchors_of_image), high, low, allow_low_quality_matches
        )
        box_index = image_matches.clamp(min=0)
        matches.append(image_matches)
        labels.append(gt_labels[box_index])
        boxes.append(gt_boxes[box_index])
    return torch.stack(matches), torch.stack(labels), torch.stack(boxes)


def retinanet_losses(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Sequence[Tensor],
    matches: Tensor,
    labels: Tensor,
    boxes: Tensor,
    box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> dict[str, Tensor]:
    """RetinaNet's focal classification loss and L1 box loss, each summed per image over its
    anchors (classification: all but the ignored ones; boxes: the matched ones), divided by that
    image's matched-anchor count (at least 1) and averaged over the batch: torchvision's
    normalization (mmdetection, the release's framework, divides the batch's sums by the
    batch's matched-anchor count instead).

    Args:
        cls_logits: (B, A, K) class logits; bbox_regression: (B, A, 4) predicted deltas.
        anchors: per image (A, 4) xyxy; matches, labels, boxes: `assign_anchors`' output.
    """
    foreground = matches >= 0
    anchors_matched = foreground.sum(dim=1).clamp(min=1)
    class_targets = torch.zeros_like(cls_logits).scatter_(
        2, labels[..., None], foreground[..., None].to(cls_logits.dtype)
    )
    focal = sigmoid_focal_loss(cls_logits, class_targets, reduction="none")
    counted = (matches != BETWEEN_THRESHOLDS)[..., None]
    classification = torch.where(counted, focal, 0.0).sum(dim=(1, 2)) / anchors_matched

    deltas = encode_boxes(boxes, torch.stack(list(anchors)), box_weights)
    l1 = (bbox_regression - deltas).abs()
    regression = torch.where(foreground[..., None], l1, 0.0).sum(dim=(1, 2)) / anchors_matched
    return {"classification": classification.mean(), "bbox_regression": regression.mean()}

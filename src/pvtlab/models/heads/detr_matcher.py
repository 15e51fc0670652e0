"""DETR's Hungarian matcher: the one-to-one assignment of queries to ground-truth boxes.

A pure function of predictions and targets (no state, no gradient): the cost of assigning
query q to object t is

    cost_class * -p_q(class_t) + cost_bbox * |b_q - b_t|_1 + cost_giou * -GIoU(b_q, b_t)

with boxes as normalised (cx, cy, w, h) in [0, 1], and scipy's `linear_sum_assignment` picks the
assignment of least total cost per image (every object gets one query, the other queries are
"no object"). Weights 1 / 5 / 2 as DETR and the PVT paper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

Match = tuple[Tensor, Tensor]  # (query indices, target indices), int64, one pair per object


@torch.no_grad()
def match_cost(
    logits: Tensor,
    boxes: Tensor,
    target_labels: Tensor,
    target_boxes: Tensor,
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
) -> Tensor:
    """(N, T) matching cost of N predictions against T targets (any grouping into images).

    Args:
        logits: (N, K + 1) class logits, the last slot "no object".
        boxes: (N, 4) predicted (cx, cy, w, h), normalised.
        target_labels: (T,) 0-based labels.
        target_boxes: (T, 4) target (cx, cy, w, h), normalised.
    """
    prob = logits.float().softmax(-1)
    boxes, target_boxes = boxes.float(), target_boxes.float()
    cost = -cost_class * prob[:, target_labels]
    cost = cost + cost_bbox * torch.cdist(boxes, target_boxes, p=1)
    giou = generalized_box_iou(
        box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
    )
    return cost - cost_giou * giou


@torch.no_grad()
def hungarian_match_layers(
    logits: Tensor,
    boxes: Tensor,
    targets: Sequence[Mapping[str, Tensor]],
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
) -> list[list[Match]]:
    """`hungarian_match` for the predictions of several decoder layers at once.

    One cost matrix for every layer and image (a single GIoU call), read back to the host in one
    copy: on a GPU the training step then waits for the device once, not once a layer.

    Args:
        logits: (L, B, Q, K + 1) class logits of L layers' queries, the last slot "no object".
        boxes: (L, B, Q, 4) predicted (cx, cy, w, h), normalised to each image.
        targets: per image `labels` (T_i,) 0-based and `boxes` (T_i, 4) normalised (cx, cy, w, h).

    Returns:
        per layer, per image `(query_idx, target_idx)` as `hungarian_match` gives them.
    """
    layers, batch, queries = logits.shape[:3]
    if len(targets) != batch:
        raise ValueError(f"{len(targets)} targets for a batch of {batch} images")
    sizes = [len(t["boxes"]) for t in targets]
    if sum(sizes) == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return [[(empty, empty) for _ in sizes] for _ in range(layers)]
    cost = match_cost(
        logits.flatten(0, 2),
        boxes.flatten(0, 2),
        torch.cat([t["labels"] for t in targets]),
        torch.cat([t["boxes"] for t in targets]),
        cost_class,
        cost_bbox,
        cost_giou,
    )
    # Each image's block: its own queries against its own targets.
    blocks = cost.view(layers, batch, queries, -1).cpu().split(sizes, dim=-1)
    return [
        [_least_cost_assignment(block[layer, image]) for image, block in enumerate(blocks)]
        for layer in range(layers)
    ]


def hungarian_match(
    logits: Tensor, boxes: Tensor, targets: Sequence[Mapping[str, Tensor]], **weights: float
) -> list[Match]:
    """The least-cost assignment of each image's targets to its queries.

    Args:
        logits: (B, Q, K + 1) class logits of the queries, the last slot "no object".
        boxes: (B, Q, 4) predicted (cx, cy, w, h), normalised to each image.
        targets: per image `labels` (T_i,) 0-based and `boxes` (T_i, 4) normalised (cx, cy, w, h).
        weights: `cost_class`, `cost_bbox`, `cost_giou`, as `hungarian_match_layers` takes them.

    Returns:
        per image `(query_idx, target_idx)`, each (min(Q, T_i),) int64 on the CPU, sorted by
        query: query `query_idx[j]` predicts target `target_idx[j]`.
    """
    (matches,) = hungarian_match_layers(logits[None], boxes[None], targets, **weights)
    return matches


def _least_cost_assignment(cost: Tensor) -> Match:
    """scipy's assignment of one image's (Q, T) cost block, as int64 index tensors."""
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


@dataclass(frozen=True)
class HungarianMatcher:
    """`hungarian_match` with its cost weights bound: `matcher(logits, boxes, targets)`."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0

    def __post_init__(self) -> None:
        if min(self.cost_class, self.cost_bbox, self.cost_giou) < 0 or not (
            self.cost_class or self.cost_bbox or self.cost_giou
        ):
            raise ValueError(
                f"matcher costs class={self.cost_class}, bbox={self.cost_bbox}, "
                f"giou={self.cost_giou}: each must be >= 0 and at least one > 0"
            )

    def __call__(
        self, logits: Tensor, boxes: Tensor, targets: Sequence[Mapping[str, Tensor]]
    ) -> list[Match]:
        return self.match_layers(logits[None], boxes[None], targets)[0]

    def match_layers(
        self, logits: Tensor, boxes: Tensor, targets: Sequence[Mapping[str, Tensor]]
    ) -> list[list[Match]]:
        """Every decoder layer's matching in one pass (`hungarian_match_layers`)."""
        return hungarian_match_layers(
            logits, boxes, targets, self.cost_class, self.cost_bbox, self.cost_giou
        )

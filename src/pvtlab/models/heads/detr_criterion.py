"""DETR's set criterion: losses of the matched queries, on the last and every earlier decoder layer.

Per decoder layer, after the Hungarian matching of that layer's predictions:

- classification: cross-entropy over K + 1 classes for every query, the unmatched ones targeting
  "no object" (the last slot) with weight `eos_coef` (0.1) to offset their number;
- boxes: L1 and 1 - GIoU between matched predictions and targets (normalised (cx, cy, w, h)),
  summed and divided by the number of target boxes in the whole batch, averaged over processes
  when training is distributed, so every image's box counts the same whatever its batch.

Losses come back weighted (class 1, L1 5, GIoU 2): `loss_ce`, `loss_bbox`, `loss_giou` of the last
layer and `loss_ce_<i>`, ... of auxiliary layer i (0 = first decoder layer); their sum is the
training loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from pvtlab.models.heads.detr_matcher import HungarianMatcher, Match

Targets = Sequence[Mapping[str, Tensor]]


def num_target_boxes(targets: Targets, device: torch.device) -> Tensor:
    """Target boxes per process: the batch's count, averaged over processes, at least 1. A
    0-dim tensor on `device`, so that the host never waits for the all-reduce."""
    count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


class SetCriterion(nn.Module):
    """Hungarian-matched classification, L1 and GIoU losses of DETR (with auxiliary layers).

    Args:
        num_classes: object classes K; the logits have K + 1 slots, the last one "no object".
        matcher: assigns queries to targets (default: costs class 1, L1 5, GIoU 2).
        weight_ce, weight_bbox, weight_giou: loss weights (DETR: the matching costs).
        eos_coef: cross-entropy weight of the "no object" class.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        weight_ce: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        eos_coef: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weights = {"loss_ce": weight_ce, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)

    def forward(self, outputs: Mapping[str, Tensor], targets: Targets) -> dict[str, Tensor]:
        """Weighted losses of `outputs` against `targets`.

        Args:
            outputs: `logits` (B, Q, K + 1) and `boxes` (B, Q, 4) of the last decoder layer, and
                optionally `aux_logits` (L - 1, B, Q, K + 1) and `aux_boxes` (L - 1, B, Q, 4) of the
                earlier ones.
            targets: per image `labels` (T_i,) 0-based and `boxes` (T_i, 4) normalised
                (cx, cy, w, h).
        """
        num_boxes = num_target_boxes(targets, outputs["logits"].device)
        logits, boxes = [outputs["logits"]], [outputs["boxes"]]
        if "aux_logits" in outputs:
            logits, boxes = [*outputs["aux_logits"], *logits], [*outputs["aux_boxes"], *boxes]
        with torch.no_grad():  # every layer matched in one pass: one read back to the host
            matches = self.matcher.match_layers(torch.stack(logits), torch.stack(boxes), targets)
        *aux, last = (
            self.layer_losses(*layer, targets, num_boxes)
            for layer in zip(logits, boxes, matches, strict=True)
        )
        losses = dict(last)
        for i, layer in enumerate(aux):
            losses.update({f"{name}_{i}": value for name, value in layer.items()})
        return losses

    def layer_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        matches: Sequence[Match],
        targets: Targets,
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """The three weighted losses of one decoder layer's predictions, matched to the
        targets by `matches` (the matcher's, per image)."""
        batch_idx, query_idx = _flat_indices(matches, logits.device)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, matches, strict=True)])
        target_boxes = torch.cat(
            [t["boxes"][j] for t, (_, j) in zip(targets, matches, strict=True)]
        )

        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[batch_idx, query_idx] = labels.to(logits.device)
        loss_ce = F.cross_entropy(
            logits.transpose(1, 2).float(), target_classes, weight=self.class_weight
        )

        matched = boxes[batch_idx, query_idx].float()
        target_boxes = target_boxes.to(matched)
        loss_bbox = F.l1_loss(matched, target_boxes, reduction="sum") / num_boxes
        loss_giou = (
            generalized_box_iou_loss(
                box_convert(matched, "cxcywh", "xyxy"),
                box_convert(target_boxes, "cxcywh", "xyxy"),
                reduction="sum",
            )
            / num_boxes
        )
        raw = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        return {name: self.weights[name] * value for name, value in raw.items()}


def _flat_indices(matches: Sequence[Match], device: torch.device) -> tuple[Tensor, Tensor]:
    """(image index, query index) of every matched query of the batch."""
    batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)])
    query_idx = torch.cat([q for q, _ in matches])
    return batch_idx.to(device), query_idx.to(device)

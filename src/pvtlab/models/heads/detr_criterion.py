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
from torchvision.ops import box_convert

from pvtlab.models.heads.detr_matcher import HungarianMatcher, Match
from pvtlab.models.heads.transfer import to_device_without_waiting

Targets = Sequence[Mapping[str, Tensor]]


def num_target_boxes(targets: Targets, device: torch.device) -> Tensor:
    """Target boxes per process: the batch's count, averaged over processes, at least 1. A
    0-dim tensor on `device`, so that the host never waits for the all-reduce."""
    # Filled on the device, not copied from the host: a blocking copy waits for the device.
    count = torch.full((), float(sum(len(t["labels"]) for t in targets)), device=device)
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
        device = outputs["logits"].device
        num_boxes = num_target_boxes(targets, device)
        logits, boxes = [outputs["logits"]], [outputs["boxes"]]
        if "aux_logits" in outputs:
            logits, boxes = [*outputs["aux_logits"], *logits], [*outputs["aux_boxes"], *boxes]
        with torch.no_grad():  # every layer matched in one pass: one read back to the host
            matches = self.matcher.match_layers(torch.stack(logits), torch.stack(boxes), targets)
        pairs = matched_pairs(matches, [len(t["labels"]) for t in targets], device)
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets])
        *aux, last = (
            self.layer_losses(*layer, target_labels, target_boxes, num_boxes)
            for layer in zip(logits, boxes, pairs, strict=True)
        )
        losses = dict(last)
        for i, layer in enumerate(aux):
            losses.update({f"{name}_{i}": value for name, value in layer.items()})
        return losses

    def layer_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        pairs: Tensor,
        target_labels: Tensor,
        target_boxes: Tensor,
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """The three weighted losses of one decoder layer's predictions.

        Args:
            logits, boxes: the layer's (B, Q, K + 1) and (B, Q, 4) predictions.
            pairs: (3, M) image, query and target index of each matched pair, the target
                indexing `target_labels` and `target_boxes`, the whole batch's targets in order.
            num_boxes: `num_target_boxes`.
        """
        image, query, target = pairs
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[image, query] = target_labels[target]
        loss_ce = F.cross_entropy(
            logits.transpose(1, 2).float(), target_classes, weight=self.class_weight
        )

        matched = boxes[image, query].float()
        matched_targets = target_boxes[target].to(matched)
        loss_bbox = F.l1_loss(matched, matched_targets, reduction="sum") / num_boxes
        loss_giou = (
            generalized_iou_loss(
                box_convert(matched, "cxcywh", "xyxy"),
                box_convert(matched_targets, "cxcywh", "xyxy"),
            ).sum()
            / num_boxes
        )
        raw = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        return {name: self.weights[name] * value for name, value in raw.items()}


def matched_pairs(
    matches: Sequence[Sequence[Match]], sizes: Sequence[int], device: torch.device
) -> Tensor:
    """Every decoder layer's matched (image, query, target) indices as one (L, 3, M) int64
    tensor on `device`, the target counted over the batch's targets in order (image i's start
    at the sum of `sizes` before it).

    One copy, not waited for (`to_device_without_waiting`): indexing device tensors with host
    indices would copy them once per index, layer and image, each copy waiting for the device."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    layers = []
    for layer in matches:
        image = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(layer)])
        query = torch.cat([q for q, _ in layer])
        target = torch.cat([t + start for (_, t), start in zip(layer, starts, strict=True)])
        layers.append(torch.stack([image, query, target]))
    return to_device_without_waiting(torch.stack(layers), device)


def generalized_iou_loss(boxes: Tensor, targets: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of each box (N, 4) xyxy with its target (N, 4): IoU less the share of the
    smallest enclosing box that the union leaves empty (Rezatofighi et al. 2019). Clamped
    overlaps rather than torchvision's masked assignment, which reads the mask back on a GPU."""
    top_left = torch.maximum(boxes[:, :2], targets[:, :2])
    bottom_right = torch.minimum(boxes[:, 2:], targets[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    target_area = (targets[:, 2:] - targets[:, :2]).prod(dim=1)
    union = area + target_area - intersection
    iou = intersection / (union + eps)
    enclosing = (
        torch.maximum(boxes[:, 2:], targets[:, 2:]) - torch.minimum(boxes[:, :2], targets[:, :2])
    ).prod(dim=1)
    return 1 - (iou - (enclosing - union) / (enclosing + eps))

"""RetinaNet (paper Table 3) on any pyramid backbone, from torchvision's parts.

FPN on stages 2-4 (strides 8, 16, 32) plus P6 = conv(C5) and P7 = conv(P6) ("on input",
mmdetection's `add_extra_convs="on_input"`, no ReLU before P7): P3-P7, convolutions initialised
xavier-uniform. Settings follow the released mmdetection 2.13 config (`retinanet_r50_fpn` as used
by PVT; docs/fidelity.md): anchors 3 scales x 3 ratios per level, octave base 4 x stride (32..512
times 2^(0, 1/3, 2/3), not rounded), IoU 0.5 / 0.4 assignment with low-quality matches, focal loss
(alpha 0.25, gamma 2) and L1 box loss; at test the 1000 anchors of each level with the highest
class score (`nms_pre`), score threshold 0.05, class-wise NMS 0.5, at most 100 detections.

Interface of every pvtlab detection head (docs/design.md): images are the data pipeline's resized,
normalized (3, H, W) tensors; `model(images, targets)` in training returns a dict of losses and
`model(images)` in evaluation a list of `{boxes, scores, labels}` with boxes xyxy in the pixels of
each given image and labels 0-based. The head does not resize: `PaddingTransform` replaces
torchvision's internal resize-and-normalize transform and only pads the batch to a multiple of 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, clip_boxes_to_image

from pvtlab.models.factory import BackboneFactory, pyramid_backbone
from pvtlab.models.heads.fpn import BackboneWithFPN, OnInputP6P7
from pvtlab.models.heads.retinanet_loss import assign_anchors, retinanet_losses

# mmdetection's RetinaNet anchors: octave base 4 x stride, 3 scales per octave, 3 aspect ratios.
RETINANET_ANCHOR_SIZES = tuple(
    tuple(4 * stride * 2 ** (i / 3) for i in range(3)) for stride in (8, 16, 32, 64, 128)
)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
CANDIDATE_SELECTIONS = ("anchor", "pair")


class PyramidAnchorGenerator(AnchorGenerator):
    """torchvision's anchor generator with its base anchors optionally left unrounded.

    torchvision rounds each base anchor's corners to whole pixels; mmdetection 2.x, whose anchors
    the release trained with, keeps them exact (a 32-pixel anchor of ratio 0.5 is 45.25 wide, not
    46). The order of the anchors (location-major, ratio then scale) is the same in both.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        round_anchors: bool = False,
    ) -> None:
        self.round_anchors = round_anchors  # read by generate_anchors, which the parent calls
        super().__init__(tuple(map(tuple, sizes)), tuple(map(tuple, aspect_ratios)))

    def generate_anchors(
        self,
        scales: list[float],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        widths = (scales_t[None, :] / h_ratios[:, None]).reshape(-1)
        heights = (scales_t[None, :] * h_ratios[:, None]).reshape(-1)
        base = torch.stack([-widths, -heights, widths, heights], dim=1) / 2
        return base.round() if self.round_anchors else base


class PaddingTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform minus resize and normalization (the data pipeline does
    both): it only pads the images into one batch whose sides are multiples of `size_divisible`.
    Predictions therefore come back in the pixels of the images given."""

    def __init__(self, size_divisible: int = 32) -> None:
        super().__init__(
            min_size=1,
            max_size=1,
            image_mean=[0.0, 0.0, 0.0],
            image_std=[1.0, 1.0, 1.0],
            size_divisible=size_divisible,
        )

    def normalize(self, image: Tensor) -> Tensor:
        return image

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size_divisible={self.size_divisible})"


class DeviceLossRetinaNet(RetinaNet):
    """torchvision's RetinaNet whose training loss reads nothing back to the host.

    torchvision assigns anchors and sums the losses image by image, reading values back from the
    device several times an image; here `pvtlab.models.heads.retinanet_loss` does the same with
    batched tensor operations and the same result, so that a GPU step runs without the host
    waiting. Parameters and checkpoints are torchvision's.

    At test, `candidate_selection="anchor"` keeps per level the `topk_candidates` anchors whose
    best class scores highest, then every (anchor, class) pair of those above the score
    threshold (mmdetection 2.13's `nms_pre`, the release's); `"pair"` keeps torchvision's
    top-k over (anchor, class) pairs above the threshold.
    """

    candidate_selection: str = "anchor"

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if not self.training:
            return super().forward(images, targets)
        if targets is None:
            raise ValueError("RetinaNet in training mode needs targets (boxes, labels) per image")
        for index, target in enumerate(targets):
            check_target_boxes(target["boxes"], index)
        batch, targets = self.transform(images, targets)
        features = list(self.backbone(batch.tensors).values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(batch, features)
        return self.compute_loss(targets, head_outputs, anchors)

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
    ) -> dict[str, Tensor]:
        matcher = self.proposal_matcher
        matches, labels, boxes = assign_anchors(
            anchors,
            targets,
            matcher.high_threshold,
            matcher.low_threshold,
            matcher.allow_low_quality_matches,
        )
        return retinanet_losses(
            head_outputs["cls_logits"],
            head_outputs["bbox_regression"],
            anchors,
            matches,
            labels,
            boxes,
            self.head.regression_head.box_coder.weights,
        )

    def postprocess_detections(
        self,
        head_outputs: dict[str, list[Tensor]],
        anchors: list[list[Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.candidate_selection == "pair":
            return super().postprocess_detections(head_outputs, anchors, image_shapes)
        detections = []
        for index, image_shape in enumerate(image_shapes):
            boxes, scores, labels = [], [], []
            for logits, deltas, level_anchors in zip(
                (level[index] for level in head_outputs["cls_logits"]),
                (level[index] for level in head_outputs["bbox_regression"]),
                anchors[index],
                strict=True,
            ):
                level_scores = torch.sigmoid(logits)
                if level_scores.shape[0] > self.topk_candidates:
                    top = level_scores.max(dim=1).values.topk(self.topk_candidates).indices
                    level_scores, deltas, level_anchors = (
                        level_scores[top],
                        deltas[top],
                        level_anchors[top],
                    )
                anchor_index, label = torch.nonzero(level_scores > self.score_thresh, as_tuple=True)
                decoded = self.box_coder.decode_single(
                    deltas[anchor_index], level_anchors[anchor_index]
                )
                boxes.append(clip_boxes_to_image(decoded, image_shape))
                scores.append(level_scores[anchor_index, label])
                labels.append(label)
            image_boxes, image_scores, image_labels = (
                torch.cat(boxes),
                torch.cat(scores),
                torch.cat(labels),
            )
            keep = batched_nms(image_boxes, image_scores, image_labels, self.nms_thresh)
            keep = keep[: self.detections_per_img]
            detections.append(
                {
                    "boxes": image_boxes[keep],
                    "scores": image_scores[keep],
                    "labels": image_labels[keep],
                }
            )
        return detections


def check_target_boxes(boxes: Tensor, index: int) -> None:
    """Refuse target boxes that are not (N, 4) or, on the CPU, have no area.

    The area check reads the boxes, which on an accelerator would make the host wait each step;
    there, pvtlab's loaders have already dropped such boxes (`min_box_size`) and a box that
    slipped through gives an infinite or NaN box loss, which `NonFiniteLossGuard` stops on.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(
            f"target {index}: boxes must be (N, 4) xyxy, got shape {tuple(boxes.shape)}"
        )
    if boxes.device.type == "cpu":
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if degenerate.any():
            box = boxes[degenerate.nonzero()[0, 0]].tolist()
            raise ValueError(
                f"target {index}: box {box} has no area (x1 <= x0 or y1 <= y0); "
                "boxes must be xyxy with positive width and height"
            )


def build_retinanet(
    backbone: nn.Module | BackboneFactory,
    num_classes: int,
    in_stages: Sequence[int] = (1, 2, 3),
    fpn_channels: int = 256,
    anchor_sizes: Sequence[Sequence[float]] = RETINANET_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = ASPECT_RATIOS,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.4,
    topk_candidates: int = 1000,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    size_divisible: int = 32,
    relu_before_extra_convs: bool = False,
    fpn_init: str = "xavier_uniform",
    round_anchors: bool = False,
    candidate_selection: str = "anchor",
) -> DeviceLossRetinaNet:
    """torchvision's RetinaNet, its loss computed on the device (`DeviceLossRetinaNet`), on
    `backbone`'s stages `in_stages` (+ P6, P7 from the last one).

    Args:
        backbone: timm `features_only` model (four maps, `feature_info`), or a factory of one
            (`pyramid_backbone`).
        num_classes: object classes K; labels are 0..K-1 (RetinaNet has no background class).
        in_stages: 0-based backbone maps entering the FPN (stages 2-4 -> P3-P5).
        fpn_channels: FPN width.
        anchor_sizes: per pyramid level, the anchor sizes in input pixels.
        aspect_ratios: anchor height / width ratios, the same on every level.
        fg_iou_thresh, bg_iou_thresh: anchor assignment thresholds.
        topk_candidates: candidates per level kept before NMS (see `candidate_selection`).
        score_thresh, nms_thresh, detections_per_img: test-time filtering.
        size_divisible: padding multiple of a batch.
        relu_before_extra_convs: P7 = conv(relu(P6)) (torchvision) instead of conv(P6) (release).
        fpn_init: `xavier_uniform` (release) or `kaiming_uniform` (torchvision), see
            `BackboneWithFPN`.
        round_anchors: round base anchors to whole pixels (torchvision) instead of exact (release).
        candidate_selection: `anchor` (release) or `pair` (torchvision), see `DeviceLossRetinaNet`.
    """
    if candidate_selection not in CANDIDATE_SELECTIONS:
        raise ValueError(
            f"candidate_selection={candidate_selection!r}; choose one of: "
            + ", ".join(CANDIDATE_SELECTIONS)
        )
    backbone = pyramid_backbone(backbone)
    last = backbone.feature_info.channels()[in_stages[-1]]
    extra = OnInputP6P7(last, fpn_channels, relu_before_extra_convs)
    body = BackboneWithFPN(backbone, in_stages, fpn_channels, extra, conv_init=fpn_init)
    levels = len(in_stages) + 2
    if len(anchor_sizes) != levels:
        raise ValueError(
            f"anchor_sizes has {len(anchor_sizes)} levels; the pyramid has {levels} "
            f"({len(in_stages)} stages + P6, P7)"
        )
    anchors = PyramidAnchorGenerator(
        [[float(s) for s in level] for level in anchor_sizes],
        [[float(r) for r in aspect_ratios]] * levels,
        round_anchors,
    )
    model = DeviceLossRetinaNet(
        body,
        num_classes=num_classes,
        anchor_generator=anchors,
        fg_iou_thresh=fg_iou_thresh,
        bg_iou_thresh=bg_iou_thresh,
        topk_candidates=topk_candidates,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
    )
    model.transform = PaddingTransform(size_divisible)
    model.candidate_selection = candidate_selection
    return model

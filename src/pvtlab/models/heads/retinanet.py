"""RetinaNet (paper Table 3) on any pyramid backbone, from torchvision's parts.

FPN on stages 2-4 (strides 8, 16, 32) plus P6 and P7 computed from the stage-4 map itself
("on input", mmdetection's `add_extra_convs="on_input"`): P3-P7. Settings follow the released
mmdetection config (`retinanet_r50_fpn` as used by PVT): anchors 3 scales x 3 ratios per level
(torchvision's defaults: 32..512 times 2^(0, 1/3, 2/3)), IoU 0.5 / 0.4 assignment with low-quality
matches, focal loss (alpha 0.25, gamma 2) and L1 box loss, 1000 candidates per level, score
threshold 0.05, class-wise NMS 0.5 and at most 100 detections per image.

Interface of every pvtlab detection head (docs/design.md): images are the data pipeline's resized,
normalized (3, H, W) tensors; `model(images, targets)` in training returns a dict of losses and
`model(images)` in evaluation a list of `{boxes, scores, labels}` with boxes xyxy in the pixels of
each given image and labels 0-based. The head does not resize: `PaddingTransform` replaces
torchvision's internal resize-and-normalize transform and only pads the batch to a multiple of 32.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pvtlab.models.factory import BackboneFactory, pyramid_backbone
from pvtlab.models.heads.fpn import BackboneWithFPN
from pvtlab.models.heads.retinanet_loss import assign_anchors, retinanet_losses

# torchvision's RetinaNet anchors: octave base 4 x stride, 3 scales per octave, 3 aspect ratios.
RETINANET_ANCHOR_SIZES = tuple(
    (s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512)
)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


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


class OnInputP6P7(LastLevelP6P7):
    """P6 = conv(C5), P7 = conv(relu(P6)) from the stage-4 map, whatever its width.

    torchvision switches to P5 when C5 already has the FPN's width; the released PVT RetinaNet
    always uses C5 ("on input").
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels)
        self.use_P5 = False


class DeviceLossRetinaNet(RetinaNet):
    """torchvision's RetinaNet whose training loss reads nothing back to the host.

    torchvision assigns anchors and sums the losses image by image, reading values back from the
    device several times an image; here `pvtlab.models.heads.retinanet_loss` does the same with
    batched tensor operations and the same result, so that a GPU step runs without the host
    waiting. Evaluation, parameters and checkpoints are torchvision's.
    """

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
    anchor_sizes: Sequence[Sequence[int]] = RETINANET_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = ASPECT_RATIOS,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.4,
    topk_candidates: int = 1000,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    size_divisible: int = 32,
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
        topk_candidates: best-scoring anchors per level kept before NMS.
        score_thresh, nms_thresh, detections_per_img: test-time filtering.
        size_divisible: padding multiple of a batch.
    """
    backbone = pyramid_backbone(backbone)
    last = backbone.feature_info.channels()[in_stages[-1]]
    body = BackboneWithFPN(backbone, in_stages, fpn_channels, OnInputP6P7(last, fpn_channels))
    levels = len(in_stages) + 2
    if len(anchor_sizes) != levels:
        raise ValueError(
            f"anchor_sizes has {len(anchor_sizes)} levels; the pyramid has {levels} "
            f"({len(in_stages)} stages + P6, P7)"
        )
    anchors = AnchorGenerator(
        tuple(tuple(int(s) for s in level) for level in anchor_sizes),
        (tuple(float(r) for r in aspect_ratios),) * levels,
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
    return model

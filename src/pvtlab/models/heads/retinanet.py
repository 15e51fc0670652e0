"""RetinaNet (paper Table 3) on any pyramid backbone, from torchvision's parts.

FPN on stages 2-4 (strides 8, 16, 32) plus P6 and P7 computed from the stage-4 map itself
("on input", mmdetection's `add_extra_convs="on_input"`): P3-P7. Settings follow the released
mmdetection config (`retinanet_r50_fpn` as used by PVT): anchors 3 scales x 3 ratios per level
(torchvision's defaults: 32..512 times 2^(0, 1/3, 2/3)), IoU 0.5 / 0.4 assignment with low-quality
matches, focal loss (alpha 0.25, gamma 2) and L1 box loss, 1000 candidates per level, score
threshold 0.05, class-wise NMS 0.5 and at most 100 detections per image.

Interface of every pvtlab detection head (DESIGN.md): images are the data pipeline's resized,
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

from pvtlab.models.heads.fpn import BackboneWithFPN

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


def build_retinanet(
    backbone: nn.Module,
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
) -> RetinaNet:
    """torchvision RetinaNet on `backbone`'s stages `in_stages` (+ P6, P7 from the last one).

    Args:
        backbone: timm `features_only` model (four maps, `feature_info`).
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
    model = RetinaNet(
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

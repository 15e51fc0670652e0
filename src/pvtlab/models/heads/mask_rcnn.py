"""Mask R-CNN (paper Table 4) on any pyramid backbone, from torchvision's parts.

FPN on all four stages plus a max-pooled level: P2-P6. Settings follow the released mmdetection
config (`mask_rcnn_r50_fpn` as used by PVT): RPN with one anchor size per level (32..512) and
ratios 0.5 / 1 / 2, IoU 0.7 / 0.3, 256 anchors sampled at half positives, 2000 proposals per level
before NMS 0.7 and 1000 after it in training (1000 / 1000 at test); R-CNN on RoIAlign 7x7 with two
1024-wide layers, IoU 0.5, 512 RoIs sampled at a quarter positives, box coder weights 10/10/5/5;
mask branch on RoIAlign 14x14, four 256-wide convolutions and a deconvolution to 28x28 masks;
test score threshold 0.05, class-wise NMS 0.5, at most 100 detections per image.

Labels outside this module are 0-based like every pvtlab detection head; torchvision's Mask
R-CNN reserves 0 for background, so `MaskRCNNDetector` shifts them by one on the way in and out.
Images are not resized here (see `pvtlab.models.heads.retinanet.PaddingTransform`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pvtlab.models.factory import BackboneFactory, pyramid_backbone
from pvtlab.models.heads.fpn import BackboneWithFPN
from pvtlab.models.heads.retinanet import ASPECT_RATIOS, PaddingTransform

RPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))


class MaskRCNNDetector(MaskRCNN):
    """torchvision's Mask R-CNN with 0-based labels at its interface (background stays inside).

    Predicted masks are (N, 1, H, W) probabilities pasted into each input image.
    """

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is not None:
            missing = [i for i, t in enumerate(targets) if "masks" not in t]
            if missing:
                raise ValueError(
                    "Mask R-CNN trains on instance masks but targets carry none: load them with "
                    "data.with_masks=true (the Mask R-CNN recipes set it)"
                )
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        output = super().forward(images, targets)
        if self.training:
            return output
        return [{**d, "labels": d["labels"] - 1} for d in output]


def build_mask_rcnn(
    backbone: nn.Module | BackboneFactory,
    num_classes: int,
    in_stages: Sequence[int] = (0, 1, 2, 3),
    fpn_channels: int = 256,
    rpn_anchor_sizes: Sequence[Sequence[int]] = RPN_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = ASPECT_RATIOS,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 1000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.7,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    box_head_dim: int = 1024,
    mask_head_channels: Sequence[int] = (256, 256, 256, 256),
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    sampling_ratio: int = 0,
    size_divisible: int = 32,
) -> MaskRCNNDetector:
    """Mask R-CNN on `backbone`'s stages `in_stages` (+ a max-pooled level).

    Args:
        backbone: timm `features_only` model (four maps, `feature_info`), or a factory of one
            (`pyramid_backbone`).
        num_classes: object classes K (the network has K + 1 outputs, 0 = background).
        in_stages: 0-based backbone maps entering the FPN (all four -> P2-P5, plus P6).
        fpn_channels: FPN width.
        rpn_anchor_sizes: per pyramid level, the RPN anchor sizes in input pixels.
        aspect_ratios: anchor height / width ratios, the same on every level.
        rpn_pre_nms_top_n_*, rpn_post_nms_top_n_*: proposals kept per level before NMS and per
            image after it.
        rpn_nms_thresh, rpn_batch_size_per_image, box_batch_size_per_image: as named.
        box_head_dim: width of the two fully connected layers of the box branch.
        mask_head_channels: widths of the mask branch's 3x3 convolutions (and its deconvolution).
        box_score_thresh, box_nms_thresh, box_detections_per_img: test-time filtering.
        sampling_ratio: RoIAlign samples per bin side (0: adaptive, mmdetection's setting).
        size_divisible: padding multiple of a batch.
    """
    backbone = pyramid_backbone(backbone)
    body = BackboneWithFPN(backbone, in_stages, fpn_channels, LastLevelMaxPool())
    levels = len(in_stages) + 1
    if len(rpn_anchor_sizes) != levels:
        raise ValueError(
            f"rpn_anchor_sizes has {len(rpn_anchor_sizes)} levels; the pyramid has {levels} "
            f"({len(in_stages)} stages + the max-pooled level)"
        )
    anchors = AnchorGenerator(
        tuple(tuple(int(s) for s in level) for level in rpn_anchor_sizes),
        (tuple(float(r) for r in aspect_ratios),) * levels,
    )
    names = [str(i) for i in range(len(in_stages))]  # RoIs pool from the FPN maps, not P6
    mask_head_channels = tuple(int(c) for c in mask_head_channels)
    model = MaskRCNNDetector(
        body,
        num_classes=None,  # given by the predictors: K + 1
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_nms_thresh=rpn_nms_thresh,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(names, 7, sampling_ratio),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
        mask_roi_pool=MultiScaleRoIAlign(names, 14, sampling_ratio),
        mask_head=MaskRCNNHeads(fpn_channels, mask_head_channels, dilation=1),
        mask_predictor=MaskRCNNPredictor(
            mask_head_channels[-1], mask_head_channels[-1], num_classes + 1
        ),
        box_batch_size_per_image=box_batch_size_per_image,
        box_score_thresh=box_score_thresh,
        box_nms_thresh=box_nms_thresh,
        box_detections_per_img=box_detections_per_img,
    )
    model.transform = PaddingTransform(size_divisible)
    return model

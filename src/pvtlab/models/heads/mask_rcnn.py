"""Mask R-CNN (paper Table 4) on any pyramid backbone, from torchvision's parts.

FPN on all four stages plus a max-pooled level: P2-P6, convolutions initialised xavier-uniform.
Settings follow the released mmdetection 2.13 config (`mask_rcnn_r50_fpn` as used by PVT;
docs/fidelity.md): RPN with one anchor size per level (32..512) and ratios 0.5 / 1 / 2, IoU
0.7 / 0.3, 256 anchors sampled at half positives, 2000 proposals per level before NMS 0.7 and
1000 after it in training (1000 / 1000 at test); R-CNN on RoIAlign 7x7 with two 1024-wide
layers, IoU 0.5, 512 RoIs sampled at a quarter positives, box coder weights 10/10/5/5; mask
branch on RoIAlign 14x14, four 256-wide convolutions and a deconvolution to 28x28 masks; test
score threshold 0.05, class-wise NMS 0.5, at most 100 detections per image. RoIAlign samples
pixel centres (mmcv's `aligned=True`), and both box regressions learn with an L1 loss
(torchvision's R-CNN hard-codes smooth-L1, beta 1/9: `L1RegionProposalNetwork`,
`L1RoIHeads`).

Labels outside this module are 0-based like every pvtlab detection head; torchvision's Mask
R-CNN reserves 0 for background, so `MaskRCNNDetector` shifts them by one on the way in and out.
Images are not resized here (see `pvtlab.models.heads.retinanet.PaddingTransform`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import LevelMapper

from pvtlab.models.factory import BackboneFactory, pyramid_backbone
from pvtlab.models.heads.fpn import BackboneWithFPN
from pvtlab.models.heads.retinanet import ASPECT_RATIOS, PaddingTransform, PyramidAnchorGenerator

RPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
BOX_LOSSES = ("l1", "smooth_l1")


class LevelRoIAlign(MultiScaleRoIAlign):
    """RoIAlign over FPN levels of known strides, with mmcv's `aligned` choice.

    The level of each RoI is torchvision's (and mmdetection's) rule, floor(4 + log2(sqrt(area) /
    224)) clamped to the levels given. `aligned=True` (mmcv's default, the release's) shifts the
    sampling grid by half a pixel so that it samples pixel centres; torchvision's
    `MultiScaleRoIAlign` always pools with `aligned=False`. The scale of each level is 1 / its
    stride, as mmdetection's, instead of one inferred from the batch's padded size. A subclass so
    that torchvision's detectors accept it.
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        strides: Sequence[int],
        output_size: int,
        sampling_ratio: int = 0,
        aligned: bool = True,
    ) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        if len(strides) != len(featmap_names):
            raise ValueError("LevelRoIAlign needs one stride per feature map name")
        self.strides = tuple(int(s) for s in strides)
        self.aligned = aligned
        self.level_mapper = LevelMapper(
            int(math.log2(self.strides[0])),
            int(math.log2(self.strides[-1])),
            self.canonical_scale,
            self.canonical_level,
        )

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        maps = [x[name] for name in self.featmap_names]
        rois = torch.cat(
            [torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)]
        )
        levels = self.level_mapper(boxes)
        out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], *self.output_size))
        for level, (feature, stride) in enumerate(zip(maps, self.strides, strict=True)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(
                feature,
                rois[index].to(feature.dtype),
                self.output_size,
                spatial_scale=1.0 / stride,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
            )
            out[index] = pooled.to(out.dtype)
        return out


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN whose box loss is L1 (mmdetection's `L1Loss`, the release's) instead of
    smooth-L1 with beta 1/9; the same normalisation (the sampled anchors' count)."""

    def compute_loss(
        self,
        objectness: Tensor,
        pred_bbox_deltas: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        positive, negative = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(positive))[0]
        negative = torch.where(torch.cat(negative))[0]
        sampled = torch.cat([positive, negative])
        targets = torch.cat(regression_targets)
        box_loss = (pred_bbox_deltas[positive] - targets[positive]).abs().sum() / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], torch.cat(labels)[sampled]
        )
        return objectness_loss, box_loss


def box_branch_losses(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: list[Tensor],
    regression_targets: list[Tensor],
) -> dict[str, Tensor]:
    """The R-CNN box branch's losses with an L1 box loss: cross-entropy over the sampled RoIs, and
    the L1 distance of each positive RoI's deltas for its own class, summed and divided by the
    sampled RoIs' count (torchvision's `fastrcnn_loss` with L1 in place of smooth-L1)."""
    labels_all = torch.cat(labels)
    targets = torch.cat(regression_targets)
    classification = F.cross_entropy(class_logits, labels_all)
    positive = torch.where(labels_all > 0)[0]
    deltas = box_regression.reshape(labels_all.shape[0], -1, 4)[positive, labels_all[positive]]
    box_loss = (deltas - targets[positive]).abs().sum() / labels_all.numel()
    return {"loss_classifier": classification, "loss_box_reg": box_loss}


class L1RoIHeads(RoIHeads):
    """torchvision's box and mask branches whose box loss is L1 (`box_branch_losses`).

    Only the training pass differs; evaluation is torchvision's. Keypoint branches are not
    supported.
    """

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("the R-CNN heads in training mode need targets")
        proposals, matched, labels, regression_targets = self.select_training_samples(
            proposals, targets
        )
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        losses = box_branch_losses(class_logits, box_regression, labels, regression_targets)
        if self.has_mask():
            positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
            mask_proposals = [p[i] for p, i in zip(proposals, positive, strict=True)]
            mask_matches = [m[i] for m, i in zip(matched, positive, strict=True)]
            mask_features = self.mask_head(
                self.mask_roi_pool(features, mask_proposals, image_shapes)
            )
            losses["loss_mask"] = maskrcnn_loss(
                self.mask_predictor(mask_features),
                mask_proposals,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                mask_matches,
            )
        return [], losses


def l1_rpn(rpn: RegionProposalNetwork) -> L1RegionProposalNetwork:
    """The same RPN (its head and anchors, the same modules) with the L1 box loss."""
    return L1RegionProposalNetwork(
        rpn.anchor_generator,
        rpn.head,
        rpn.proposal_matcher.high_threshold,
        rpn.proposal_matcher.low_threshold,
        rpn.fg_bg_sampler.batch_size_per_image,
        rpn.fg_bg_sampler.positive_fraction,
        rpn._pre_nms_top_n,
        rpn._post_nms_top_n,
        rpn.nms_thresh,
        rpn.score_thresh,
    )


def l1_roi_heads(heads: RoIHeads) -> L1RoIHeads:
    """The same R-CNN heads (the same modules and settings) with the L1 box loss."""
    return L1RoIHeads(
        heads.box_roi_pool,
        heads.box_head,
        heads.box_predictor,
        heads.proposal_matcher.high_threshold,
        heads.proposal_matcher.low_threshold,
        heads.fg_bg_sampler.batch_size_per_image,
        heads.fg_bg_sampler.positive_fraction,
        heads.box_coder.weights,
        heads.score_thresh,
        heads.nms_thresh,
        heads.detections_per_img,
        mask_roi_pool=heads.mask_roi_pool,
        mask_head=heads.mask_head,
        mask_predictor=heads.mask_predictor,
    )


class MaskRCNNDetector(MaskRCNN):
    """torchvision's Mask R-CNN with 0-based labels at its interface (background stays inside).

    Predicted masks are (N, 1, H, W) probabilities: each 28x28 mask pasted into the image at
    `mask_sizes` (its box scaled from the input's pixels to that size), or into the input image
    without it. Pasting at the original image's size (mmdetection's `rescale=True`, the
    release's) instead of pasting at the input size and resizing keeps the mask's edge sharp.
    Boxes stay in the input's pixels either way.
    """

    pastes_masks_at_size = True  # DetectionTask passes the original image sizes as `mask_sizes`

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        mask_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if not self.training:
            return self._detect(images, mask_sizes)
        if targets is not None:
            missing = [i for i, t in enumerate(targets) if "masks" not in t]
            if missing:
                raise ValueError(
                    "Mask R-CNN trains on instance masks but targets carry none: load them with "
                    "data.with_masks=true (the Mask R-CNN recipes set it)"
                )
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        return super().forward(images, targets)

    def _detect(
        self, images: list[Tensor], mask_sizes: list[tuple[int, int]] | None
    ) -> list[dict[str, Tensor]]:
        batch, _ = self.transform(images)
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes)
        sizes = batch.image_sizes if mask_sizes is None else mask_sizes
        output = []
        for detection, input_size, size in zip(detections, batch.image_sizes, sizes, strict=True):
            detection = {**detection, "labels": detection["labels"] - 1}
            if "masks" in detection:
                size = (int(size[0]), int(size[1]))
                boxes = resize_boxes(detection["boxes"], input_size, size)
                detection["masks"] = paste_masks_in_image(detection["masks"], boxes, size)
            output.append(detection)
        return output


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
    roi_align_aligned: bool = True,
    box_loss: str = "l1",
    fpn_init: str = "xavier_uniform",
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
        roi_align_aligned: RoIAlign on pixel centres (mmcv's default, the release's) or
            torchvision's `aligned=False`.
        box_loss: `l1` (the release's RPN and R-CNN box loss) or `smooth_l1` (torchvision's,
            beta 1/9).
        fpn_init: `xavier_uniform` (release) or `kaiming_uniform` (torchvision), see
            `BackboneWithFPN`.
    """
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss={box_loss!r}; choose one of: {', '.join(BOX_LOSSES)}")
    backbone = pyramid_backbone(backbone)
    body = BackboneWithFPN(
        backbone, in_stages, fpn_channels, LastLevelMaxPool(), conv_init=fpn_init
    )
    levels = len(in_stages) + 1
    if len(rpn_anchor_sizes) != levels:
        raise ValueError(
            f"rpn_anchor_sizes has {len(rpn_anchor_sizes)} levels; the pyramid has {levels} "
            f"({len(in_stages)} stages + the max-pooled level)"
        )
    anchors = PyramidAnchorGenerator(
        [[float(s) for s in level] for level in rpn_anchor_sizes],
        [[float(r) for r in aspect_ratios]] * levels,
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
        box_roi_pool=LevelRoIAlign(names, body.strides, 7, sampling_ratio, roi_align_aligned),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
        mask_roi_pool=LevelRoIAlign(names, body.strides, 14, sampling_ratio, roi_align_aligned),
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
    if box_loss == "l1":
        model.rpn = l1_rpn(model.rpn)
        model.roi_heads = l1_roi_heads(model.roi_heads)
    return model

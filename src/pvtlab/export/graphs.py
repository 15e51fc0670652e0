"""The graphs that get exported: one batch of images in, a fixed tuple of tensors out.

Every graph takes ``images``, a float32 (B, 3, H, W) batch normalised as in training, with H and
W multiples of `SIZE_DIVISOR` (the backbone's total stride), and returns plain tensors:

============== ============================ ===================================================
network        outputs                      meaning
============== ============================ ===================================================
classifier     ``logits`` (B, K)            class scores before the softmax
Semantic FPN,  ``logits`` (B, K, H, W)      per-pixel class scores at the input size
Trans2Seg
RetinaNet      ``scores`` (B, A, K),        every anchor of every level, before the score
               ``boxes`` (B, A, 4)          threshold and NMS: sigmoid class probabilities and
                                            the decoded box, xyxy in input pixels, clipped to
                                            the image
DETR           ``scores`` (B, Q, K),        every query: class probabilities (softmax without
               ``boxes`` (B, Q, 4)          the "no object" slot) and its box, xyxy in input
                                            pixels; DETR needs no NMS
============== ============================ ===================================================

RetinaNet stops before NMS because the kept boxes are a data-dependent number per image and
torchvision's filtering loops over images in Python. The model's own detections follow from
these outputs by its `head.score_thresh`, the `head.topk_candidates` best per level, class-wise
NMS at `head.nms_thresh` (``torchvision.ops.batched_nms``) and `head.detections_per_img`. Labels
are ``scores.argmax(-1)`` (DETR) or the class index of each kept pair, 0-based as everywhere in
pvtlab. Mask R-CNN is refused (`mask_rcnn_reason`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_convert

from pvtlab.config import head_kind
from pvtlab.models.heads.detr import DETR

# PVT's total stride: inputs that are multiples of it need no padding inside the backbone, so
# one graph serves every such size (padding is a branch on the input size).
SIZE_DIVISOR = 32


class ExportError(ValueError):
    """A network that cannot be exported, with the reason."""


def mask_rcnn_reason() -> str:
    return (
        "Mask R-CNN cannot be exported: torchvision runs its box and mask branches on the "
        "proposals that NMS keeps, a number known only at run time, and its region-proposal "
        "and RoI code loops over images and levels in Python; torch.export and TorchScript "
        "tracing cannot capture that as one graph with dynamic sizes. Export RetinaNet or DETR, "
        "or run the checkpoint in PyTorch."
    )


def image_scale(images: Tensor) -> Tensor:
    """(w, h, w, h) of a batch as a float tensor.

    Computed by tensor operations rather than from Python integers, so that a traced graph keeps
    following the input size instead of storing the size it was traced at.
    """
    height = torch.ones_like(images[0, 0, :, 0]).sum()
    width = torch.ones_like(images[0, 0, 0, :]).sum()
    return torch.stack((width, height, width, height))


class ImageLogits(nn.Module):
    """images -> logits (B, K); also a segmenter's images -> logits (B, K, H, W)."""

    output_names = ("logits",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor]:
        return (self.model(images),)


class RetinaNetCandidates(nn.Module):
    """images -> every anchor's class probabilities and decoded box (before NMS)."""

    output_names = ("scores", "boxes")

    def __init__(self, model: RetinaNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = list(self.model.backbone(images).values())
        head = self.model.head(features)
        # The anchors depend on the sizes only, so one image stands for the batch.
        batch = ImageList(images, [(images.shape[-2], images.shape[-1])])
        anchors = self.model.anchor_generator(batch, features)[0]
        deltas = head["bbox_regression"]
        boxes = self.model.box_coder.decode_single(
            deltas.reshape(-1, 4), anchors.repeat(deltas.shape[0], 1)
        ).reshape(deltas.shape)
        scale = image_scale(images)
        boxes = torch.minimum(boxes.clamp(min=0), scale)
        return head["cls_logits"].sigmoid(), boxes


class DETRDetections(nn.Module):
    """images -> every query's class probabilities and box in pixels (no padding in a batch)."""

    output_names = ("scores", "boxes")

    def __init__(self, model: DETR) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        # All images of an exported batch share one size: nothing is padding.
        padding = torch.zeros_like(images[:, 0], dtype=torch.bool)
        outputs = self.model.predict(images, padding)
        scores = outputs["logits"].softmax(-1)[..., :-1]
        scale = image_scale(images)
        boxes = box_convert(outputs["boxes"], "cxcywh", "xyxy") * scale
        return scores, torch.minimum(boxes.clamp(min=0), scale)


def export_graph(network: nn.Module, description: Mapping[str, Any]) -> nn.Module:
    """The exportable graph of a pvtlab network (see the module docstring), in eval mode.

    `description` is the network's saved model description (its `head` config tells its kind).
    """
    kind = head_kind(description["head"]) if "head" in description else None
    if isinstance(network, MaskRCNN):
        raise ExportError(mask_rcnn_reason())
    if isinstance(network, RetinaNet):
        graph: nn.Module = RetinaNetCandidates(network)
    elif isinstance(network, DETR):
        graph = DETRDetections(network)
    elif kind in ("classification", "segmentation", None):
        graph = ImageLogits(network)
    else:
        raise ExportError(
            f"no export for the {kind} network {type(network).__name__}: exported are the "
            "classifier, Semantic FPN, Trans2Seg, RetinaNet and DETR"
        )
    return graph.eval()

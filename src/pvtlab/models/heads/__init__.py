"""Task heads on pyramid backbones, and which of their parts `torch.compile` can take."""

from __future__ import annotations

from torch import nn

__all__ = ["static_shape_parts"]


def static_shape_parts(model: nn.Module) -> list[nn.Module]:
    """The submodules of a pvtlab network whose tensor shapes follow from the image batch alone,
    so that `torch.compile` traces each once per input size.

    Classifiers and segmenters map images to logits and are one such part. In the detectors,
    target assignment, sampling, NMS and the set matcher give data-dependent shapes (recompiled
    on every batch) and stay eager: compiled are the backbone with its FPN, the dense branches
    (RetinaNet's class and box towers, the RPN head) and DETR's transformer.
    """
    # Imported here: the detection heads pull in torchvision's detection models.
    from torchvision.models.detection import MaskRCNN, RetinaNet

    from pvtlab.models.heads.detr import DETR

    if isinstance(model, RetinaNet):
        return [model.backbone, model.head.classification_head, model.head.regression_head]
    if isinstance(model, MaskRCNN):
        return [model.backbone, model.rpn.head]
    if isinstance(model, DETR):
        return [model.backbone, model.transformer]
    return [model]

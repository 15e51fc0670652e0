"""Classification: the backbone's own head (PVT: final-normed class token into a linear layer)."""

from __future__ import annotations

from torch import nn

from pvtlab.models.factory import BackboneFactory


def build_classifier(backbone: nn.Module | BackboneFactory, num_classes: int) -> nn.Module:
    """Return the timm classification model itself, its classifier sized for `num_classes`.

    `backbone` is the timm classifier, or a factory of it (called with ``features_only=False``).
    Keeping the timm model unwrapped keeps its parameter names, so a task's weights export
    directly to the layout `backbone.pretrained=` reads.
    """
    if not isinstance(backbone, nn.Module):
        return backbone(features_only=False, num_classes=num_classes)
    if getattr(backbone, "num_classes", num_classes) != num_classes:
        backbone.reset_classifier(num_classes)
    return backbone

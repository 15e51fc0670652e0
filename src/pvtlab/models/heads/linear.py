"""Classification: the backbone's own head (PVT: final-normed class token into a linear layer)."""

from __future__ import annotations

from torch import nn


def build_classifier(backbone: nn.Module, num_classes: int) -> nn.Module:
    """Return the timm classification model itself, its classifier sized for `num_classes`.

    Keeping the timm model unwrapped keeps its parameter names, so a task's weights export
    directly to the layout `backbone.pretrained=` reads.
    """
    if getattr(backbone, "num_classes", num_classes) != num_classes:
        backbone.reset_classifier(num_classes)
    return backbone

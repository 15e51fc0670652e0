"""A pyramid backbone followed by torchvision's feature pyramid network.

Heads read only the backbone's `feature_info` (channels and reductions of its four maps), so any
timm `features_only` model, PVT or baseline, plugs in unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork


class BackboneWithFPN(nn.Module):
    """`features_only` backbone -> chosen stages -> FPN; the interface torchvision detectors expect.

    Args:
        backbone: a timm `features_only` model returning a list of maps, high to low resolution.
        in_stages: which of the backbone's maps (0-based) enter the FPN, e.g. (1, 2, 3) for
            RetinaNet's P3-P5, (0, 1, 2, 3) for Mask R-CNN and Semantic FPN.
        out_channels: FPN width (256 in the paper).
        extra_blocks: torchvision's extra levels (`LastLevelP6P7`, `LastLevelMaxPool`) or None.

    `forward` returns an ordered dict of FPN maps named "0", "1", ... then the extra levels' names;
    `out_channels` is an int, as torchvision's RetinaNet / MaskRCNN require.
    """

    def __init__(
        self,
        backbone: nn.Module,
        in_stages: Sequence[int],
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
    ) -> None:
        super().__init__()
        channels = backbone.feature_info.channels()
        reductions = backbone.feature_info.reduction()
        if any(i < 0 or i >= len(channels) for i in in_stages):
            raise ValueError(
                f"in_stages {list(in_stages)} outside the backbone's {len(channels)} maps"
            )
        self.body = backbone
        self.in_stages = tuple(in_stages)
        self.strides = tuple(reductions[i] for i in self.in_stages)
        self.fpn = FeaturePyramidNetwork(
            [channels[i] for i in self.in_stages], out_channels, extra_blocks=extra_blocks
        )
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body(images)
        return self.fpn(OrderedDict((str(k), maps[i]) for k, i in enumerate(self.in_stages)))

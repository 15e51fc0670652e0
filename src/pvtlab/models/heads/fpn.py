"""A pyramid backbone followed by torchvision's feature pyramid network.

Heads read only the backbone's `feature_info` (channels and reductions of its four maps), so any
timm `features_only` model, PVT or baseline, plugs in unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

FPN_INITS = ("xavier_uniform", "kaiming_uniform")


class OnInputP6P7(ExtraFPNBlock):
    """RetinaNet's extra levels computed from the last backbone map ("on input"):
    P6 = conv(C5), P7 = conv(P6), or conv(relu(P6)) with `relu_before_extra_convs`.

    The released RetinaNet (mmdetection's FPN, `add_extra_convs="on_input"`) applies no ReLU
    before P7 (`relu_before_extra_convs=False`); torchvision's `LastLevelP6P7` always does, and
    reads P5 instead of C5 when their widths agree. The submodule names (`p6`, `p7`) are
    torchvision's.
    """

    def __init__(
        self, in_channels: int, out_channels: int, relu_before_extra_convs: bool = False
    ) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        self.relu_before_extra_convs = relu_before_extra_convs

    def forward(
        self, results: list[Tensor], x: list[Tensor], names: list[str]
    ) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(x[-1])
        p7 = self.p7(F.relu(p6) if self.relu_before_extra_convs else p6)
        return [*results, p6, p7], [*names, "p6", "p7"]


class BackboneWithFPN(nn.Module):
    """`features_only` backbone -> chosen stages -> FPN; the interface torchvision detectors expect.

    Args:
        backbone: a timm `features_only` model returning a list of maps, high to low resolution.
        in_stages: which of the backbone's maps (0-based) enter the FPN, e.g. (1, 2, 3) for
            RetinaNet's P3-P5, (0, 1, 2, 3) for Mask R-CNN and Semantic FPN.
        out_channels: FPN width (256 in the paper).
        extra_blocks: extra levels (`OnInputP6P7`, torchvision's `LastLevelMaxPool`) or None.
        conv_init: initialisation of every FPN convolution, extra levels included:
            `xavier_uniform` (mmdetection's and mmsegmentation's FPN, which the release used) or
            `kaiming_uniform` (torchvision's, a=1); biases start at zero either way.

    `forward` returns an ordered dict of FPN maps named "0", "1", ... then the extra levels' names;
    `out_channels` is an int, as torchvision's RetinaNet / MaskRCNN require.
    """

    def __init__(
        self,
        backbone: nn.Module,
        in_stages: Sequence[int],
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        conv_init: str = "xavier_uniform",
    ) -> None:
        super().__init__()
        channels = backbone.feature_info.channels()
        reductions = backbone.feature_info.reduction()
        if any(i < 0 or i >= len(channels) for i in in_stages):
            raise ValueError(
                f"in_stages {list(in_stages)} outside the backbone's {len(channels)} maps"
            )
        if conv_init not in FPN_INITS:
            raise ValueError(f"conv_init={conv_init!r}; choose one of: {', '.join(FPN_INITS)}")
        self.body = backbone
        self.in_stages = tuple(in_stages)
        self.strides = tuple(reductions[i] for i in self.in_stages)
        self.fpn = FeaturePyramidNetwork(
            [channels[i] for i in self.in_stages], out_channels, extra_blocks=extra_blocks
        )
        self.out_channels = out_channels
        init_fpn_convs(self.fpn, conv_init)

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body(images)
        return self.fpn(OrderedDict((str(k), maps[i]) for k, i in enumerate(self.in_stages)))


def init_fpn_convs(fpn: nn.Module, conv_init: str) -> None:
    """Initialise every convolution of `fpn` the way `conv_init` names (see `BackboneWithFPN`)."""
    for module in fpn.modules():
        if isinstance(module, nn.Conv2d):
            if conv_init == "xavier_uniform":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.kaiming_uniform_(module.weight, a=1)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

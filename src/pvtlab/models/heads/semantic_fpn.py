"""Semantic FPN (Kirillov et al., Panoptic FPN's semantic branch), as PVT uses it on ADE20K.

The four pyramid maps go through torchvision's FPN at 256 channels, its convolutions initialised
xavier-uniform as mmsegmentation's FPN (the release's). Each FPN level is brought to
the finest stride (4) by max(1, log2(stride / 4)) steps of 3x3 conv (128 channels) - norm - ReLU,
each followed by a 2x bilinear upsampling unless the level is already at stride 4; the levels are
summed, dropped out (0.1), classified by a 1x1 conv and upsampled to the input size.
With PVT-Small and 150 classes: 28.2M parameters, 44.5 GMACs at 512x512 (paper Table 5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from pvtlab.models.factory import BackboneFactory, pyramid_backbone
from pvtlab.models.heads.fpn import BackboneWithFPN


def norm_2d(kind: str, channels: int) -> nn.Module:
    """`bn` (BatchNorm; SyncBatchNorm under `trainer.sync_batchnorm`), `gn` (32 groups) or `none`."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not supported; choose one of: bn, gn, none")


class ConvNormReLU(nn.Sequential):
    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, norm: str = "bn"
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                padding=kernel_size // 2,
                bias=norm == "none",
            ),
            norm_2d(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class ScaleBranch(nn.Sequential):
    """One FPN level to the finest stride: conv-norm-ReLU steps, each then 2x up (if not finest)."""

    def __init__(
        self, in_channels: int, channels: int, stride: int, finest: int, norm: str
    ) -> None:
        steps = max(1, round(math.log2(stride / finest)))
        layers: list[nn.Module] = []
        for step in range(steps):
            layers.append(ConvNormReLU(in_channels if step == 0 else channels, channels, 3, norm))
            if stride != finest:
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        super().__init__(*layers)


class SemanticFPNHead(nn.Module):
    """FPN maps (fine to coarse) -> per-class logits at the finest map's resolution.

    Args:
        in_channels: FPN width.
        strides: stride of each FPN map, e.g. (4, 8, 16, 32).
        num_classes: output classes.
        channels: width of the scale branches (128 in the paper).
        norm: norm after each 3x3 conv (`bn` as in the released ADE20K config, `gn`, `none`).
        dropout: channel dropout before the classifier.
    """

    def __init__(
        self,
        in_channels: int,
        strides: Sequence[int],
        num_classes: int,
        channels: int = 128,
        norm: str = "bn",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        finest = min(strides)
        self.branches = nn.ModuleList(
            ScaleBranch(in_channels, channels, s, finest, norm) for s in strides
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.branches.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        out = None
        for branch, feature in zip(self.branches, features, strict=True):
            level = branch(feature)
            if level.shape[-2:] != size:  # inputs not divisible by 32 give off-by-one grids
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            out = level if out is None else out + level
        return self.classifier(self.dropout(out))


class SemanticFPN(nn.Module):
    """Backbone + FPN (all four stages) + Semantic FPN head; logits at the input size.

    Args:
        backbone: a timm `features_only` model with four maps (strides 4, 8, 16, 32), or a
            factory of one (`pyramid_backbone`).
        num_classes: output classes.
        fpn_channels: FPN width (256).
        head_channels: scale-branch width (128).
        norm: norm of the head's convolutions (`bn`, `gn`, `none`).
        dropout: channel dropout before the classifier (0.1).
        fpn_init: `xavier_uniform` (release) or `kaiming_uniform` (torchvision), see
            `BackboneWithFPN`.
    """

    def __init__(
        self,
        backbone: nn.Module | BackboneFactory,
        num_classes: int,
        fpn_channels: int = 256,
        head_channels: int = 128,
        norm: str = "bn",
        dropout: float = 0.1,
        fpn_init: str = "xavier_uniform",
    ) -> None:
        super().__init__()
        backbone = pyramid_backbone(backbone)
        stages = tuple(range(len(backbone.feature_info.channels())))
        self.backbone = BackboneWithFPN(
            backbone, stages, out_channels=fpn_channels, conv_init=fpn_init
        )
        self.head = SemanticFPNHead(
            fpn_channels, self.backbone.strides, num_classes, head_channels, norm, dropout
        )
        self.num_classes = num_classes

    def forward(self, images: Tensor) -> Tensor:
        features = list(self.backbone(images).values())
        logits = self.head(features)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

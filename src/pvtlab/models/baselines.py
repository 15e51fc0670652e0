"""Baselines behind the same four-map pyramid interface as PVT.

* CNNs: timm's own ResNet18/50/101 and ResNeXt101-32x4d/-64x4d. Their stride-4..32 maps are
  timm's feature indices 1-4 (index 0 is the stride-2 stem); :func:`pyramid_out_indices` maps the
  pyramid levels 0-3 onto them. Channels 64/128/256/512 (ResNet18) or 256/512/1024/2048.
* Columnar ViT (paper Table 8): ``vit_small_32`` is timm's ViT-Small/32 (384 wide, 12 blocks,
  6 heads) whose feature path returns the tokens after blocks 2, 4, 6, 8 (1-based), reshaped to
  the 1/32 grid and resized bilinearly to strides 4, 8, 16, 32 (grids ``ceil(H / s)``, as PVT's).
  Any input size: the image is zero-padded to a multiple of the patch and the position
  embedding resized to the grid (timm's ``dynamic_img_size`` / ``dynamic_img_pad``).
  ``vit_small_16`` is the same with 16 x 16 patches (the paper's Figure 6 curve).

The ViT classes keep timm's VisionTransformer parameter names, so timm ViT-S weights load.

The paper's CNN rows come from mmdetection's and mmsegmentation's standard baselines, whose
ResNets freeze the stem and the first stage (`frozen_stages=1`) and keep BatchNorm in eval mode
(`norm_eval=True`; DETR's R50 also freezes BatchNorm's affine parameters). `batch_norm_layer`
gives timm the norm layer of each choice (timm's ResNets take `norm_layer`), and
`freeze_stages` freezes the stem and the first stages of a built CNN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer

from pvtlab.models.pvt import pretrained_cfg

__all__ = [
    "BATCH_NORM_MODES",
    "CNN_BACKBONES",
    "VIT_BACKBONES",
    "ColumnarViT",
    "EvalModeBatchNorm2d",
    "FixedBatchNorm2d",
    "batch_norm_layer",
    "freeze_stages",
    "pyramid_out_indices",
    "vit_checkpoint_filter_fn",
]

# timm feature index of the first stride-4 map of each CNN family
CNN_BACKBONES: dict[str, int] = {
    "resnet18": 1,
    "resnet50": 1,
    "resnet101": 1,
    "resnext101_32x4d": 1,
    "resnext101_64x4d": 1,
    "gcresnet50t": 1,  # ResNet50-T with global-context blocks (paper Table 10's GC-ResNet50)
}
VIT_BACKBONES = ("vit_small_32", "vit_small_16")


BATCH_NORM_MODES = ("train", "eval", "frozen")


class EvalModeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics and never updates them,
    while its scale and shift still learn (mmdetection's `norm_eval=True`). The state dict is
    BatchNorm2d's, so ImageNet weights load unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class FixedBatchNorm2d(EvalModeBatchNorm2d):
    """`EvalModeBatchNorm2d` whose scale and shift do not learn either (mmdetection's
    `norm_cfg=dict(requires_grad=False)` with `norm_eval=True`, the DETR R50 baseline)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)


def batch_norm_layer(mode: str = "train") -> type[nn.Module]:
    """The BatchNorm class for a CNN baseline, passed to timm as `norm_layer`.

    `train`: BatchNorm2d (statistics from each batch; mmsegmentation's baselines). `eval`:
    `EvalModeBatchNorm2d` (mmdetection's `norm_eval=True`). `frozen`: `FixedBatchNorm2d`,
    statistics and affine parameters fixed (the DETR R50 baseline). All keep BatchNorm2d's
    state dict, so ImageNet weights load strictly.
    """
    layers = {"train": nn.BatchNorm2d, "eval": EvalModeBatchNorm2d, "frozen": FixedBatchNorm2d}
    if mode not in layers:
        raise ValueError(f"batch norm mode {mode!r}; choose one of: {', '.join(BATCH_NORM_MODES)}")
    return layers[mode]


# Module-name prefixes of a timm ResNet's stem, then of its stages (features_only keeps the names).
RESNET_STEM = ("conv1.", "bn1.")
RESNET_STAGES = ("layer1.", "layer2.", "layer3.", "layer4.")


def freeze_stages(model: nn.Module, frozen_stages: int) -> nn.Module:
    """Stop the gradients of a timm ResNet's stem and its first `frozen_stages` stages
    (mmdetection's `frozen_stages`; 0 freezes the stem only, -1 nothing). Returns `model`."""
    if frozen_stages < 0:
        return model
    if frozen_stages > len(RESNET_STAGES):
        raise ValueError(f"frozen_stages={frozen_stages}: a ResNet has {len(RESNET_STAGES)}")
    prefixes = RESNET_STEM + RESNET_STAGES[:frozen_stages]
    names = [name for name, _ in model.named_parameters()]
    if not any(name.startswith(RESNET_STEM) for name in names):
        raise ValueError("freeze_stages expects a timm ResNet (conv1, bn1, layer1..4)")
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    return model


def pyramid_out_indices(name: str, levels: Sequence[int]) -> tuple[int, ...]:
    """timm ``out_indices`` of `name` for pyramid levels (0 = stride 4 ... 3 = stride 32)."""
    offset = CNN_BACKBONES.get(name, 0)
    return tuple(offset + i for i in levels)


class ColumnarViT(VisionTransformer):
    """A plain ViT whose intermediate / feature path gives a 4-level pyramid (paper Table 8).

    ``forward``, ``forward_features`` and ``forward_head`` are timm's ViT classifier. In
    ``forward_intermediates`` and ``prune_intermediate_layers`` an index is a pyramid level
    (0-3), not a block.
    """

    def __init__(
        self,
        *,
        pyramid_blocks: Sequence[int] = (1, 3, 5, 7),
        pyramid_strides: Sequence[int] = (4, 8, 16, 32),
        **kwargs: Any,
    ) -> None:
        """
        Args:
            pyramid_blocks: 0-based blocks whose outputs form the levels ((1, 3, 5, 7): after
                the 2nd, 4th, 6th and 8th block).
            pyramid_strides: output stride of each level.
            kwargs: timm ``VisionTransformer`` arguments.
        """
        kwargs.setdefault("dynamic_img_size", True)
        kwargs.setdefault("dynamic_img_pad", True)
        super().__init__(**kwargs)
        if len(pyramid_blocks) != len(pyramid_strides):
            raise ValueError("pyramid_blocks and pyramid_strides need one entry per level")
        self.pyramid_blocks = tuple(pyramid_blocks)
        self.pyramid_strides = tuple(pyramid_strides)
        self.feature_info = [
            dict(num_chs=self.embed_dim, reduction=s, module=f"blocks.{b}")
            for b, s in zip(self.pyramid_blocks, self.pyramid_strides, strict=True)
        ]

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        take, _ = feature_take_indices(len(self.pyramid_blocks), indices)
        super().prune_intermediate_layers(
            [self.pyramid_blocks[i] for i in take], prune_norm=prune_norm, prune_head=prune_head
        )
        return take

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        **kwargs: Any,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, _ = feature_take_indices(len(self.pyramid_blocks), indices)
        H, W = x.shape[-2:]
        out = super().forward_intermediates(
            x,
            indices=[self.pyramid_blocks[i] for i in take],
            norm=norm,
            stop_early=stop_early,
            output_fmt="NCHW",
            intermediates_only=intermediates_only,
            **kwargs,
        )
        maps = out if intermediates_only else out[1]
        maps = [
            F.interpolate(
                m,
                size=(
                    math.ceil(H / self.pyramid_strides[i]),
                    math.ceil(W / self.pyramid_strides[i]),
                ),
                mode="bilinear",
                align_corners=False,
            )
            for m, i in zip(maps, take, strict=True)
        ]
        return maps if intermediates_only else (out[0], maps)


def vit_checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Resample a position embedding trained at another resolution to the model's grid."""
    pos = state_dict.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or target is None or pos.shape == target.shape:
        return state_dict
    if pos.ndim != 3 or pos.shape[-1] != target.shape[-1]:
        return state_dict  # the strict check reports it
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    out = dict(state_dict)
    out["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix, verbose=False
    )
    return out


def _create_columnar_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> ColumnarViT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        ColumnarViT,
        variant,
        pretrained,
        pretrained_filter_fn=vit_checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return pretrained_cfg(
        first_conv="patch_embed.proj", custom_load=False, paper_ids="arXiv:2010.11929", **kwargs
    )


default_cfgs = generate_default_cfgs(
    {"vit_small_32.untrained": _cfg(), "vit_small_16.untrained": _cfg()}
)


@register_model
def vit_small_32(pretrained: bool = False, **kwargs: Any) -> ColumnarViT:
    """Columnar ViT-Small/32 (paper Table 8): pyramid from blocks 2, 4, 6, 8."""
    args = dict(patch_size=32, embed_dim=384, depth=12, num_heads=6)
    return _create_columnar_vit("vit_small_32", pretrained, **dict(args, **kwargs))


@register_model
def vit_small_16(pretrained: bool = False, **kwargs: Any) -> ColumnarViT:
    """Columnar ViT-Small/16 (paper Figure 6 cost curve): pyramid from blocks 2, 4, 6, 8."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_columnar_vit("vit_small_16", pretrained, **dict(args, **kwargs))

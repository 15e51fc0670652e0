"""`create_backbone`: the one way heads build a backbone, PVT or baseline."""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from typing import Any

import timm
import torch
import torch.nn as nn

from pvtlab.models.baselines import (
    CNN_BACKBONES,
    VIT_BACKBONES,
    batch_norm_layer,
    freeze_stages,
    pyramid_out_indices,
    vit_checkpoint_filter_fn,
)
from pvtlab.models.checkpoint import FilterFn, load_checkpoint, unwrap_model
from pvtlab.models.pvt import checkpoint_filter_fn as pvt_checkpoint_filter_fn

__all__ = ["BACKBONES", "BackboneFactory", "backbone_family", "create_backbone", "pyramid_backbone"]

PVT_BACKBONES = ("pvt_tiny", "pvt_small", "pvt_medium", "pvt_large", "pvt_small_wide")
BACKBONES: tuple[str, ...] = PVT_BACKBONES + tuple(CNN_BACKBONES) + VIT_BACKBONES


def backbone_family(name: str) -> str:
    """``'pvt'``, ``'cnn'`` or ``'vit'``; raises for a name outside :data:`BACKBONES`."""
    if name in PVT_BACKBONES:
        return "pvt"
    if name in CNN_BACKBONES:
        return "cnn"
    if name in VIT_BACKBONES:
        return "vit"
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


# A backbone config instantiated: `functools.partial(create_backbone, name, ...)`, completed by
# the head with `features_only` (and `num_classes` for the classifier).
BackboneFactory = Callable[..., nn.Module]

_FILTERS: dict[str, FilterFn | None] = {
    "pvt": pvt_checkpoint_filter_fn,
    "cnn": None,
    "vit": vit_checkpoint_filter_fn,
}


def create_backbone(
    name: str,
    *,
    features_only: bool,
    num_classes: int = 1000,
    pretrained: str | PathLike[str] | None = None,
    drop_path_rate: float | None = None,
    img_size: int | None = None,
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    channels_last: bool = False,
    batch_norm: str | None = None,
    frozen_stages: int = -1,
    **kwargs: Any,
) -> nn.Module:
    """Build a backbone by timm name, optionally loading weights strictly from a file.

    Args:
        name: one of :data:`BACKBONES` (``pvt_small``, ``resnet50``, ``vit_small_32``, ...).
        features_only: return the pyramid feature extractor (a list of NCHW maps, strides
            4/8/16/32 for `out_indices` 0/1/2/3, described by ``feature_info``) instead of the
            classifier.
        num_classes: classifier size (ignored with `features_only`).
        pretrained: a released checkpoint, a pvtlab export (``model.state_dict()`` of the full
            timm model) or a pvtlab Lightning ``.ckpt``. Everything must fit, except what is left
            out on purpose: class token / final norm / head / unused stages for `features_only`,
            and a head of another size (re-initialised). Raises ``CheckpointError`` otherwise.
        drop_path_rate: stochastic-depth rate; None keeps the model's default (0).
        img_size: the training resolution at which PVT stores its position embeddings (other
            sizes are resized to); None: the model's default, 224. Backbones without a stored
            grid (the CNNs, and the columnar ViT, which resizes per input) ignore it.
        out_indices: pyramid levels to return with `features_only`.
        channels_last: keep the weights in NHWC memory order, which makes PyTorch run every
            convolution channels-last (the CNN baselines' configs set it).
        batch_norm: CNN baselines' BatchNorm, `train`, `eval` or `frozen`
            (`pvtlab.models.baselines.batch_norm_layer`); None: timm's default.
        frozen_stages: CNN baselines' stem and first stages without gradients
            (`pvtlab.models.baselines.freeze_stages`); -1: none.
        kwargs: further ``timm.create_model`` arguments.
    """
    family = backbone_family(name)
    model_kwargs = dict(kwargs)
    if drop_path_rate is not None:
        model_kwargs["drop_path_rate"] = float(drop_path_rate)
    if img_size is not None and family == "pvt":
        model_kwargs["img_size"] = img_size
    if (batch_norm is not None or frozen_stages >= 0) and family != "cnn":
        raise ValueError(f"batch_norm and frozen_stages apply to the CNN baselines, not {name!r}")
    if batch_norm is not None:
        model_kwargs["norm_layer"] = batch_norm_layer(batch_norm)

    if features_only:
        model = timm.create_model(
            name,
            features_only=True,
            out_indices=pyramid_out_indices(name, out_indices),
            **model_kwargs,
        )
    else:
        model = timm.create_model(name, num_classes=num_classes, **model_kwargs)

    if pretrained is not None:
        droppable: set[str] = set()
        if features_only:
            # what the feature extractor left out of the full model is dropped on purpose
            with torch.device("meta"):
                full = timm.create_model(name, **model_kwargs)
            droppable = set(full.state_dict()) - set(unwrap_model(model).state_dict())
        load_checkpoint(model, pretrained, filter_fn=_FILTERS[family], droppable=droppable)
    freeze_stages(model, frozen_stages)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def pyramid_backbone(backbone: nn.Module | BackboneFactory) -> nn.Module:
    """The pyramid feature model a dense head runs on: `backbone` itself when it is already
    built, else what the factory builds with ``features_only=True``."""
    return backbone if isinstance(backbone, nn.Module) else backbone(features_only=True)

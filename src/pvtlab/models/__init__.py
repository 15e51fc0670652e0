"""Backbones: the PVT family and the pyramid baselines, registered with timm on import.

``create_backbone(name, features_only=..., pretrained=...)`` is what tasks call; every backbone
is also a plain timm model (``timm.create_model("pvt_small", features_only=True)``).
"""

from pvtlab.models import baselines, pvt  # noqa: F401  (timm registration side effect)
from pvtlab.models.baselines import ColumnarViT
from pvtlab.models.checkpoint import (
    CheckpointError,
    LoadReport,
    load_checkpoint,
    read_state_dict,
)
from pvtlab.models.complexity import count_gmacs, count_macs
from pvtlab.models.factory import BACKBONES, backbone_family, create_backbone
from pvtlab.models.pvt import PyramidVisionTransformer, resize_pos_embed

__all__ = [
    "BACKBONES",
    "CheckpointError",
    "ColumnarViT",
    "LoadReport",
    "PyramidVisionTransformer",
    "backbone_family",
    "count_gmacs",
    "count_macs",
    "create_backbone",
    "load_checkpoint",
    "read_state_dict",
    "resize_pos_embed",
]

"""`compile=true` compiles the backbone in place: same parameter names, heads left eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pvtlab.pipeline import build_model
from pvtlab.tasks.base import TaskModule, backbone_of
from tests.conftest import compose_config

HEADS = {
    "classification": "linear",
    "detection": "retinanet",
    "segmentation": "semantic_fpn",
}


@pytest.mark.parametrize("kind", list(HEADS))
def test_compile_wraps_only_the_backbone(kind: str) -> None:
    cfg = compose_config([f"task={kind}", f"head={HEADS[kind]}", "backbone=pvt_tiny"])
    model = build_model(cfg.backbone, cfg.head, num_classes=8)
    names = [name for name, _ in model.named_parameters()]
    task = TaskModule(model)
    task.compile_model()

    backbone = backbone_of(model)
    assert backbone._compiled_call_impl is not None
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == [backbone]
    assert [name for name, _ in model.named_parameters()] == names
    if kind == "classification":
        assert backbone is model


def test_a_network_without_a_backbone_is_named() -> None:
    with pytest.raises(TypeError, match="Sequential holds no timm backbone"):
        backbone_of(nn.Sequential(nn.Linear(2, 2)))


def test_compiled_classifier_gives_the_eager_logits() -> None:
    cfg = compose_config(["backbone=pvt_tiny", "backbone.kwargs.img_size=32"])
    model = build_model(cfg.backbone, cfg.head, num_classes=8).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(images)
        TaskModule(model).compile_model(backend="eager")  # graph capture without C++ codegen
        compiled = model(images)
    torch.testing.assert_close(compiled, eager)

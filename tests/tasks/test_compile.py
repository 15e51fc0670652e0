"""`compile=true` compiles a network's static-shape parts in place: same parameter names, the
detectors' data-dependent parts (assignment, sampling, NMS, matching) left eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import profile

from pvtlab.pipeline import build_model
from pvtlab.tasks.base import FROZEN_WEIGHTS, TaskModule, backbone_of, frozen_weight_compilation
from tests.conftest import compose_config

# (task, head) -> names of the submodules compiled ("" is the whole network).
COMPILED = {
    ("classification", "linear"): [""],
    ("segmentation", "semantic_fpn"): [""],
    ("segmentation", "trans2seg"): [""],
    ("detection", "retinanet"): [
        "backbone",
        "head.classification_head",
        "head.regression_head",
    ],
    ("detection", "mask_rcnn"): ["backbone", "rpn.head"],
    ("detection", "detr"): ["backbone", "transformer"],
}


@pytest.mark.parametrize(("kind", "head"), list(COMPILED))
def test_compile_wraps_the_static_shape_parts(kind: str, head: str) -> None:
    cfg = compose_config([f"task={kind}", f"head={head}", "backbone=pvt_tiny"])
    model = build_model(cfg.backbone, cfg.head, num_classes=8)
    names = [name for name, _ in model.named_parameters()]
    TaskModule(model).compile_model()

    compiled = [
        name
        for name, module in model.named_modules()
        if getattr(module, "_compiled_call_impl", None) is not None
    ]
    assert compiled == COMPILED[(kind, head)]
    # The backbone, where most of the time goes, is always inside a compiled part.
    assert any(backbone_of(model) in set(model.get_submodule(n).modules()) for n in compiled)
    assert [name for name, _ in model.named_parameters()] == names


def test_a_network_without_a_backbone_is_named() -> None:
    with pytest.raises(TypeError, match="Sequential holds no timm backbone"):
        backbone_of(nn.Sequential(nn.Linear(2, 2)))


def test_compiled_classifier_gives_the_eager_logits() -> None:
    cfg = compose_config(["backbone=pvt_tiny", "backbone.img_size=32"])
    model = build_model(cfg.backbone, cfg.head, num_classes=8).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(images)
        TaskModule(model).compile_model(backend="eager")  # graph capture without C++ codegen
        compiled = model(images)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("head", ["retinanet", "mask_rcnn", "detr"])
def test_compiled_detector_gives_the_eager_losses(head: str) -> None:
    cfg = compose_config(["task=detection", f"head={head}", "backbone=pvt_tiny"])
    torch.manual_seed(0)
    model = build_model(cfg.backbone, cfg.head, num_classes=3).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]),
            "labels": torch.tensor([1]),
            "masks": torch.zeros(1, 64, 64, dtype=torch.uint8).index_fill_(
                1, torch.arange(6, 40), 1
            ),
        },
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "masks": torch.zeros(0, 64, 64, dtype=torch.uint8),
        },
    ]

    def losses() -> dict[str, torch.Tensor]:
        torch.manual_seed(1)  # the samplers and dropout draw the same numbers in both runs
        return model(images, targets)

    eager = losses()
    TaskModule(model).compile_model(backend="eager")
    torch.testing.assert_close(losses(), eager)


def test_frozen_weight_compilation_runs_onednn_linears_with_gelu_inside() -> None:
    """What `src/eval.py compile=true` runs under bf16 autocast: the weights prepacked as
    constants, every linear layer a oneDNN call (GELU fused into the MLP's first), and the same
    logits as eager within bf16's precision."""
    cfg = compose_config(["backbone=pvt_tiny", "backbone.img_size=64"])
    torch.manual_seed(0)
    model = build_model(cfg.backbone, cfg.head, num_classes=8).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(images)
        TaskModule(model).compile_model(options=FROZEN_WEIGHTS)
        with frozen_weight_compilation():
            model(images)  # traced and compiled here
            with profile() as prof:
                compiled = model(images)
    calls = {event.key: event.count for event in prof.key_averages()}
    assert "aten::addmm" not in calls and "aten::linear" not in calls
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert calls.get("mkldnn::_linear_pointwise") == linears
    torch.testing.assert_close(compiled.float(), eager.float(), atol=0.05, rtol=0.05)

"""RetinaNet's device-side assignment and loss give torchvision's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import BoxCoder, Matcher

from pvtlab.models.heads.retinanet import build_retinanet, check_target_boxes
from pvtlab.models.heads.retinanet_loss import encode_boxes, match_anchors
from tests.models.test_detection_heads import K, TinyPyramid


def _iou_with_ties(boxes: int, anchors: int, seed: int) -> Tensor:
    """IoU-like values on a coarse grid, so that anchors tie for a box's best overlap."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 8, (boxes, anchors), generator=generator).float() / 10


@pytest.mark.parametrize("allow_low_quality", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_anchor_matches_equal_torchvision_matcher(allow_low_quality: bool, seed: int) -> None:
    iou = _iou_with_ties(4, 300, seed)
    iou[2] = 0.0
    iou[2, 10:13] = 0.05  # a box three anchors overlap a little: the low-quality rule keeps them
    expected = Matcher(0.5, 0.4, allow_low_quality_matches=allow_low_quality)(iou)
    matches = match_anchors(iou, 0.5, 0.4, allow_low_quality)
    assert torch.equal(matches, expected)
    assert {-2, -1} <= set(matches.tolist())  # both kinds of unmatched anchors occur


def test_box_deltas_equal_torchvision_box_coder() -> None:
    torch.manual_seed(0)
    anchors = torch.rand(50, 2) * 50
    anchors = torch.cat([anchors, anchors + 5 + torch.rand(50, 2) * 30], dim=1)
    boxes = torch.cat([anchors[:, :2] + torch.randn(50, 2), anchors[:, 2:] + torch.rand(50, 2)], 1)
    weights = (10.0, 10.0, 5.0, 5.0)
    expected = BoxCoder(weights).encode_single(boxes, anchors)
    torch.testing.assert_close(encode_boxes(boxes, anchors, weights), expected)


def _batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    torch.manual_seed(0)
    images = [torch.randn(3, 96, 128), torch.randn(3, 96, 128), torch.randn(3, 96, 128)]
    targets = [
        {"boxes": torch.tensor([[5.0, 6, 40, 50], [50, 10, 120, 90]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[30.0, 20, 34, 26]]), "labels": torch.tensor([1])},  # low quality
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no objects
    ]  # fmt: skip
    return images, targets


def test_losses_and_gradients_equal_torchvision() -> None:
    model = build_retinanet(TinyPyramid(), num_classes=K, fpn_channels=16).train()
    images, targets = _batch()
    batch, targets = model.transform(images, targets)
    features = list(model.backbone(batch.tensors).values())
    outputs = model.head(features)
    anchors = model.anchor_generator(batch, features)

    ours = model.compute_loss(targets, outputs, anchors)
    theirs = RetinaNet.compute_loss(model, targets, outputs, anchors)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name])
        assert ours[name] > 0
    gradient = torch.autograd.grad(sum(ours.values()), list(outputs.values()), retain_graph=True)
    expected = torch.autograd.grad(sum(theirs.values()), list(outputs.values()))
    for got, want in zip(gradient, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_a_box_without_area_is_named_on_the_cpu() -> None:
    model = build_retinanet(TinyPyramid(), num_classes=K, fpn_channels=16).train()
    images, targets = _batch()
    targets[1]["boxes"] = torch.tensor([[30.0, 20, 30, 26]])
    with pytest.raises(ValueError, match=r"target 1: box \[30.0, 20.0, 30.0, 26.0\] has no area"):
        model(images, targets)
    with pytest.raises(ValueError, match=r"target 0: boxes must be \(N, 4\)"):
        check_target_boxes(torch.zeros(2, 5), 0)


def test_boxes_on_an_accelerator_are_not_read() -> None:
    """Off the CPU only the shape is checked: a read would make the host wait every step. Meta
    tensors have no values, so any read of them raises."""
    check_target_boxes(torch.tensor([[3.0, 3, 3, 3]], device="meta"), 0)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        check_target_boxes(torch.zeros(4, device="meta"), 0)

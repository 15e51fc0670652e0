"""RetinaNet and Mask R-CNN heads: the detection-head contract on small pyramid backbones."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.ops import MultiScaleRoIAlign

from pvtlab.models.heads.mask_rcnn import build_mask_rcnn
from pvtlab.models.heads.retinanet import build_retinanet

K = 3  # object classes


class _FeatureInfo:
    def __init__(self, channels: list[int]) -> None:
        self._channels = channels

    def channels(self) -> list[int]:
        return self._channels

    def reduction(self) -> list[int]:
        return [4, 8, 16, 32]


class TinyPyramid(nn.Module):
    """Four maps at strides 4, 8, 16, 32 with `feature_info`, like a timm features_only model."""

    def __init__(self, channels: tuple[int, ...] = (8, 16, 24, 32)) -> None:
        super().__init__()
        widths = (3, *channels)
        self.stages = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 4 if i == 0 else 2, 4 if i == 0 else 2)
            for i in range(4)
        )
        self.feature_info = _FeatureInfo(list(channels))

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = []
        for stage in self.stages:
            x = torch.relu(stage(x))
            maps.append(x)
        return maps


SIZES = [(70, 90), (64, 50)]  # (h, w): not multiples of 32, different per image


def _images() -> list[Tensor]:
    torch.manual_seed(0)
    return [torch.randn(3, h, w) for h, w in SIZES]


def _targets(masks: bool = False) -> list[dict[str, Tensor]]:
    targets = [
        {
            "boxes": torch.tensor([[5.0, 6, 40, 50], [50, 10, 88, 30]]),
            "labels": torch.tensor([0, K - 1]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    if masks:
        for target, (h, w) in zip(targets, SIZES, strict=True):
            m = torch.zeros(len(target["boxes"]), h, w, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(target["boxes"].int().tolist()):
                m[k, y0:y1, x0:x1] = 1
            target["masks"] = m
    return targets


def _check_detections(outputs: list[dict[str, Tensor]], limit: int, masks: bool = False) -> None:
    assert len(outputs) == len(SIZES)
    for out, (h, w) in zip(outputs, SIZES, strict=True):
        n = len(out["boxes"])
        assert 0 < n <= limit
        assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,)
        # In the pixels of each given image, not of the padded batch.
        assert out["boxes"][:, 0::2].min() >= 0 and out["boxes"][:, 0::2].max() <= w
        assert out["boxes"][:, 1::2].min() >= 0 and out["boxes"][:, 1::2].max() <= h
        assert out["labels"].dtype == torch.int64
        assert out["labels"].min() >= 0 and out["labels"].max() < K
        if masks:
            assert out["masks"].shape == (n, 1, h, w)


def test_retinanet_levels_p3_to_p7_with_extra_levels_from_stage4() -> None:
    # Stage 4 as wide as the FPN: torchvision would switch to P5; the release uses C5 ("on input").
    model = build_retinanet(TinyPyramid((8, 16, 24, 64)), K, fpn_channels=64)
    features = model.backbone(torch.zeros(1, 3, 128, 128))
    assert [tuple(f.shape[-2:]) for f in features.values()] == [
        (16, 16),
        (8, 8),
        (4, 4),
        (2, 2),
        (1, 1),
    ]
    assert model.backbone.fpn.extra_blocks.use_P5 is False
    assert model.backbone.fpn.extra_blocks.p6.in_channels == 64
    assert model.anchor_generator.num_anchors_per_location() == [9] * 5
    assert model.head.classification_head.num_classes == K  # no background class
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img) == (0.05, 0.5, 100)


def test_retinanet_train_losses_and_eval_detections() -> None:
    model = build_retinanet(
        TinyPyramid(), K, fpn_channels=32, score_thresh=0.0, detections_per_img=20
    )
    model.train()
    losses = model(_images(), _targets())
    assert set(losses) == {"classification", "bbox_regression"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        _check_detections(model(_images()), limit=20)


def test_mask_rcnn_levels_p2_to_p6_and_released_settings() -> None:
    model = build_mask_rcnn(TinyPyramid(), K, fpn_channels=32)
    features = model.backbone(torch.zeros(1, 3, 128, 128))
    assert list(features) == ["0", "1", "2", "3", "pool"]
    assert [f.shape[-1] for f in features.values()] == [32, 16, 8, 4, 2]
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    heads = model.roi_heads
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.05, 0.5, 100)
    assert heads.box_predictor.cls_score.out_features == K + 1  # + background
    assert heads.mask_roi_pool.output_size == (14, 14)  # deconvolved to 28 x 28 masks
    assert heads.box_roi_pool.output_size == (7, 7)
    for pool in (heads.box_roi_pool, heads.mask_roi_pool):  # P2-P5, adaptive sampling (mmdet)
        assert isinstance(pool, MultiScaleRoIAlign)
        assert (pool.featmap_names, pool.sampling_ratio) == (["0", "1", "2", "3"], 0)


def test_mask_rcnn_train_losses_and_eval_detections_with_masks() -> None:
    model = build_mask_rcnn(
        TinyPyramid(),
        K,
        fpn_channels=32,
        box_head_dim=64,
        mask_head_channels=(16, 16),
        box_score_thresh=0.0,
        box_detections_per_img=20,
    )
    model.train()
    losses = model(_images(), _targets(masks=True))
    assert {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    } == set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        outputs = model(_images())
    _check_detections(outputs, limit=20, masks=True)
    with torch.no_grad():
        masks = model(_images())[0]["masks"]
    assert masks.min() >= 0 and masks.max() <= 1  # probabilities


def test_mask_rcnn_shifts_labels_past_background_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_forward(self, images, targets=None):
        seen["labels"] = [t["labels"].tolist() for t in targets] if targets else None
        if self.training:
            return {"loss": torch.zeros(())}
        return [
            {"boxes": torch.zeros(2, 4), "scores": torch.ones(2), "labels": torch.tensor([1, K])}
        ]

    monkeypatch.setattr(MaskRCNN, "forward", fake_forward)
    model = build_mask_rcnn(TinyPyramid(), K, fpn_channels=32)
    model.train()
    model(_images(), _targets(masks=True))
    assert seen["labels"] == [[1, K], []]
    model.eval()
    assert model(_images())[0]["labels"].tolist() == [0, K - 1]


def test_mask_rcnn_without_target_masks_says_how_to_get_them() -> None:
    model = build_mask_rcnn(TinyPyramid(), K, fpn_channels=32)
    model.train()
    with pytest.raises(ValueError, match=r"data\.with_masks=true"):
        model(_images(), _targets(masks=False))


def test_retinanet_learns_one_image() -> None:
    """A few steps on one image lower the loss: the losses reach the weights."""
    torch.manual_seed(0)
    model = build_retinanet(TinyPyramid(), K, fpn_channels=32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = _images()[:1], _targets()[:1]
    first = None
    for _ in range(15):
        loss = sum(model(images, targets).values())
        first = float(loss) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.7 * first

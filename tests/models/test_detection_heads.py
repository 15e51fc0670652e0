"""RetinaNet and Mask R-CNN heads: the detection-head contract on small pyramid backbones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.ops import MultiScaleRoIAlign, roi_align

from pvtlab.models.heads.mask_rcnn import LevelRoIAlign, box_branch_losses, build_mask_rcnn
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
        assert pool.aligned and pool.strides == (4, 8, 16, 32)  # mmcv's RoIAlign default


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

    def fake_heads(self, features, proposals, image_shapes, targets=None):
        detection = {"boxes": torch.zeros(2, 4), "scores": torch.ones(2)}
        return [{**detection, "labels": torch.tensor([1, K])} for _ in proposals], {}

    monkeypatch.setattr(MaskRCNN, "forward", fake_forward)
    monkeypatch.setattr(RoIHeads, "forward", fake_heads)
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


# ------------------------------------------------ the release's (mmdetection 2.13's) behaviour


def test_retinanet_p7_is_a_convolution_of_p6_without_relu() -> None:
    torch.manual_seed(0)
    images = torch.randn(1, 3, 128, 128)
    for relu in (False, True):
        model = build_retinanet(TinyPyramid(), K, fpn_channels=16, relu_before_extra_convs=relu)
        extra = model.backbone.fpn.extra_blocks
        c5 = model.backbone.body(images)[3]
        p6 = extra.p6(c5)
        assert (p6 < 0).any()  # so that a ReLU would change P7
        features = model.backbone(images)
        assert torch.allclose(features["p6"], p6)
        expected = extra.p7(F.relu(p6) if relu else p6)
        assert torch.allclose(features["p7"], expected)
        other = extra.p7(p6 if relu else F.relu(p6))
        assert not torch.allclose(features["p7"], other)


@pytest.mark.parametrize("builder", [build_retinanet, build_mask_rcnn])
@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_uniform"])
def test_fpn_convolutions_start_xavier_uniform(builder, init: str) -> None:
    """mmdetection's FPN starts xavier-uniform: a 1x1 lateral conv from C to 64 channels draws
    from +-sqrt(6 / (C + 64)); torchvision's kaiming-uniform (a=1) from +-sqrt(3 / C)."""
    torch.manual_seed(0)
    model = builder(TinyPyramid((8, 16, 24, 32)), K, fpn_channels=64, fpn_init=init)
    lateral = model.backbone.fpn.inner_blocks[0][0]
    fan_in = lateral.in_channels
    limit = (6 / (fan_in + 64)) ** 0.5 if init == "xavier_uniform" else (3 / fan_in) ** 0.5
    assert lateral.weight.abs().max() <= limit
    assert lateral.weight.abs().max() > 0.9 * limit
    assert torch.count_nonzero(lateral.bias) == 0
    for module in model.backbone.fpn.modules():  # every FPN conv, extra levels included
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            bound = (
                (6 / (fan_in + fan_out)) ** 0.5 if init == "xavier_uniform" else (3 / fan_in) ** 0.5
            )
            assert module.weight.abs().max() <= bound


def test_retinanet_anchor_sizes_are_not_rounded() -> None:
    model = build_retinanet(TinyPyramid(), K, fpn_channels=16)
    base = model.anchor_generator.cell_anchors[0]  # level P3: ratios (0.5, 1, 2) x 3 scales
    widths = base[:, 2] - base[:, 0]
    heights = base[:, 3] - base[:, 1]
    square = slice(3, 6)  # ratio 1
    expected = torch.tensor([32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)])
    assert torch.allclose(widths[square], expected) and torch.allclose(heights[square], expected)
    assert widths[0] == pytest.approx(32 * 2**0.5, rel=1e-6)  # ratio 0.5: 45.25 wide
    rounded = build_retinanet(TinyPyramid(), K, fpn_channels=16, round_anchors=True)
    assert rounded.anchor_generator.cell_anchors[0][0, 2] == 23  # torchvision: 22.63 rounded


def test_retinanet_test_time_top_k_is_over_anchors() -> None:
    """mmdetection 2.13's nms_pre keeps the k anchors whose best class scores highest, then every
    class of those above the threshold; torchvision keeps the top k (anchor, class) pairs."""
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]])
    probabilities = torch.tensor(
        [[0.9, 0.8, 0.7], [0.6, 0.01, 0.01], [0.3, 0.01, 0.01], [0.01, 0.01, 0.01]]
    )
    logits = torch.logit(probabilities)[None]
    outputs = {"cls_logits": [logits], "bbox_regression": [torch.zeros(1, 4, 4)]}
    found = {}
    for selection in ("anchor", "pair"):
        model = build_retinanet(
            TinyPyramid(), K, fpn_channels=16, topk_candidates=2, candidate_selection=selection
        )
        (detections,) = model.postprocess_detections(outputs, [[anchors]], [(100, 100)])
        found[selection] = sorted(
            zip(detections["boxes"][:, 0].tolist(), detections["labels"].tolist(), strict=True)
        )
    assert found["anchor"] == [(0.0, 0), (0.0, 1), (0.0, 2), (20.0, 0)]
    assert found["pair"] == [(0.0, 0), (0.0, 1)]


def test_roi_align_samples_pixel_centres_on_the_level_of_each_box() -> None:
    torch.manual_seed(0)
    features = {"0": torch.randn(1, 4, 32, 32), "1": torch.randn(1, 4, 16, 16)}
    small = torch.tensor([[8.0, 8, 40, 48]])  # sqrt(area) < 112: level of stride 4
    large = torch.tensor([[0.0, 0, 120, 126]])  # 112 <= sqrt(area) < 224: stride 8
    pool = LevelRoIAlign(["0", "1"], (4, 8), 7, sampling_ratio=0, aligned=True)
    out = pool(features, [torch.cat([small, large])], [(128, 128)])
    rois = torch.cat([torch.zeros(2, 1), torch.cat([small, large])], dim=1)
    expected_small = roi_align(features["0"], rois[:1], 7, 1 / 4, 0, aligned=True)
    expected_large = roi_align(features["1"], rois[1:], 7, 1 / 8, 0, aligned=True)
    assert torch.allclose(out[:1], expected_small) and torch.allclose(out[1:], expected_large)
    unaligned = roi_align(features["0"], rois[:1], 7, 1 / 4, 0, aligned=False)
    assert not torch.allclose(out[:1], unaligned)
    torchvision_pool = MultiScaleRoIAlign(["0", "1"], 7, 0)
    legacy = LevelRoIAlign(["0", "1"], (4, 8), 7, sampling_ratio=0, aligned=False)
    boxes = [torch.cat([small, large])]
    assert torch.allclose(
        legacy(features, boxes, [(128, 128)]), torchvision_pool(features, boxes, [(128, 128)])
    )


def test_rcnn_box_branch_loss_is_l1() -> None:
    torch.manual_seed(0)
    labels = [torch.tensor([0, 2, 1]), torch.tensor([3, 0])]
    targets = [torch.randn(3, 4), torch.randn(2, 4)]
    logits = torch.randn(5, K + 1)
    deltas = torch.randn(5, (K + 1) * 4)
    losses = box_branch_losses(logits, deltas, labels, targets)
    all_labels, all_targets = torch.cat(labels), torch.cat(targets)
    per_class = deltas.reshape(5, K + 1, 4)
    expected = (
        sum(
            (per_class[i, all_labels[i]] - all_targets[i]).abs().sum()
            for i in range(5)
            if all_labels[i] > 0
        )
        / 5
    )
    assert losses["loss_box_reg"] == pytest.approx(float(expected), rel=1e-6)
    classification, smooth = fastrcnn_loss(logits, deltas, labels, targets)
    assert losses["loss_classifier"] == pytest.approx(float(classification), rel=1e-6)
    assert float(smooth) != pytest.approx(float(expected), rel=1e-3)  # torchvision: smooth-L1


def test_rpn_box_loss_is_l1_over_the_sampled_anchors() -> None:
    model = build_mask_rcnn(TinyPyramid(), K, fpn_channels=16)
    torch.manual_seed(0)
    labels = [torch.tensor([1.0, 0.0, 1.0, -1.0, 0.0])]  # 2 positives, 2 negatives, 1 ignored
    targets = [torch.randn(5, 4)]
    objectness, deltas = torch.randn(5, 1), torch.randn(5, 4)
    _, box_loss = model.rpn.compute_loss(objectness, deltas, labels, targets)
    positive = torch.tensor([0, 2])
    expected = (deltas[positive] - targets[0][positive]).abs().sum() / 4
    assert float(box_loss) == pytest.approx(float(expected), rel=1e-6)
    smooth = build_mask_rcnn(TinyPyramid(), K, fpn_channels=16, box_loss="smooth_l1")
    _, smooth_loss = smooth.rpn.compute_loss(objectness, deltas, labels, targets)
    assert float(smooth_loss) != pytest.approx(float(expected), rel=1e-3)


def test_mask_rcnn_pastes_masks_at_the_size_asked_for() -> None:
    torch.manual_seed(0)
    model = build_mask_rcnn(
        TinyPyramid(),
        K,
        fpn_channels=16,
        box_head_dim=32,
        mask_head_channels=(8,),
        box_score_thresh=0.0,
        box_detections_per_img=5,
    ).eval()
    sizes = [(2 * h, 3 * w) for h, w in SIZES]
    with torch.no_grad():
        at_input = model(_images())
        at_size = model(_images(), mask_sizes=sizes)
    for small, large, (h, w) in zip(at_input, at_size, sizes, strict=True):
        assert torch.equal(small["boxes"], large["boxes"])  # boxes stay in input pixels
        assert large["masks"].shape == (len(large["boxes"]), 1, h, w)

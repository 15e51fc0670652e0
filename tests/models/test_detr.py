"""DETR: Hungarian matcher, set criterion, padding mask, no convolution, the detection-head contract."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from pvtlab.models import create_backbone
from pvtlab.models.heads.detr import DETR, PositionEmbeddingSine, build_detr
from pvtlab.models.heads.detr_criterion import SetCriterion, generalized_iou_loss
from pvtlab.models.heads.detr_matcher import (
    HungarianMatcher,
    hungarian_match,
    hungarian_match_layers,
    match_cost,
)
from tests.models.test_detection_heads import TinyPyramid

K = 3  # object classes; slot K is "no object"
SMALL = {"hidden_dim": 32, "num_heads": 4, "ffn_dim": 64, "num_queries": 10, "dropout": 0.0}


def _target(labels: list[int], boxes: list[list[float]]) -> dict[str, Tensor]:
    """Labels and normalised (cx, cy, w, h) boxes."""
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
    }


def _random_outputs(batch: int, queries: int, layers: int = 1, seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, batch, queries, K + 1, generator=generator)
    centres = torch.rand(layers, batch, queries, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(layers, batch, queries, 2, generator=generator) * 0.3 + 0.05
    boxes = torch.cat([centres, sizes], dim=-1)
    outputs = {"logits": logits[-1], "boxes": boxes[-1]}
    if layers > 1:
        outputs.update(aux_logits=logits[:-1], aux_boxes=boxes[:-1])
    return outputs


TARGETS = [
    _target([0, 2], [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
    _target([1], [[0.5, 0.5, 0.4, 0.3]]),
]


# ------------------------------------------------------------------ matcher


def test_matcher_finds_the_least_cost_assignment() -> None:
    outputs = _random_outputs(batch=1, queries=5, seed=3)
    target = _target([0, 1, 2], [[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.3], [0.5, 0.7, 0.2, 0.1]])
    ((rows, cols),) = hungarian_match(outputs["logits"], outputs["boxes"], [target])
    cost = match_cost(outputs["logits"][0], outputs["boxes"][0], target["labels"], target["boxes"])
    best = min(
        sum(float(cost[q, t]) for t, q in enumerate(queries))
        for queries in itertools.permutations(range(5), 3)
    )
    assert sorted(cols.tolist()) == [0, 1, 2]
    assert float(cost[rows, cols].sum()) == pytest.approx(best, abs=1e-5)


def test_matcher_costs_by_hand() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    target = torch.tensor([[0.6, 0.5, 0.2, 0.2]])  # shifted by half a width: IoU 1/3, GIoU 1/3
    cost = match_cost(logits, box, torch.tensor([1]), target, 1.0, 5.0, 2.0)
    assert float(cost) == pytest.approx(-0.25 + 5 * 0.1 - 2 / 3, abs=1e-5)


def test_layers_matched_together_as_each_alone() -> None:
    layers = 4
    outputs = _random_outputs(batch=2, queries=6, layers=layers, seed=5)
    logits = torch.cat([outputs["aux_logits"], outputs["logits"][None]])
    boxes = torch.cat([outputs["aux_boxes"], outputs["boxes"][None]])
    together = hungarian_match_layers(logits, boxes, TARGETS)
    alone = [hungarian_match(logits[i], boxes[i], TARGETS) for i in range(layers)]

    def pairs(matches: list) -> list:
        return [(q.tolist(), t.tolist()) for q, t in matches]

    assert [pairs(m) for m in together] == [pairs(m) for m in alone]
    assert len({str(pairs(m)) for m in alone}) > 1  # the layers' own predictions decide


def test_perfect_prediction_is_matched_and_costs_zero_box_loss() -> None:
    queries = 6
    outputs = _random_outputs(batch=2, queries=queries)
    # Queries 4 and 1 of image 0 and query 2 of image 1 predict the objects exactly.
    placement = [[4, 1], [2]]
    for i, (target, where) in enumerate(zip(TARGETS, placement, strict=True)):
        for box, label, q in zip(target["boxes"], target["labels"], where, strict=True):
            outputs["boxes"][i, q] = box
            outputs["logits"][i, q] = -10.0
            outputs["logits"][i, q, label] = 10.0
    matches = HungarianMatcher()(outputs["logits"], outputs["boxes"], TARGETS)
    assert [dict(zip(q.tolist(), t.tolist(), strict=True)) for q, t in matches] == [
        {4: 0, 1: 1},
        {2: 0},
    ]
    losses = SetCriterion(K)(outputs, TARGETS)
    assert float(losses["loss_bbox"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["loss_giou"]) == pytest.approx(0.0, abs=1e-5)  # GIoU eps


def test_permuting_the_queries_gives_the_same_loss() -> None:
    outputs = _random_outputs(batch=2, queries=7, layers=3)
    permutation = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    permuted = {k: v[..., permutation, :] for k, v in outputs.items()}
    criterion = SetCriterion(K)
    before, after = criterion(outputs, TARGETS), criterion(permuted, TARGETS)
    assert before.keys() == after.keys()
    for name in before:
        assert float(after[name]) == pytest.approx(float(before[name]), rel=1e-5), name
    (q0, t0), _ = hungarian_match(outputs["logits"], outputs["boxes"], TARGETS)
    (q1, t1), _ = hungarian_match(permuted["logits"], permuted["boxes"], TARGETS)
    assert dict(zip(permutation[q1].tolist(), t1.tolist(), strict=True)) == dict(
        zip(q0.tolist(), t0.tolist(), strict=True)
    )


def test_an_image_without_targets_trains_every_query_towards_no_object() -> None:
    outputs = _random_outputs(batch=2, queries=5)
    targets = [TARGETS[1], _target([], [])]
    matches = hungarian_match(outputs["logits"], outputs["boxes"], targets)
    assert len(matches[0][0]) == 1 and len(matches[1][0]) == 0
    losses = SetCriterion(K)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    # No target in the whole batch: no box loss, and the class loss asks for "no object" only.
    nothing = [_target([], []), _target([], [])]
    assert [len(q) for q, _ in hungarian_match(outputs["logits"], outputs["boxes"], nothing)] == [
        0,
        0,
    ]
    empty = SetCriterion(K)(outputs, nothing)
    assert float(empty["loss_bbox"]) == 0.0 and float(empty["loss_giou"]) == 0.0
    expected = -outputs["logits"].log_softmax(-1)[..., K].mean()
    assert float(empty["loss_ce"]) == pytest.approx(float(expected), rel=1e-5)


# ------------------------------------------------------------------ criterion


def test_criterion_weights_and_normalises_by_the_number_of_boxes() -> None:
    outputs = _random_outputs(batch=2, queries=4)
    losses = SetCriterion(K, eos_coef=0.1)(outputs, TARGETS)
    matches = hungarian_match(outputs["logits"], outputs["boxes"], TARGETS)
    l1, giou, ce_sum, weight_sum = 0.0, 0.0, 0.0, 0.0
    from torchvision.ops import generalized_box_iou

    for i, (q, t) in enumerate(matches):
        pred, gt = outputs["boxes"][i, q], TARGETS[i]["boxes"][t]
        l1 += float((pred - gt).abs().sum())
        xyxy = [box_convert(b, "cxcywh", "xyxy") for b in (pred, gt)]
        giou += float((1 - generalized_box_iou(*xyxy).diagonal()).sum())
        classes = torch.full((4,), K)
        classes[q] = TARGETS[i]["labels"][t]
        log_prob = outputs["logits"][i].log_softmax(-1)
        weights = torch.where(classes == K, 0.1, 1.0)
        ce_sum += float((-log_prob[torch.arange(4), classes] * weights).sum())
        weight_sum += float(weights.sum())
    boxes = 3  # in the whole batch
    assert float(losses["loss_bbox"]) == pytest.approx(5 * l1 / boxes, rel=1e-5)
    assert float(losses["loss_giou"]) == pytest.approx(2 * giou / boxes, rel=1e-5)
    assert float(losses["loss_ce"]) == pytest.approx(ce_sum / weight_sum, rel=1e-5)


def test_criterion_scores_every_auxiliary_layer_with_its_own_matching() -> None:
    outputs = _random_outputs(batch=2, queries=5, layers=4)
    losses = SetCriterion(K)(outputs, TARGETS)
    names = ("loss_ce", "loss_bbox", "loss_giou")
    assert set(losses) == {*names, *(f"{n}_{i}" for n in names for i in range(3))}
    single = SetCriterion(K)
    for i in range(3):
        layer = {"logits": outputs["aux_logits"][i], "boxes": outputs["aux_boxes"][i]}
        alone = single(layer, TARGETS)
        for name in names:
            assert float(losses[f"{name}_{i}"]) == pytest.approx(float(alone[name]), rel=1e-6)
    # An auxiliary layer predicting what the last one does scores the same.
    same = dict(outputs, aux_logits=outputs["logits"][None], aux_boxes=outputs["boxes"][None])
    copied = single(same, TARGETS)
    for name in names:
        assert float(copied[f"{name}_0"]) == pytest.approx(float(copied[name]))


def test_generalized_iou_loss_equals_torchvision_with_its_gradient() -> None:
    from torchvision.ops import generalized_box_iou_loss

    torch.manual_seed(0)
    corners = torch.rand(64, 2) * 10
    boxes = torch.cat([corners, corners + torch.rand(64, 2) * 5 + 0.1], dim=1)
    targets = boxes[torch.randperm(64)]  # overlapping, apart, and ...
    targets[:4] = boxes[:4]  # the same box
    targets[4:8] = boxes[4:8] + torch.tensor([1.0, 1.0, -1.0, -1.0]) * 0.05  # inside
    targets[8:12] = boxes[8:12] + (boxes[8:12, 2] - boxes[8:12, 0])[:, None] * torch.tensor(
        [1.0, 0.0, 1.0, 0.0]
    )  # touching along an edge
    assert float(generalized_box_iou_loss(boxes, targets).min()) < 0.5  # some overlap
    ours = boxes.clone().requires_grad_()
    theirs = boxes.clone().requires_grad_()
    loss = generalized_iou_loss(ours, targets)
    expected = generalized_box_iou_loss(theirs, targets)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_matcher_rejects_negative_costs() -> None:
    with pytest.raises(ValueError, match="cost"):
        HungarianMatcher(cost_class=-1.0)


# ------------------------------------------------------------------ the detector


def _detr(**kwargs) -> DETR:
    torch.manual_seed(0)
    return build_detr(TinyPyramid(), K, **{**SMALL, **kwargs})


def _pixel_targets() -> list[dict[str, Tensor]]:
    return [
        {
            "boxes": torch.tensor([[5.0, 6, 40, 50], [50, 10, 88, 30]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


def test_training_returns_weighted_losses_of_every_decoder_layer() -> None:
    model = _detr(num_decoder_layers=3)
    model.train()
    images = [torch.randn(3, 70, 90), torch.randn(3, 64, 50)]
    losses = model(images, _pixel_targets())
    assert len(losses) == 3 * 3
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.query_embed.weight.grad.abs().sum() > 0
    assert model.input_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.backbone.parameters())
    with pytest.raises(ValueError, match="targets"):
        model(images)


def test_targets_are_normalised_to_each_image() -> None:
    seen = {}
    model = _detr()

    def spy(outputs, targets):
        seen["targets"] = targets
        return {"loss": outputs["logits"].sum() * 0}

    model.criterion.forward = spy
    model.train()
    model([torch.randn(3, 70, 90), torch.randn(3, 64, 50)], _pixel_targets())
    boxes = seen["targets"][0]["boxes"]
    # (5, 6, 40, 50) in a 90 x 70 image: centre (22.5, 28), size (35, 44).
    assert boxes[0].tolist() == pytest.approx([22.5 / 90, 28 / 70, 35 / 90, 44 / 70])


def test_evaluation_returns_every_query_in_input_pixels_without_nms() -> None:
    model = _detr()
    model.eval()
    sizes = [(70, 90), (64, 50)]
    with torch.no_grad():
        outputs = model([torch.randn(3, h, w) for h, w in sizes])
    assert len(outputs) == 2
    for out, (h, w) in zip(outputs, sizes, strict=True):
        assert set(out) == {"boxes", "scores", "labels"}
        assert out["boxes"].shape == (SMALL["num_queries"], 4)
        assert out["scores"].shape == out["labels"].shape == (SMALL["num_queries"],)
        assert out["boxes"][:, 0::2].min() >= 0 and out["boxes"][:, 0::2].max() <= w
        assert out["boxes"][:, 1::2].min() >= 0 and out["boxes"][:, 1::2].max() <= h
        assert (out["boxes"][:, 2:] >= out["boxes"][:, :2]).all()
        assert out["labels"].dtype == torch.int64
        assert out["labels"].min() >= 0 and out["labels"].max() < K  # never "no object"
        assert out["scores"].min() >= 0 and out["scores"].max() <= 1


def test_postprocess_scales_boxes_to_the_image_given() -> None:
    model = _detr()
    model.eval()
    logits = torch.full((1, SMALL["num_queries"], K + 1), -5.0)
    logits[..., 1] = 5.0
    boxes = torch.tensor([0.5, 0.25, 0.2, 0.1]).expand(1, SMALL["num_queries"], 4)
    model.predict = lambda batch, padding: {"logits": logits, "boxes": boxes}
    (out,) = model([torch.zeros(3, 40, 100)])
    assert out["boxes"][0].tolist() == pytest.approx([40.0, 8.0, 60.0, 12.0])
    assert out["labels"].unique().tolist() == [1]


def test_position_encoding_depends_on_the_image_not_its_padding() -> None:
    encode = PositionEmbeddingSine(32)
    small = torch.ones(1, 4, 6, dtype=torch.bool)
    small[:, :3, :4] = False
    big = torch.ones(1, 7, 9, dtype=torch.bool)
    big[:, :3, :4] = False
    a = encode(small).view(4, 6, 32)[:3, :4]
    b = encode(big).view(7, 9, 32)[:3, :4]
    assert torch.allclose(a, b)
    full = encode(torch.zeros(1, 3, 4, dtype=torch.bool)).view(3, 4, 32)
    assert torch.allclose(a, full)
    assert not torch.allclose(full[0, 0], full[2, 3])


def test_the_same_image_gives_the_same_predictions_however_its_batch_pads_it() -> None:
    # The test backbone's stride-32 features of a patch depend on that patch only, so any change
    # in the predictions would come from padding reaching the transformer.
    model = _detr()
    model.eval()
    torch.manual_seed(1)
    image = torch.randn(3, 70, 90)
    with torch.no_grad():
        alone = model([image])[0]
        tall = model([image, torch.randn(3, 190, 60)])[0]  # padded to 192 x 96 instead of 96 x 96
        wide = model([torch.randn(3, 50, 250), image])[1]  # padded to 96 x 256
    for other in (tall, wide):
        assert torch.allclose(other["boxes"], alone["boxes"], atol=1e-4)
        assert torch.allclose(other["scores"], alone["scores"], atol=1e-5)
        assert torch.equal(other["labels"], alone["labels"])


def test_without_the_mask_padding_would_change_the_predictions() -> None:
    """The previous test can fail: with the mask dropped, padding moves the predictions."""
    model = _detr()
    model.eval()
    image = torch.randn(3, 70, 90)
    unmasked = model.predict

    def predict(batch: Tensor, padding: Tensor) -> dict[str, Tensor]:
        return unmasked(batch, torch.zeros_like(padding))

    model.predict = predict
    with torch.no_grad():
        alone = model([image])[0]
        tall = model([image, torch.randn(3, 190, 60)])[0]
    assert not torch.allclose(tall["boxes"], alone["boxes"], atol=1e-4)


def _convolutions(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


def test_the_head_has_no_convolution() -> None:
    model = _detr()
    head = [name for name in _convolutions(model) if not name.startswith("backbone.")]
    assert head == []
    assert _convolutions(model.backbone)  # the walk does see convolutions


def test_pvt_detr_convolutions_are_pvt_patch_projections_only() -> None:
    """PVT's patch embeddings and spatial reductions are linear maps of non-overlapping patches
    (kernel = stride); nothing else in PVT + DETR convolves."""
    model = build_detr(create_backbone("pvt_tiny", features_only=True), K, **SMALL)
    modules = dict(model.named_modules())
    convolutions = _convolutions(model)
    assert len(convolutions) == 4 + 6  # 4 patch embeddings, 2 reductions in each of stages 1-3
    for name in convolutions:
        assert name.startswith("backbone."), name
        assert modules[name].kernel_size == modules[name].stride, name
        assert modules[name].padding == (0, 0), name


def test_released_settings_by_default() -> None:
    model = build_detr(TinyPyramid(), K)
    transformer = model.transformer
    assert (len(transformer.encoder), len(transformer.decoder)) == (6, 6)
    assert model.query_embed.weight.shape == (100, 256)
    assert model.input_proj.in_features == 32  # the stage-4 map's channels
    assert transformer.encoder[0].self_attn.num_heads == 8
    assert transformer.encoder[0].ffn[0].out_features == 2048
    assert transformer.encoder[0].self_attn.dropout == 0.1
    assert model.class_embed.out_features == K + 1
    criterion = model.criterion
    assert (criterion.matcher.cost_class, criterion.matcher.cost_bbox) == (1.0, 5.0)
    assert criterion.matcher.cost_giou == 2.0
    assert criterion.weights == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert criterion.class_weight.tolist() == [1.0] * K + [pytest.approx(0.1)]
    # Post-norm: each sub-layer's output goes through its norm after the residual sum.
    layer = transformer.encoder[0]
    x, pos = torch.randn(1, 5, 256), torch.randn(1, 5, 256)
    out = layer.eval()(x, pos, torch.zeros(1, 5, dtype=torch.bool))
    assert out.mean(-1).abs().max() < 1e-5  # a LayerNorm (default affine) is the last step

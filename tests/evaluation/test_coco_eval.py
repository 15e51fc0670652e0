"""COCO scoring on hand-built cases whose AP is known in advance."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from pvtlab.evaluation.coco import (
    CocoEvaluator,
    coco_evaluate,
    rescale_prediction,
    to_coco_results,
    usable_segmentation,
)

# Two images of 100 x 80 (w x h). Image 1 holds two category-3 boxes, image 2 one category-7 box.
# Category ids are not contiguous on purpose: labels 0, 1 map to ids 3, 7.
CATEGORY_IDS = [3, 7]
GT_BOXES = {1: [(3, [10, 10, 20, 20]), (3, [50, 40, 30, 30])], 2: [(7, [5, 5, 60, 50])]}
W, H = 100, 80


def _rle(box: list[float]) -> dict:
    mask = np.zeros((H, W), np.uint8)
    x, y, w, h = (int(v) for v in box)
    mask[y : y + h, x : x + w] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _gt() -> COCO:
    annotations = [
        {
            "id": len(GT_BOXES) * 10 + i,
            "image_id": image_id,
            "category_id": cat,
            "bbox": box,
            "area": float(box[2] * box[3]),
            "iscrowd": 0,
            "segmentation": _rle(box),
        }
        for image_id, items in GT_BOXES.items()
        for i, (cat, box) in enumerate(items)
    ]
    for i, ann in enumerate(annotations):
        ann["id"] = i + 1
    dataset = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": W, "height": H} for i in GT_BOXES],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS],
    }
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _xyxy(box: list[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def _prediction(items: list[tuple[int, list[float]]], scale: float = 1.0, masks: bool = False):
    """Network output at an input `scale` times the original size, labels 0-based."""
    boxes = torch.tensor([_xyxy(b) for _, b in items], dtype=torch.float32).reshape(-1, 4)
    out = {
        "boxes": boxes * scale,
        "scores": torch.linspace(0.9, 0.5, len(items)),
        "labels": torch.tensor([CATEGORY_IDS.index(c) for c, _ in items], dtype=torch.int64),
    }
    if masks:
        m = torch.zeros(len(items), 1, round(H * scale), round(W * scale))
        for k, (_, (x, y, w, h)) in enumerate(items):
            m[
                k,
                0,
                round(y * scale) : round((y + h) * scale),
                round(x * scale) : round((x + w) * scale),
            ] = 1.0
        out["masks"] = m
    return out


def _target(image_id: int, scale: float = 1.0) -> dict:
    return {
        "image_id": image_id,
        "orig_size": torch.tensor([H, W]),
        "size": torch.tensor([round(H * scale), round(W * scale)]),
    }


def test_perfect_predictions_score_one_in_boxes_and_masks(tmp_path: Path) -> None:
    evaluator = CocoEvaluator(_gt(), CATEGORY_IDS)
    # The network saw the images at twice their size: predictions come back rescaled.
    predictions = [_prediction(GT_BOXES[i], scale=2.0, masks=True) for i in (1, 2)]
    evaluator.update(predictions, [_target(1, 2.0), _target(2, 2.0)])
    metrics, table = evaluator.compute(tmp_path / "predictions.json")
    assert metrics["mAP"] == pytest.approx(1.0)
    assert metrics["mAP_50"] == pytest.approx(1.0)
    assert metrics["segm_mAP"] == pytest.approx(1.0)
    assert math.isnan(metrics["mAP_large"])  # no ground truth above 96^2 px
    assert "Average Precision" in table
    written = json.loads((tmp_path / "predictions.json").read_text())
    assert len(written) == 3
    assert {r["category_id"] for r in written} == {3, 7}
    assert written[0]["bbox"] == pytest.approx(GT_BOXES[1][0][1])
    assert isinstance(written[0]["segmentation"]["counts"], str)


def test_one_of_two_missed_gives_the_known_ap() -> None:
    """Category 3 finds one of its two boxes: precision 1 up to recall 0.5, so AP = 51/101
    (COCO's 101 recall points 0, 0.01, ..., 0.5); category 7 is perfect: mAP is the mean."""
    results = to_coco_results(1, _prediction(GT_BOXES[1][:1]), CATEGORY_IDS)
    results += to_coco_results(2, _prediction(GT_BOXES[2]), CATEGORY_IDS)
    metrics, _ = coco_evaluate(_gt(), results, "bbox")
    assert metrics["mAP"] == pytest.approx((51 / 101 + 1.0) / 2)
    assert metrics["mAP_75"] == pytest.approx((51 / 101 + 1.0) / 2)


def test_a_box_off_by_a_known_iou_counts_only_below_it() -> None:
    """Image 2's box shifted to IoU 0.62 with the truth: a hit up to 0.6, a miss from 0.65 on."""
    x, y, w, h = GT_BOXES[2][0][1]
    shift = 14  # IoU = (w - s) / (w + s) = 46 / 74
    moved = [(7, [x + shift, y, w, h])]
    results = to_coco_results(2, _prediction(moved), CATEGORY_IDS)
    metrics, _ = coco_evaluate(_gt(), results, "bbox", image_ids=[2])
    assert metrics["mAP_50"] == pytest.approx(1.0)
    assert metrics["mAP_75"] == pytest.approx(0.0)
    assert metrics["mAP"] == pytest.approx(0.3)  # 3 of the 10 IoU thresholds (0.5, 0.55, 0.6)


def _random_coco(images: int, seed: int, size: tuple[int, int] = (480, 640)) -> tuple[COCO, list]:
    """A COCO-like truth (1-14 boxes an image, 80 categories, every size range, 1% crowd) and
    results at RetinaNet's density: 3 jittered copies of each truth and 60 false positives an
    image, each with the RLE mask of its box."""
    rng = np.random.default_rng(seed)
    height, width = size

    def polygon(x: float, y: float, w: float, h: float) -> list[list[float]]:
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]

    def detection(image_id: int, category: int, box: list[float], score: float) -> dict:
        rle = mask_util.merge(mask_util.frPyObjects(polygon(*box), height, width))
        segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        return {"image_id": image_id, "category_id": category, "bbox": box, "score": score,
                "segmentation": segmentation}  # fmt: skip

    annotations, results = [], []
    for image_id in range(1, images + 1):
        for _ in range(int(rng.integers(1, 15))):
            w, h = rng.uniform(6, 300, 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            category = int(rng.integers(1, 81))
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.uniform() < 0.01),
                 "segmentation": polygon(x, y, w, h)}
            )  # fmt: skip
            for _ in range(3):
                jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
                box = [max(0.0, x + jitter[0]), max(0.0, y + jitter[1])]
                box += [max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
                results.append(detection(image_id, category, box, float(rng.uniform())))
        for _ in range(60):
            w, h = rng.uniform(6, 200, 2)
            box = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
            category = int(rng.integers(1, 81))
            results.append(detection(image_id, category, box, float(rng.uniform(0, 0.5))))
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": height, "width": width} for i in range(1, images + 1)],
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in range(1, 81)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, results


def _pycocotools_evaluate(coco: COCO, results: list, iou_type: str, image_ids: list[int]) -> dict:
    """The six AP figures of pycocotools' own COCOeval, named as `coco_evaluate` names them."""
    from pycocotools.cocoeval import COCOeval

    keep = ("image_id", "category_id", "score", "segmentation" if iou_type == "segm" else "bbox")
    detections = [{k: v for k, v in r.items() if k in keep} for r in results]  # loadRes adds keys
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(detections), iouType=iou_type)
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    prefix = "segm_" if iou_type == "segm" else ""
    names = ("mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large")
    return {f"{prefix}{n}": float(v) for n, v in zip(names, evaluator.stats, strict=False)}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_scores_are_pycocotools_cocoeval(iou_type: str) -> None:
    """faster-coco-eval scores what pycocotools' reference COCOeval scores, to the last digit."""
    coco, results = _random_coco(30, seed=1)
    image_ids = list(range(1, 26))  # a partial pass, as with limit_val_batches
    metrics, table = coco_evaluate(coco, results, iou_type, image_ids)
    reference = _pycocotools_evaluate(coco, results, iou_type, image_ids)
    assert set(metrics) == set(reference)
    for name, expected in reference.items():
        assert 0 < expected < 1, name  # every size range holds truths and misses
        assert metrics[name] == pytest.approx(expected, abs=1e-12), name
    assert table.count("Average Precision") == 6 and "Average Recall" in table


def test_no_predictions_scores_zero_instead_of_failing(tmp_path: Path) -> None:
    evaluator = CocoEvaluator(_gt(), CATEGORY_IDS)
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 1, H, W),
    }
    evaluator.update([empty, empty], [_target(1), _target(2)])
    metrics, _ = evaluator.compute(tmp_path / "empty.json")
    assert metrics["mAP"] == 0.0
    assert metrics["mAP_50"] == 0.0
    assert metrics["segm_mAP"] == 0.0  # a mask head that found nothing still reports mask AP
    assert json.loads((tmp_path / "empty.json").read_text()) == []


def test_only_the_seen_images_are_scored() -> None:
    """A partial pass (limit_val_batches, fast_dev_run) is scored on the images it saw."""
    evaluator = CocoEvaluator(_gt(), CATEGORY_IDS)
    evaluator.update([_prediction(GT_BOXES[2])], [_target(2)])
    metrics, _ = evaluator.compute()
    assert metrics["mAP"] == pytest.approx(1.0)


def test_label_to_category_mapping_and_box_rescaling() -> None:
    pred = _prediction([(7, [10, 20, 30, 40])], scale=0.5)
    scaled = rescale_prediction(pred, input_size=(40, 50), orig_size=(H, W))
    assert scaled["boxes"].tolist() == [[10.0, 20.0, 40.0, 60.0]]
    (result,) = to_coco_results(5, scaled, CATEGORY_IDS)
    assert result["category_id"] == 7
    assert result["image_id"] == 5
    assert result["bbox"] == pytest.approx([10, 20, 30, 40])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        evaluator = CocoEvaluator(_gt(), CATEGORY_IDS)
        # Rank 0 sees image 1, rank 1 sees image 2 and, as a sampler's padding does, image 1 again.
        images = [1] if rank == 0 else [2, 1]
        evaluator.update(
            [_prediction(GT_BOXES[i][:1]) for i in images], [_target(i) for i in images]
        )
        metrics, table = evaluator.compute(Path(out) / f"rank{rank}.json")
        Path(out, f"metrics{rank}.json").write_text(json.dumps({**metrics, "table": table}))
    finally:
        dist.destroy_process_group()


def test_ddp_gathers_once_scores_on_rank0_and_broadcasts(tmp_path: Path) -> None:
    # fork: the workers need no fresh interpreter (spawn would re-import torch in each).
    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork"
    )
    m0 = json.loads((tmp_path / "metrics0.json").read_text())
    m1 = json.loads((tmp_path / "metrics1.json").read_text())
    assert m0["mAP"] == pytest.approx((51 / 101 + 1.0) / 2)
    assert m1["mAP"] == m0["mAP"]
    assert m0["table"] and not m1["table"]
    assert (tmp_path / "rank0.json").is_file() and not (tmp_path / "rank1.json").exists()
    assert len(json.loads((tmp_path / "rank0.json").read_text())) == 2  # duplicates merged


def test_a_bad_polygon_is_named_and_mask_ap_scored_on_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One instance whose polygon has two points (not a shape) among good masks: mask AP is
    computed on the other instances, and the warning names the annotation and its file."""
    coco = _gt()
    bad = coco.dataset["annotations"][1]  # image 1's second box
    bad["segmentation"] = [[50.0, 40.0, 80.0, 70.0]]
    evaluator = CocoEvaluator(coco, CATEGORY_IDS)
    # Masks predicted for the two instances with usable ground truth only; boxes for all three.
    predictions = [_prediction(GT_BOXES[i], masks=True) for i in (1, 2)]
    evaluator.update(predictions, [_target(1), _target(2)])
    with caplog.at_level("WARNING", logger="pvtlab.evaluation.coco"):
        metrics, _ = evaluator.compute()
    assert metrics["mAP"] == pytest.approx(1.0)
    assert "segm_mAP" in metrics and not math.isnan(metrics["segm_mAP"])
    assert metrics["segm_mAP_50"] > 0.5
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"annotation {bad['id']} (1.jpg)" in warning and "without 1 ground-truth" in warning
    # The other two instances are scored; the left-out one is no longer in the mask scoring.
    ground_truth = evaluator.mask_ground_truth()
    assert sorted(ground_truth.anns) == sorted(
        a["id"] for a in coco.dataset["annotations"] if a is not bad
    )


def test_usable_segmentations() -> None:
    assert usable_segmentation([[0, 0, 4, 0, 4, 4]])
    assert usable_segmentation({"counts": "abc", "size": [4, 4]})
    assert not usable_segmentation([[0, 0, 4, 4]])  # two points
    assert not usable_segmentation([[0, 0, 4, 0, 4]])  # odd length
    assert not usable_segmentation([[0, 0, 4, 0, float("nan"), 4]])
    assert not usable_segmentation([])
    assert not usable_segmentation(None)

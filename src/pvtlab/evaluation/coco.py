"""COCO detection and instance-segmentation scores: COCOeval's, computed by faster-coco-eval.

Predictions arrive per image in the pixels of the network's input (the resized image) with
contiguous 0-based labels; they are rescaled to the original image, mapped back to the data
set's own category ids, encoded as the COCO results format, gathered from every process once,
scored on rank 0 and the scores broadcast back, so every process logs the same numbers.

Scoring runs faster-coco-eval's C++ COCOeval on the pycocotools index's ground truth: the same
figures as pycocotools' Python COCOeval (tests/evaluation/test_coco_eval.py compares them),
without rank 0's Python loops over images and categories keeping every GPU waiting.

Mask AP needs a usable mask (polygons of at least three points, or RLE) for every ground-truth
instance. Instances without one are named in one warning (the first few annotation ids and
files, and their count) and left out of the mask scoring; the rest is scored.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import faster_coco_eval
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch import Tensor

log = logging.getLogger(__name__)

# COCOeval.stats[0:6], in order, under the names of CONTRACTS.md; mask scores get `segm_`.
STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large")
IOU_PREFIX = {"bbox": "", "segm": "segm_"}
MASK_THRESHOLD = 0.5


def rescale_prediction(
    prediction: Mapping[str, Tensor], input_size: Sequence[int], orig_size: Sequence[int]
) -> dict[str, Tensor]:
    """Boxes (and mask probabilities) from the network's input pixels to the original image.

    `input_size` and `orig_size` are (height, width). Masks, (N, 1, H, W) or (N, H, W)
    probabilities at the input size, come back as (N, H0, W0) booleans at the original size.
    """
    in_h, in_w = (float(s) for s in input_size)
    out_h, out_w = (int(s) for s in orig_size)
    boxes = prediction["boxes"].detach().float()
    scale = boxes.new_tensor([out_w / in_w, out_h / in_h, out_w / in_w, out_h / in_h])
    out = {
        "boxes": boxes * scale,
        "scores": prediction["scores"].detach().float(),
        "labels": prediction["labels"].detach(),
    }
    masks = prediction.get("masks")
    if masks is not None:
        masks = masks.detach().float()
        masks = masks.unsqueeze(1) if masks.ndim == 3 else masks
        if masks.shape[0] and tuple(masks.shape[-2:]) != (out_h, out_w):
            masks = F.interpolate(masks, size=(out_h, out_w), mode="bilinear", align_corners=False)
        out["masks"] = masks[:, 0] > MASK_THRESHOLD
    return out


def to_coco_results(
    image_id: int, prediction: Mapping[str, Tensor], category_ids: Sequence[int] | np.ndarray
) -> list[dict[str, Any]]:
    """One image's predictions (original pixels, xyxy, 0-based labels) as COCO result dicts.

    `category_ids[label]` is the data set's category id of a contiguous label.
    """
    boxes = prediction["boxes"].cpu().double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = prediction["scores"].cpu().tolist()
    cats = np.asarray(category_ids)[prediction["labels"].cpu().numpy()].tolist()
    results = [
        {"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": float(s)}
        for c, b, s in zip(cats, xywh, scores, strict=True)
    ]
    masks = prediction.get("masks")
    if masks is not None and len(results):
        array = np.asfortranarray(masks.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
        for result, rle in zip(results, mask_util.encode(array), strict=True):
            rle["counts"] = rle["counts"].decode("ascii")
            result["segmentation"] = rle
    return results


def _empty_results(coco_gt: faster_coco_eval.COCO) -> faster_coco_eval.COCO:
    """A results object with no detections: `COCO.loadRes` refuses an empty list."""
    res = faster_coco_eval.COCO()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_evaluate(
    coco_gt: COCO,
    results: Sequence[Mapping[str, Any]],
    iou_type: str = "bbox",
    image_ids: Iterable[int] | None = None,
) -> tuple[dict[str, float], str]:
    """Score COCO-format `results` against `coco_gt` on `image_ids` (default: all images).

    Returns the six AP figures of COCOeval.stats under `STAT_NAMES` (with a `segm_` prefix for
    masks), as fractions, and the printed COCOeval table. An AP that COCOeval cannot define
    (no ground truth in that area range: its -1) is NaN. No results at all is scored as such:
    every AP with ground truth is 0.
    """
    if iou_type not in IOU_PREFIX:
        raise ValueError(f"iou_type={iou_type!r}; choose one of {sorted(IOU_PREFIX)}")
    # COCOeval measures instance size by the result's area: for masks it must be the mask's.
    if iou_type == "segm":
        dets = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    else:
        dets = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        ground_truth = faster_coco_eval.COCO(coco_gt.dataset)  # indexes the same dicts, copies none
        coco_dt = ground_truth.loadRes(dets) if dets else _empty_results(ground_truth)
        evaluator = faster_coco_eval.COCOeval_faster(
            ground_truth, coco_dt, iouType=iou_type, print_function=print
        )
        if image_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in image_ids})
        evaluator.evaluate()
        evaluator.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.summarize()
    prefix = IOU_PREFIX[iou_type]
    metrics = {
        f"{prefix}{name}": float(v) if v >= 0 else math.nan
        for name, v in zip(STAT_NAMES, evaluator.stats[: len(STAT_NAMES)], strict=True)
    }
    return metrics, table.getvalue()


def usable_segmentation(segmentation: Any) -> bool:
    """Whether a COCO `segmentation` describes a mask: RLE (`counts` and `size`), or polygons,
    each an even number (at least six) of finite coordinates."""
    if isinstance(segmentation, dict):
        return "counts" in segmentation and "size" in segmentation
    if not isinstance(segmentation, list) or not segmentation:
        return False
    return all(
        isinstance(polygon, list)
        and len(polygon) >= 6
        and len(polygon) % 2 == 0
        and all(isinstance(v, int | float) and math.isfinite(v) for v in polygon)
        for polygon in segmentation
    )


def instances_without_masks(coco_gt: COCO) -> list[dict[str, Any]]:
    """The ground-truth annotations without a usable mask (`usable_segmentation`)."""
    return [
        ann
        for ann in coco_gt.dataset.get("annotations", [])
        if not usable_segmentation(ann.get("segmentation"))
    ]


def describe_instances(coco_gt: COCO, anns: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    """`annotation <id> (<file>)` of the first `limit` of `anns`, and how many more."""
    images = {image["id"]: image.get("file_name", "?") for image in coco_gt.dataset["images"]}
    named = [f"annotation {a.get('id')} ({images.get(a.get('image_id'), '?')})" for a in anns]
    more = len(named) - limit
    return ", ".join(named[:limit]) + (f" and {more} more" if more > 0 else "")


def without_annotations(coco_gt: COCO, anns: Sequence[Mapping[str, Any]]) -> COCO:
    """A COCO index of `coco_gt`'s data set less `anns` (the records themselves are shared)."""
    left_out = {id(a) for a in anns}
    dataset = dict(coco_gt.dataset)
    dataset["annotations"] = [a for a in coco_gt.dataset["annotations"] if id(a) not in left_out]
    subset = COCO()
    subset.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        subset.createIndex()
    return subset


def has_segmentations(coco_gt: COCO) -> bool:
    """Whether every ground-truth instance carries a usable polygon or RLE."""
    anns = coco_gt.dataset.get("annotations", [])
    return bool(anns) and not instances_without_masks(coco_gt)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CocoEvaluator:
    """Accumulates one evaluation's predictions and scores them with COCOeval.

    Args:
        coco_gt: the ground truth of the split (pycocotools COCO of its annotation json).
        category_ids: the data set's category id of each contiguous label.

    Use: `reset()`, then `update(predictions, targets)` per batch, then `compute()` once on every
    process. Targets carry `image_id`, `orig_size` and `size` (the input (h, w)); images with no
    prediction still count, as they are seen. Under DDP the per-image results are gathered once
    to rank 0 (the distributed sampler's padding repeats images: results are keyed by image id),
    scored there, and the metrics are broadcast.
    """

    def __init__(self, coco_gt: COCO, category_ids: Sequence[int]) -> None:
        self.coco_gt = coco_gt
        self.category_ids = np.asarray(category_ids, dtype=np.int64)
        self.results: dict[int, list[dict[str, Any]]] = {}
        self.with_masks = False  # whether the head predicts masks (even where it found nothing)
        self._mask_ground_truth: COCO | None = None
        self._masks_checked = False

    def mask_ground_truth(self) -> COCO | None:
        """The ground truth mask AP is scored on: every instance with a usable mask (those
        without are named in a warning, once); None when no instance has one."""
        if not self._masks_checked:
            self._masks_checked = True
            anns = self.coco_gt.dataset.get("annotations", [])
            unusable = instances_without_masks(self.coco_gt)
            if len(unusable) == len(anns):
                log.warning("Mask AP skipped: no ground-truth instance has a usable mask")
                return None
            if unusable:
                log.warning(
                    "Mask AP is scored without %d ground-truth instance(s) that have no usable "
                    "mask (polygons of at least three points, or RLE): %s",
                    len(unusable),
                    describe_instances(self.coco_gt, unusable),
                )
                self._mask_ground_truth = without_annotations(self.coco_gt, unusable)
            else:
                self._mask_ground_truth = self.coco_gt
        return self._mask_ground_truth

    def reset(self) -> None:
        self.results = {}
        self.with_masks = False

    def update(
        self, predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Any]]
    ) -> None:
        for prediction, target in zip(predictions, targets, strict=True):
            image_id = int(target["image_id"])
            self.with_masks |= "masks" in prediction
            scaled = rescale_prediction(prediction, target["size"], target["orig_size"])
            self.results[image_id] = to_coco_results(image_id, scaled, self.category_ids)

    def gather(self) -> tuple[dict[int, list[dict[str, Any]]], bool] | None:
        """Every process's results (and whether masks were predicted) on rank 0, None elsewhere."""
        if not _is_distributed():
            return self.results, self.with_masks
        mine = (self.results, self.with_masks)
        parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if parts is None:
            return None
        merged: dict[int, list[dict[str, Any]]] = {}
        for results, _ in parts:
            merged.update(results)
        return merged, any(with_masks for _, with_masks in parts)

    def compute(
        self, output_path: Path | str | None = None, iou_types: Sequence[str] | None = None
    ) -> tuple[dict[str, float], str]:
        """Scores and the COCOeval tables (empty text on ranks other than 0).

        `iou_types` defaults to bbox, plus segm when the head predicts masks and the ground truth
        has segmentations. `output_path` receives the results json (rank 0).
        """
        gathered = self.gather()
        payload: list[Any] = [None]
        if gathered is not None:
            results, with_masks = gathered
            if iou_types is None:
                iou_types = ("bbox", "segm") if with_masks else ("bbox",)
            payload = [self._score(results, output_path, iou_types)]
        if _is_distributed():
            dist.broadcast_object_list(payload, src=0)
        metrics, tables = payload[0]
        return metrics, tables if gathered is not None else ""

    def _score(
        self,
        per_image: Mapping[int, list[dict[str, Any]]],
        output_path: Path | str | None,
        iou_types: Sequence[str],
    ) -> tuple[dict[str, float], str]:
        results = [r for image_id in sorted(per_image) for r in per_image[image_id]]
        if output_path is not None:
            path = Path(output_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results))
        metrics: dict[str, float] = {}
        tables = []
        for iou_type in iou_types:
            ground_truth = self.mask_ground_truth() if iou_type == "segm" else self.coco_gt
            if ground_truth is None:
                continue
            scores, table = coco_evaluate(ground_truth, results, iou_type, per_image.keys())
            metrics.update(scores)
            tables.append(f"COCOeval {iou_type} ({len(per_image)} images):\n{table}")
        return metrics, "\n".join(tables)
